"""gamexport.cli.coercion: option values converted without pydantic are exactly what typer's coercion returns.

Every parameter of every command is tried with generated strings and with the values that matter (digits, signs,
spaces, exponents, underscores, nan, bounds and one past them, other types): wherever the direct conversion answers,
typer's own runtime parameter (its pydantic adapter) must return the same value of the same type; wherever typer
refuses a value, the direct conversion must have left it to typer (so the error line is typer's).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings, strategies as st

import gamexport.cli.main  # noqa: F401  (installs the fast path)
from gamexport.cli import coercion

typer = pytest.importorskip("typer")
_coercion = pytest.importorskip("typer._coercion")
core = pytest.importorskip("typer.core")


def _params():
    from gamexport.cli.main import app

    group = typer.main.get_command(app)
    out = [(f"gamexport {group.name}", p) for p in group.params]
    for name, command in group.commands.items():
        out += [(f"gamexport {name}", p) for p in command.params]
    return out


PARAMS = _params()
_TYPER = object()  # "typer refused it"


def _typer(param, value):
    try:
        return _coercion.build_runtime_param(param.type_descriptor).coerce(value, param=param, ctx=None)
    except Exception:  # noqa: BLE001 - BadParameter: typer refuses the value
        return _TYPER


def _same(param, value):
    convert = coercion.fast_converter(param.type_descriptor)
    fast = coercion._NO if convert is None else convert(value)
    if fast is coercion._NO:
        return
    want = _typer(param, value)
    assert want is not _TYPER, f"{param.name}: {value!r} is converted to {fast!r}, typer refuses it"
    assert type(fast) is type(want) and (fast == want or (isinstance(want, float) and math.isnan(want)
                                                           and math.isnan(fast))), (param.name, value, fast, want)


def _edges(param):
    info = param.type_descriptor.parameter_info
    values = ["0", "1", "007", "00", "+1", "-1", "-0", " 1", "1 ", "1_000", "1.0", "1.", ".5", "0.5", "1e3", "1E-2",
              "nan", "inf", "-inf", "", "x", "٣", "1" * 18, "1" * 19, "9" * 30, "0." + "9" * 30, "0x10", True, False,
              None, 0, 1, -1, 0.5, 1.0, float("nan"), b"1", "a\udcffb"]
    for bound in (info.min, info.max):
        if bound is not None:
            values += [bound, str(bound), bound + 1, bound - 1, str(bound + 1), str(bound - 1), float(bound),
                       f"{bound}.0", f"{bound}.5", f"{bound + 0.1}"]
    return values


@pytest.mark.parametrize("where,param", PARAMS, ids=[f"{w} {p.name}" for w, p in PARAMS])
def test_edge_values_are_converted_as_typer_converts_them(where, param):
    for value in _edges(param):
        _same(param, value)
    if param.default is not None:
        _same(param, param.default)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(text=st.one_of(st.text(max_size=12), st.from_regex(r"[0-9]{1,25}(\.[0-9]{0,25})?", fullmatch=True),
                      st.floats(allow_nan=True).map(repr), st.integers().map(str)))
def test_generated_strings_are_converted_as_typer_converts_them(text):
    for _, param in PARAMS:
        _same(param, text)


def test_the_fast_path_is_installed_and_used_for_generate():
    import gamexport.cli.main as main

    assert core._TyperParameter.get_runtime_param.gamexport_fast
    command = typer.main.get_command(main.app).commands["generate"]
    runtime = {p.name: type(p.get_runtime_param()).__name__ for p in command.params}
    assert runtime["max_new_tokens"] == runtime["top_p"] == runtime["ids"] == "FastRuntimeParam"


def test_a_value_typer_refuses_still_gets_typers_message():
    """Out of range and not a number: the fast path steps aside, typer (pydantic) writes the line."""
    code = textwrap.dedent("""
        import sys
        sys.argv[0] = "gamexport"
        from gamexport.cli.main import main
        for argv in (["generate", "--ids", "1", "--max-new-tokens", "99999999"], ["generate", "--ids", "1",
                     "--top-p", "1.5"], ["generate", "--ids", "1", "-j", "x"]):
            try:
                main(argv)
            except SystemExit as exc:
                print(exc.code)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "2", "2"], proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "error: Invalid value for '--max-new-tokens': Input should be less than or equal to 1048576. "
        "Run 'gamexport generate --help' for the options.",
        "error: Invalid value for '--top-p': Input should be less than or equal to 1. "
        "Run 'gamexport generate --help' for the options.",
        "error: Invalid value for '--threads' / '-j': Input should be a valid integer, unable to parse string as an "
        "integer. Run 'gamexport generate --help' for the options."], lines
