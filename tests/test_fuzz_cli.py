"""Property-based fuzzing of every command's options: out-of-range, wrong-type and special-path values.

The commands and their options are read from the typer app itself, so a new option is fuzzed without touching
this file (a new command or a new path option must be given a base and a role below; a test says so). Every
option of every command is one test (``test_fuzz_option[build --threads]``); each example takes the command's
cheap, valid base arguments (the tiny checkpoint and build of tests/conftest.py), gives that option — and
perhaps one more — a hostile value and runs the command in a fresh folder. Whatever the values:

- the exit code is 0 and the output is there, or it is 1/2 and stderr ends with exactly one ``error: …. <fix>``
  line with nothing before it but progress lines (tests/test_bad_input.py's ``check_error_line``);
- no traceback on stdout or stderr, no crash by a signal, no hang past the command's time limit;
- nothing is written outside the command's declared destination (--out, --report, --triton), and every file
  that was there before is byte-identical — links, FIFOs and device files included (only ``build`` may replace
  its own earlier build folder); /dev/null and /dev/zero are still character devices.

Starting a Python process per example would cost minutes of imports, so the command runs in a child forked from a
multiprocessing *forkserver* that imported gamexport, torch and ONNX Runtime once (tests/forkrun.py): each example
costs a fork, and its own process still gives a real exit code, a real signal, real file descriptors and a kill on
time-out.

Where the user is root, /dev is writable and a buggy command could replace /dev/null: the special files are
then the test's own (``mknod``) twins inside the example's folder, never the real ones.

``GAMEXPORT_FUZZ_EXAMPLES=N`` sets the examples per option (more to explore; the defaults keep the file to a few
minutes), and ``GAMEXPORT_FUZZ_LOG=FILE`` appends every failing example (shrinking steps included) to FILE as a
JSON line: every option's test runs (without ``-x``), so the log lists each option's failures.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from forkrun import Result, run_command
from test_bad_input import changes, check_error_line, snapshot


# ---- the commands and options, read from the app ----------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter of one command, as the command line sees it."""

    command: str
    name: str               # the Python name (typer's), the key of BASE and DESTINATIONS
    opt: str | None         # the option's first spelling (``--out``); None for a positional argument
    off: str | None         # a boolean option's second spelling (``--no-latency``)
    kind: str               # flag, int, float or text (str, Path and choices alike)
    multiple: bool          # may be repeated (``--prefill-len``)
    path: bool              # typed as a Path

    def __str__(self) -> str:
        return f"{self.command} {self.opt or self.name.upper()}"


def _annotation(param):
    """The parameter's type as typer read it: int, float, str, Path, Literal[…] (a list's element type)."""
    from typing import get_args, get_origin

    annotation = param.type_descriptor.annotation
    return get_args(annotation)[0] if get_origin(annotation) is list else annotation


def _kind(param) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    return {int: "int", float: "float"}.get(_annotation(param), "text")


def cli_params() -> dict[str, list[Param]]:
    """Every command of ``gamexport`` with its parameters, from the typer app (--help and --version aside)."""
    import typer.main

    from gamexport.cli.main import app

    group = typer.main.get_command(app)
    out = {}
    for name, command in group.commands.items():
        out[name] = [Param(name, p.name, p.opts[0] if p.param_type_name == "option" else None,
                           (p.secondary_opts or [None])[0], _kind(p), bool(p.multiple),
                           _annotation(p) is Path)
                     for p in command.params if p.name != "help"]
    return out


PARAMS = cli_params()

# ---- what every example starts from: cheap valid arguments ------------------------------------------------------
# Values name the example's folder: {ck} a tiny checkpoint, {build} a tiny build folder of 5 precisions,
# {data} a small text corpus, {sandbox} the folder itself. A flag's value says which of its spellings is given.
BASE: dict[str, dict[str, str | bool]] = {
    "build": {"source": "{ck}", "out": "{sandbox}/build-out", "latency": False, "threads": "1"},
    "generate": {"source": "{build}", "ids": "1,2", "max_new_tokens": "2", "threads": "1"},
    "inspect": {"path": "{ck}"},
    "parity": {"folder": "{build}", "precision": "fp32", "report": "{sandbox}/parity.json", "threads": "1"},
    "verify": {"folder": "{build}"},
    "bench": {"source": "{ck}", "out": "{sandbox}/bench-out", "threads": "1", "quick": True, "precision": "fp32",
              "max_t": "8", "skip": "prefill,decode,ceilings,goals,scaling,training,startup"},
    "train": {"out": "{sandbox}/run", "dataset": "{data}", "preset": "tiny", "max_steps": "1", "threads": "1",
              "progress": False},
}
# Fuzzing the first drops the base's others: --prompt needs no --ids, and the embedded demo model (no SOURCE),
# which has a tokenizer.
DROPS = {("generate", "prompt"): ("ids", "source")}
# Where each command may write: these options' paths (and below them). Every other path option is an input.
DESTINATIONS = {("build", "out"), ("build", "triton"), ("bench", "out"), ("train", "out"), ("parity", "report")}
INPUTS = {("build", "source"), ("generate", "source"), ("inspect", "path"), ("parity", "folder"),
          ("verify", "folder"), ("bench", "source"), ("train", "dataset"), ("train", "data_dir")}
# The one destination a command may overwrite: its own earlier output (a build folder, for build --out).
OWN_OUTPUT: dict[tuple[str, str], Callable[[Path], bool]] = {
    ("build", "out"): lambda p: (p / "manifest.json").is_file(),
}
# Flags never switched on: --compile is valid and takes minutes. --debug is not fuzzed at all: it shows the
# traceback by design, and its one wrong use (--debug=1) is the parser's, as for every other flag.
NEVER_ON = {"--compile"}
NOT_FUZZED = {"debug"}
# What a successful run must have left (dests: the destination options' paths; out: stdout).
MADE: dict[str, Callable[[dict, str], bool]] = {
    "build": lambda d, out: (d["out"] / "manifest.json").is_file() and "parity:" in out,
    "bench": lambda d, out: (d["out"] / "bench.json").is_file(),
    "train": lambda d, out: (d["out"] / "model.safetensors").is_file(),
    "parity": lambda d, out: isinstance(json.loads(d["report"].read_text()), dict),
    "generate": lambda d, out: bool(out.strip()),
    "inspect": lambda d, out: bool(out.strip()),
    "verify": lambda d, out: out.startswith("verified:"),
}
# Seconds before an example counts as hung (a valid base run of bench measures the machine's limits first).
TIME_LIMIT = {"bench": 240, "build": 120, "train": 120}
DEFAULT_TIME_LIMIT = 60
# Examples per option: each option of each command is one test. GAMEXPORT_FUZZ_EXAMPLES overrides (exploration).
EXAMPLES = {"inspect": 10, "verify": 10, "generate": 5, "parity": 5, "build": 4, "train": 3, "bench": 2}


# ---- hostile values -------------------------------------------------------------------------------------------
class Special(str):
    """A path of the example's folder, named symbolically until the folder exists (``<fifo>``, ``<build>``)."""

    def __new__(cls, name: str):
        return super().__new__(cls, f"<{name}>")


# The example folder's special paths (Sandbox.make): character devices like /dev/null and /dev/zero, a FIFO
# (opening it blocks), the checkpoint and build folders and files in them (a command's own inputs), a symlink to
# a folder of the user's and one to nothing, that folder and a file in it, a folder of mode 555 and a path in it,
# a path under folders that do not exist, the text corpus, the working directory (it holds the user's notes) and
# its parent.
SPECIALS = ("null", "zero", "fifo", "ck", "ck/model.safetensors", "build", "build/manifest.json",
            "build/model.onnx", "link", "dangling", "foreign", "foreign/keep.txt", "readonly", "readonly/out",
            "deep", "data", "cwd", "home")
INTS = ["-1", "0", "-2147483649", "2147483647", "2147483648", "4294967296", "9223372036854775808",
        "-9223372036854775809", "18446744073709551616", str(10**30), str(2**70)]
NOT_INTS = ["abc", "1.5", "", " ", "1e3", "0x10", "nan", "--1", "1,2"]
FLOATS = ["nan", "-nan", "inf", "-inf", "1e-320", "-1e-320", "-0.0", "1e308", "-1e308", "1e309", "-1", "2"]
NOT_FLOATS = ["abc", "", "1,5", "0x1p-3", "1.2.3", "--1"]
TEXTS = ["", " ", "\t", "\n", "a\nb", "-x", "--", "-", "x" * 5000, "é", "\u202e", "$(touch pwned)",
         "`touch pwned`", "; touch pwned", "*", "{}", "%s%n", "../..", ",", ",,,", "FP32", "tiny ", "cpu\n",
         "fp32,fp32", "gam\x7f"]
NON_UTF8 = st.binary(min_size=1, max_size=8).filter(lambda b: b"\0" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape"))      # what Python makes of non-UTF-8 bytes in argv
# Numbers inside text options: token ids (--ids 1,2), TensorRT profile shapes (--min 1x64).
NUMBERS_AS_TEXT = INTS + [f"1,{2**70}", f"1,{2**63}", f"1x{2**31}", f"{2**63}x1", "0x0", "-1x-1", "1e3", "nan"]
PATHS = st.sampled_from([Special(name) for name in SPECIALS] + ["", ".", "..", "no/such/deep/path"])
TEXT_VALUES = st.one_of(PATHS, st.sampled_from(TEXTS), st.sampled_from(NUMBERS_AS_TEXT), NON_UTF8,
                        st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                                max_size=12))
VALUES = {"int": st.sampled_from(INTS + NOT_INTS), "float": st.sampled_from(FLOATS + NOT_FLOATS),
          "text": TEXT_VALUES}


@st.composite
def tokens_for(draw, param: Param) -> list[tuple[str, ...]]:
    """The command-line tokens that give ``param`` a hostile value; each token is a tuple of parts, joined once
    the example's folder has filled in its Special paths (``("--out=", Special("fifo"))``)."""
    if param.kind == "flag":
        spellings = [s for s in (param.opt, param.off) if s]
        wrong = [f"{s}={draw(st.sampled_from(['1', 'yes', '']))}" for s in spellings]
        # A flag the base sets is only given a value (its other spelling would make the run slow: --latency).
        if BASE[param.command].get(param.name) is not None or set(spellings) & NEVER_ON:
            return [(draw(st.sampled_from(wrong)),)]
        return [(draw(st.sampled_from(spellings + wrong)),)]
    values = draw(st.lists(VALUES[param.kind], min_size=1, max_size=3 if param.multiple else 1))
    if param.opt is None:
        return [(v,) for v in values]
    joined = draw(st.booleans())
    return [t for v in values for t in ([(f"{param.opt}=", v)] if joined else [(param.opt,), (v,)])]


FUZZED = [p for params in PARAMS.values() for p in params if p.name not in NOT_FUZZED]


@st.composite
def examples(draw, param: Param) -> dict[str, list[tuple[str, ...]]]:
    """``param`` with a hostile value, and perhaps one more of its command's parameters: name → tokens."""
    others = [p for p in FUZZED if p.command == param.command and p != param]
    chosen = [param, *(draw(st.lists(st.sampled_from(others), max_size=1)) if others else [])]
    return {p.name: draw(tokens_for(p)) for p in chosen}


# ---- the example's folder ---------------------------------------------------------------------------------------
def _make_devices() -> bool:
    """Whether the special devices must be the test's own twins: /dev is writable, so a bug could replace them."""
    return os.access("/dev", os.W_OK)


@dataclass
class Sandbox:
    root: Path
    cwd: Path

    @classmethod
    def make(cls, root: Path, ck: Path, build: Path, data: Path) -> "Sandbox":
        shutil.copytree(ck, root / "ck")
        shutil.copytree(build, root / "build")
        shutil.copy(data, root / "data.txt")
        (root / "foreign").mkdir()
        (root / "foreign" / "keep.txt").write_text("the user's file\n")
        (root / "readonly").mkdir(mode=0o555)
        (root / "link").symlink_to("foreign")
        (root / "dangling").symlink_to("nowhere/at/all")
        os.mkfifo(root / "fifo")
        cwd = root / "home" / "cwd"
        cwd.mkdir(parents=True)
        (cwd / "notes.txt").write_text("the user's notes\n")
        (root / "home" / "todo.txt").write_text("the user's list\n")
        if _make_devices():
            for name, minor in (("null", 3), ("zero", 5)):
                try:
                    os.mknod(root / name, stat.S_IFCHR | 0o666, os.makedev(1, minor))
                except OSError:
                    pass   # no twin: examples that name it are skipped
        return cls(root, cwd)

    def path(self, value: str) -> str | None:
        """A value with its special path filled in; None where this machine cannot offer it."""
        if not isinstance(value, Special):
            return value
        name = value[1:-1]
        if name in ("null", "zero"):
            if not _make_devices():
                return f"/dev/{name}"
            return str(self.root / name) if (self.root / name).exists() else None
        where = {"ck": "ck", "build": "build", "data": "data.txt", "cwd": "home/cwd", "home": "home",
                 "readonly/out": "readonly/out", "deep": "no/such/deep/path/x"}
        return str(self.root / where.get(name, name))

    def remove(self) -> None:
        for path in [self.root, *self.root.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(self.root, ignore_errors=True)


def argv_for(command: str, fuzzed: dict[str, list[tuple[str, ...]]], box: Sandbox) -> list[str] | None:
    """The command line: the base's arguments with the fuzzed ones in their place; None if a value is missing."""
    drops = {d for name in fuzzed for d in DROPS.get((command, name), ())}
    positional, options = [], []
    for p in PARAMS[command]:
        if p.name in fuzzed:
            parts = [[box.path(part) for part in token] for token in fuzzed[p.name]]
            if any(None in token for token in parts):
                return None
            tokens = ["".join(token) for token in parts]
        elif p.name in BASE[command] and p.name not in drops:
            value = BASE[command][p.name]
            if isinstance(value, bool):
                tokens = [p.opt if value else p.off]
            else:
                value = value.format(sandbox=box.root, ck=box.root / "ck", build=box.root / "build",
                                     data=box.root / "data.txt")
                tokens = [value] if p.opt is None else [p.opt, value]
        else:
            continue
        (positional if p.opt is None else options).extend(tokens)
    return [command, *positional, *options]


def _under(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def paths_in(command: str, argv: list[str], box: Sandbox) -> tuple[dict[str, Path], list[Path]]:
    """The destination options' paths (by parameter name) and the input paths of this command line, absolute
    and unresolved, as the command's own parser reads them; none where it refuses the line."""
    import typer.main

    from gamexport.cli.main import app

    cmd = typer.main.get_command(app).commands[command]
    try:
        values = cmd.make_context(command, argv[1:], resilient_parsing=True).params
    except Exception:   # the parser refuses it: the command never starts, so it may write nothing
        return {}, []
    dests, inputs = {}, []
    for name, value in values.items():
        if value is not None and (command, name) in DESTINATIONS | INPUTS:
            path = Path(os.path.normpath(box.cwd / Path(os.fsdecode(value))))
            if (command, name) in DESTINATIONS:
                dests[name] = path
            else:
                inputs.append(path)
    return dests, inputs


def own_outputs(command: str, dests: dict[str, Path], inputs: list[Path]) -> set[str]:
    """The destinations (before the run) that hold the command's own earlier output and are none of its inputs:
    only those may be replaced."""
    return {name for name, dest in dests.items()
            if OWN_OUTPUT.get((command, name), lambda p: False)(dest)
            and not any(_under(i, dest) or _under(dest, i) for i in inputs)}


# ---- what must hold -------------------------------------------------------------------------------------------
def writes_allowed(rel: str, existed: bool, box: Sandbox, dests: dict[str, Path], own: set[str]) -> bool:
    """Whether a change at ``rel`` is the command's own: a new path in a destination (as written or resolved),
    a new parent folder of one, its ``.failed`` twin; a changed or removed path only in the command's own
    earlier output (``own``)."""
    path = box.root / rel
    for name, dest in dests.items():
        tops = {dest, Path(os.path.realpath(dest))}
        inside = any(_under(path, top) for top in tops)
        if existed:
            if inside and name in own:
                return True
        elif inside or any(_under(path, top.with_name(top.name + ".failed")) or path in top.parents
                           for top in tops):
            return True
    return False


def problems(command: str, result: Result, before: dict, after: dict, box: Sandbox, dests: dict[str, Path],
             own: set[str]) -> list[str]:
    """Everything wrong with one run, each as a short sentence (empty: the run kept every rule)."""
    found = []
    if result.code is None:
        found.append(f"hung: still running after {result.seconds:.0f} s")
    elif result.code < 0:
        found.append(f"killed by signal {signal.Signals(-result.code).name}")
    for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        if "Traceback" in text:
            last = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
            found.append(f"traceback on {stream}: {last[0].strip()[:160]}")
    if result.code == 0:
        if any(line.startswith("error:") for line in result.stderr.splitlines()):
            found.append("exit 0 with an error line")
        try:
            made = MADE[command](dests, result.stdout)
        except (OSError, ValueError, KeyError) as exc:
            made = exc
        if made is not True:
            found.append(f"exit 0 but the output is missing or unreadable ({made})")
    elif result.code is not None and result.code > 0 and not found:
        last = (result.stderr.splitlines() or [""])[-1]
        if result.code == 130 and last.startswith("interrupted: "):
            pass
        elif result.code not in (1, 2):
            found.append(f"exit {result.code}, not 1 or 2: {last[:160]}")
        else:
            try:
                check_error_line(result.stderr, ".")
            except AssertionError:
                tail = result.stderr.splitlines()[-3:]
                found.append(f"exit {result.code} without exactly one error line with a fix as the last line; "
                             f"stderr ends {tail!r:.300}")
    for rel in changes(before, after):
        existed = rel in before
        if not writes_allowed(rel, existed, box, dests, own):
            if not existed:
                found.append(f"wrote outside the destination: {rel} ({after[rel][:24]})")
            else:
                found.append(f"{'removed' if rel not in after else 'changed'} {rel}, which was there before "
                             f"({before[rel][:24]} → {after.get(rel, 'gone')[:24]})")
    for dev in ("/dev/null", "/dev/zero"):
        if not stat.S_ISCHR(os.stat(dev).st_mode):
            found.append(f"{dev} is no longer a character device")
    return found


# ---- the test -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_inputs(tmp_path_factory, tiny_cfg, tiny_weights, tiny_build) -> dict[str, Path]:
    """The tiny checkpoint, the tiny build and a small corpus (enough text for one step of the tiny preset)."""
    import random

    from gamexport.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("fuzz_inputs")
    save_checkpoint(folder / "ck", tiny_cfg, tiny_weights, meta={"trained": False})
    rng = random.Random(0)
    words = "the cat sat on a mat and ran to the big red dog who was happy all day long".split()
    docs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)]
    (folder / "data.txt").write_text("\n\n".join(docs) + "\n")
    return {"ck": folder / "ck", "build": tiny_build, "data": folder / "data.txt"}


def _log(record: dict) -> None:
    path = os.environ.get("GAMEXPORT_FUZZ_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=True) + "\n")


def fuzz_one(command: str, fuzzed: dict[str, list[tuple[str, ...]]], inputs: dict[str, Path], forkserver,
             tmp_path_factory) -> None:
    work = tmp_path_factory.mktemp(f"fuzz-{command}", numbered=True)
    box = Sandbox.make(work / "box", inputs["ck"], inputs["build"], inputs["data"])
    (work / "logs").mkdir()
    try:
        argv = argv_for(command, fuzzed, box)
        if argv is None:
            event("skipped: this machine offers no such special file")
            return
        note(f"argv: gamexport {shlex.join(argv)}")
        for name in fuzzed:
            event(f"{command} {name}")
        dests, inputs = paths_in(command, argv, box)
        own = own_outputs(command, dests, inputs)
        before = snapshot(box.root)
        limit = TIME_LIMIT.get(command, DEFAULT_TIME_LIMIT)
        result = run_command(forkserver, argv, box.cwd, work / "logs", limit)
        after = snapshot(box.root)
        found = problems(command, result, before, after, box, dests, own)
        event(f"exit {result.code}")
        note(f"exit {result.code} in {result.seconds:.1f} s; stderr ends: {result.stderr[-600:]!r}")
        if found:
            _log({"command": command, "fuzzed": {k: ["".join(t) for t in v] for k, v in fuzzed.items()},
                  "argv": [a[:200] for a in argv], "code": result.code, "problems": found,
                  "stderr_tail": result.stderr[-400:]})
        assert not found, f"gamexport {shlex.join(argv)[:400]}\n" + "\n".join(found)
    finally:
        box.remove()
        shutil.rmtree(work, ignore_errors=True)


def _settings(command: str):
    n = int(os.environ.get("GAMEXPORT_FUZZ_EXAMPLES", EXAMPLES[command]))
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.mark.slow
@pytest.mark.parametrize("param", FUZZED, ids=str)
def test_fuzz_option(param, fuzz_inputs, forkserver, tmp_path_factory):
    """Hostile values for one option of one command: one error line, or a good result; nothing else written."""

    @_settings(param.command)
    @given(fuzzed=examples(param))
    def run(fuzzed):
        fuzz_one(param.command, fuzzed, fuzz_inputs, forkserver, tmp_path_factory)

    run()


def test_every_command_and_path_option_has_a_role():
    """A new command needs a base, a new path option a role (destination or input): else it goes unchecked."""
    assert set(PARAMS) == set(BASE) == set(MADE) == set(EXAMPLES)
    known = {(p.command, p.name) for params in PARAMS.values() for p in params}
    assert DESTINATIONS | INPUTS <= known
    for params in PARAMS.values():
        for p in params:
            assert not p.path or (p.command, p.name) in DESTINATIONS | INPUTS, f"{p}: a destination or an input?"
