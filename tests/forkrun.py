"""Run one ``gamexport`` command in a child process forked from a multiprocessing *forkserver* that imported
gamexport, torch and ONNX Runtime once (tests/test_fuzz_cli.py, tests/test_bad_input.py).

Starting a Python process per command costs seconds of imports on two cores; a fork from the server costs a
fraction of that, and the child is still a process of its own: a real exit code, a real signal, its own file
descriptors for stdout and stderr, its own session (killed as a group on time-out) and working directory.
What such a child does not go through is a fresh interpreter's start: whatever the preloaded modules print or
warn while they are imported happens once, in the server. A test that must see that runs the command with
``python -m gamexport.cli.main`` instead (test_bad_input.py keeps such rows).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# What the commands import, loaded once in the server instead of in every run. Besides gamexport's own modules,
# the lazy imports of the libraries (each measured at a second or more per run on two cores): typer's parameter
# coercion (pydantic, on the first parse), torch._dynamo (sympy; on an optimizer's first step) and matplotlib's
# figure and Agg canvas (the training plots).
PRELOAD = ["forkrun", "numpy", "torch", "onnx", "onnxruntime", "safetensors", "tokenizers", "matplotlib",
           "gamexport.cli.main", "gamexport.pipeline", "gamexport.generation",
           "gamexport.pipeline.recheck", "gamexport.bench.command", "gamexport.inspection", "gamexport.parity",
           "gamexport.manifest", "gamexport.training.loop", "gamexport.training.plots", "typer._adapters",
           "torch._dynamo", "matplotlib.figure", "matplotlib.backends.backend_agg"]


@dataclass
class Result:
    code: int | None   # None: killed after the time limit
    stdout: str
    stderr: str
    seconds: float


def server():
    """The forkserver context, started now: it inherits the environment of this moment (before any test's
    monkeypatch), and every child is given its environment explicitly or keeps the server's."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    proc = ctx.Process(target=_nothing)
    proc.start()
    proc.join()
    return ctx


def _nothing() -> None:
    pass


def _child(argv: list[str], cwd: str, stdout: str, stderr: str, env: dict[str, str] | None) -> None:
    """Runs in the forked child: its own session (killed as a group), output to files, GAMEXPORT_DEBUG off unless
    ``env`` (the whole environment, when given) says otherwise."""
    os.setsid()
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(cwd)
    if env is None:
        os.environ["GAMEXPORT_DEBUG"] = ""
    else:
        os.environ.clear()
        os.environ.update(env)
    sys.argv = ["gamexport", *argv]
    from gamexport.cli.main import main

    main(argv)   # exits; multiprocessing turns SystemExit into the exit code and prints any other traceback


def run_command(ctx, argv: list[str], cwd: Path, logs: Path, limit: float,
                env: dict[str, str] | None = None) -> Result:
    """``gamexport ARGV`` in ``cwd``; its stdout and stderr go through files in ``logs`` (a folder outside
    anything the caller snapshots)."""
    out, err = logs / "stdout", logs / "stderr"
    proc = ctx.Process(target=_child, args=(argv, str(cwd), str(out), str(err), env))
    start = time.monotonic()
    proc.start()
    proc.join(limit)
    code = proc.exitcode
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # a hung command, or what it left running
    except (ProcessLookupError, PermissionError):
        pass
    proc.join()
    read = lambda p: p.read_bytes().decode("utf-8", "replace") if p.exists() else ""  # noqa: E731
    return Result(code, read(out), read(err), time.monotonic() - start)
