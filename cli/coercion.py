"""Option values whose coercion is not in doubt, converted without pydantic; typer's own coercion for the rest.

typer 0.29 coerces every parameter value of the command being run — its defaults included — through a pydantic
``TypeAdapter``: the first one imports pydantic (~65 ms) and building one per option costs ~20 ms more, a quarter
of a cold ``gamexport generate`` on the demo model, for values such as ``--max-new-tokens 1``. Here an ``int`` or
``float`` option given as plain decimal digits (``[0-9]+``, a float's with one ``.`` between digits), a ``str``
option given a ``str``, a flag given a ``bool``, a default of exactly the annotated type, or None (not given), is
taken directly when it lies within the option's ``min``/``max``: pydantic would return the very same value (``tests/test_cli_coercion.py`` checks it against
typer's adapters over generated inputs). Any other value — a sign, spaces, an exponent, underscores, ``nan``, a
value out of range, any other annotation, a parser, a clamp, a list — goes to typer's coercion exactly as before,
so the values and the error messages are typer's.

:func:`install` patches ``typer.core._TyperParameter.get_runtime_param``, a private method; with a typer that has
no such method (older ones coerce through click's types, without pydantic) it changes nothing.
"""

from __future__ import annotations

import re
from typing import Any, Callable

#: Decimal digits only, at most 18 (within a signed 64-bit integer); a float's: digits, one dot, digits.
_INT = re.compile(r"[0-9]{1,18}")
_FLOAT = re.compile(r"[0-9]{1,30}(?:\.[0-9]{1,30})?")
_NO = object()  # "not certain here: ask typer"


def _number(kind: type, pattern: re.Pattern, low, high) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if type(value) is str and pattern.fullmatch(value):
            value = kind(value)
        elif type(value) is not kind:
            return _NO
        if (low is not None and not value >= low) or (high is not None and not value <= high):
            return _NO  # typer's message for a value out of range
        return value
    return convert


def _text(value: Any) -> Any:
    return value if type(value) is str else _NO


def _flag(value: Any) -> Any:
    return value if type(value) is bool else _NO


def fast_converter(descriptor) -> Callable[[Any], Any] | None:
    """The direct conversion for a parameter's resolved type (a ``typer._coercion.TypeDescriptor``), or None when
    every value of it goes to typer."""
    info = descriptor.parameter_info
    if info.parser is not None or info.clamp or descriptor.file_annotation is not None:
        return None
    if descriptor.annotation is int:
        return _number(int, _INT, info.min, info.max)
    if descriptor.annotation is float:
        return _number(float, _FLOAT, info.min, info.max)
    if descriptor.annotation is str and info.min is None and info.max is None:
        return _text
    if descriptor.annotation is bool:  # --help and flags: None (not given) or a bool already
        return _flag
    return None


class FastRuntimeParam:
    """A parameter's coercion: the direct conversion where it is certain, else typer's runtime parameter (built,
    with its pydantic adapter, the first time it is needed)."""

    def __init__(self, descriptor, convert: Callable[[Any], Any], build: Callable[[Any], Any]):
        self.descriptor, self.convert, self.build = descriptor, convert, build
        self.full = None

    def coerce(self, value: Any, param, ctx) -> Any:
        if not (param.multiple or param.nargs == -1):
            if value is None:  # as typer's RuntimeParam.coerce
                return None
            out = self.convert(value)
            if out is not _NO:
                return out
        if self.full is None:
            self.full = self.build(self.descriptor)
        return self.full.coerce(value, param=param, ctx=ctx)


def install() -> bool:
    """Route typer's parameter coercion through :class:`FastRuntimeParam`; False when this typer has nothing to
    route (no ``_TyperParameter.get_runtime_param``)."""
    try:
        from typer._coercion import build_runtime_param
        from typer.core import _TyperParameter
    except ImportError:
        return False
    original = getattr(_TyperParameter, "get_runtime_param", None)
    if original is None:
        return False
    if getattr(original, "gamexport_fast", False):
        return True

    def get_runtime_param(self):
        if getattr(self, "_runtime_param", None) is None:
            convert = fast_converter(self.type_descriptor)
            if convert is not None:
                self._runtime_param = FastRuntimeParam(self.type_descriptor, convert, build_runtime_param)
        return original(self)

    get_runtime_param.gamexport_fast = True
    get_runtime_param.__doc__ = original.__doc__
    _TyperParameter.get_runtime_param = get_runtime_param
    return True
