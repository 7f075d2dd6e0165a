"""The one reader for every JSON file gamexport reads: bounded, strict, checked against a declared shape.

A JSON file on disk is user input (a build folder can be edited, truncated or forged), so each one is read by
``read_json`` (or, for JSON held in a string such as a graph's metadata, ``parse_json``), which

- refuses a file larger than its cap before reading it;
- refuses text nested deeper than ``MAX_DEPTH`` (Python's parser would raise RecursionError) and number literals
  longer than ``MAX_NUMBER_CHARS`` (``int()`` of a 5,000-digit string raises ValueError);
- refuses ``NaN``/``Infinity`` and numbers that overflow to infinity, unless the caller allows them;
- checks the result against a small declared schema (``Obj``, ``Map``, ``List``, ``Int``, ``Num``, ``Str``,
  ``Bool``, ``ANY``), naming the key path that is wrong: ``manifest.json: files["step.onnx"].size must be an
  integer``.

Every problem is one ``GamexportError`` line (of the class the caller passes) naming the file and its fix. The
runtime path needs no ``jsonschema``: the checker below is a few lines of plain Python.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GamexportError

MAX_DEPTH = 64
MAX_NUMBER_CHARS = 100
MIB = 1 << 20


class SchemaError(ValueError):
    """What is wrong with a JSON text or value (a key path and a rule); readers turn it into the caller's error
    class with the file's name."""


# ---- the schema ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None


@dataclass(frozen=True)
class Num:
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True)
class Str:
    max_len: int | None = None


@dataclass(frozen=True)
class Bool:
    pass


@dataclass(frozen=True)
class List:
    item: Any = None          # None: any value
    max_len: int | None = None


@dataclass(frozen=True)
class Map:
    """An object with any keys, every value of one schema."""
    value: Any = None


@dataclass(frozen=True)
class Obj:
    """An object with these required and optional keys (other keys are allowed and not checked)."""
    required: dict = field(default_factory=dict)
    optional: dict = field(default_factory=dict)


ANY = None


def _describe(schema) -> str:
    if isinstance(schema, Int):
        return "an integer"
    if isinstance(schema, Num):
        return "a number"
    if isinstance(schema, Str):
        return "a string"
    if isinstance(schema, Bool):
        return "true or false"
    if isinstance(schema, List):
        return "a list"
    return "an object"


def _key(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def short(value: Any, limit: int = 40) -> str:
    """``repr`` of a value cut to ``limit`` characters, so a huge value cannot flood the error line."""
    big = isinstance(value, int) and value.bit_length() > 4000  # repr() of a > 4,300-digit int raises
    text = f"<{value.bit_length():,}-bit integer>" if big else repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text):,} characters)"


def check(value: Any, schema, path: str = "") -> None:
    """Raise ``SchemaError('<path> must be …')`` where ``value`` does not fit ``schema``."""
    if schema is None:
        return
    where = path or "the top level"
    ok_type = {Int: lambda v: isinstance(v, int) and not isinstance(v, bool),
               Num: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
               Str: lambda v: isinstance(v, str), Bool: lambda v: isinstance(v, bool),
               List: lambda v: isinstance(v, list), Map: lambda v: isinstance(v, dict),
               Obj: lambda v: isinstance(v, dict)}[type(schema)]
    if not ok_type(value):
        raise SchemaError(f"{where} must be {_describe(schema)}, not {short(value)}")
    if isinstance(schema, (Int, Num)):
        if (schema.lo is not None and value < schema.lo) or (schema.hi is not None and value > schema.hi):
            raise SchemaError(f"{where} must be in [{schema.lo}, {schema.hi}], not {short(value)}")
    elif isinstance(schema, Str) and schema.max_len is not None and len(value) > schema.max_len:
        raise SchemaError(f"{where} must be at most {schema.max_len:,} characters, not {len(value):,}")
    elif isinstance(schema, List):
        if schema.max_len is not None and len(value) > schema.max_len:
            raise SchemaError(f"{where} must have at most {schema.max_len:,} items, not {len(value):,}")
        for i, item in enumerate(value):
            check(item, schema.item, _key(path, i))
    elif isinstance(schema, Map):
        for k, v in value.items():
            check(v, schema.value, _key(path, k))
    elif isinstance(schema, Obj):
        for k, sub in schema.required.items():
            if k not in value:
                raise SchemaError(f"{_key(path, k)} is missing")
            check(value[k], sub, _key(path, k))
        for k, sub in schema.optional.items():
            if k in value:
                check(value[k], sub, _key(path, k))


# ---- parsing ---------------------------------------------------------------------------------------------------
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` outside strings (scanned in C by the regex engine, not in Python)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > MAX_DEPTH:
                break
    return deepest


def _number(kind):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise SchemaError(f"holds a number {len(text):,} characters long (at most {MAX_NUMBER_CHARS})")
        value = kind(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaError(f"holds the number {short(text)}, which overflows to infinity")
        return value
    return parse


def _loads(text: str, allow_nan: bool) -> Any:
    if _depth(text) > MAX_DEPTH:
        raise SchemaError(f"is nested more than {MAX_DEPTH} levels deep")

    def constant(name: str):
        if not allow_nan:
            raise SchemaError(f"holds {name}, which JSON does not allow here")
        return float(name.replace("Infinity", "inf"))

    try:
        return json.loads(text, parse_int=_number(int), parse_float=_number(float), parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    except RecursionError as exc:  # the depth scan should have caught it; never a traceback
        raise SchemaError(f"is nested too deeply (more than {MAX_DEPTH} levels)") from exc


def parse_json(text: str, where: str, *, schema=ANY, error: type[GamexportError] = GamexportError,
               fix: str = "rebuild it with gamexport", allow_nan: bool = False) -> Any:
    """Parse JSON held in a string (``where`` names its origin in errors) and check it against ``schema``."""
    try:
        value = _loads(text, allow_nan)
    except SchemaError as exc:
        raise error(f"cannot read {where}: it {exc}", fix) from None
    try:
        check(value, schema)
    except SchemaError as exc:
        raise error(f"{where}: {exc}", fix) from None
    return value


def read_json(path: str | Path, *, schema=ANY, error: type[GamexportError] = GamexportError,
              fix: str = "rebuild it with gamexport", max_bytes: int = 16 * MIB, allow_nan: bool = False) -> Any:
    """Read and check one JSON file; every problem (missing, too big, not UTF-8, not JSON, too deep, wrong shape)
    is one ``error`` line naming ``path`` and ``fix``. A missing file raises FileNotFoundError, for callers
    that treat it apart; wrap it yourself if not."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size > max_bytes:
                raise error(f"cannot read {path}: it is {size:,} bytes, more than the {max_bytes:,} expected", fix)
            f.seek(0)
            data = f.read()
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise error(f"cannot read {path}: it is a folder, not a JSON file", fix) from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or type(exc).__name__}", fix) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"cannot read {path}: it is not UTF-8 text (byte {exc.start})", fix) from None
    return parse_json(text, str(path), schema=schema, error=error, fix=fix, allow_nan=allow_nan)
