"""Start-up: wall time of ``gamexport --help`` and of the first token of ``gamexport generate``, each a whole
process from start to exit, as a user meets them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gamexport.bench.settings import Effort, Progress
from gamexport.errors import GamexportError


def gamexport_command() -> list[str]:
    """How a user starts gamexport here: the console script beside this Python, else ``python -m``."""
    script = Path(sys.executable).with_name("gamexport")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "gamexport.cli.main"]


def time_command(argv: list[str], runs: int, warmup: int) -> dict:
    """Wall time of a whole process (start to exit), median of ``runs`` after ``warmup`` untimed runs."""
    from gamexport.bench.timing import summarize

    env = {**os.environ, "GAMEXPORT_DEBUG": ""}
    samples = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise GamexportError(f"{' '.join(argv[-6:])} failed while timing start-up: {tail}",
                                 "run it by hand to see why")
        if i >= warmup:
            samples.append(elapsed)
    return {"command": argv, **summarize(samples, warmup).as_dict()}


def graphs_folder(ckpt, folder: Path, graphs: Path | None = None) -> Path:
    """``folder``, made a build folder of ``ckpt``'s fp32 prefill and step graphs with a manifest (no report): the
    graphs copied from ``graphs`` (already exported for this run), else exported here."""
    from gamexport.manifest import write_manifest

    if graphs is None:
        from gamexport.graph.builder import export_graphs

        graphs = folder.with_name(folder.name + "-graphs")
        graphs.mkdir()
        export_graphs(ckpt.config, ckpt.weights, graphs, ckpt.sha256)
    folder.mkdir()
    for name in ("model.onnx", "step.onnx"):
        shutil.copyfile(graphs / name, folder / name)
    write_manifest(folder, ckpt)
    return folder


#: What the first-token timings measure.
FIRST_TOKEN = ("wall time of `gamexport generate FOLDER --ids 1 --max-new-tokens 1`, process start to exit: imports, "
               "manifest check (sha256 of the graphs), the external-data check, ONNX Runtime session creation, "
               "prefill and sampling of the first token")


def _first_token(cmd: list[str], folder: Path, note: str, threads: int, effort: Effort, say: Progress) -> dict:
    argv = [*cmd, "generate", str(folder), "--ids", "1", "--max-new-tokens", "1", "--threads", str(threads)]
    say(f"startup: gamexport generate (1 new token) on {note}, {effort.first_token_runs} runs")
    return {**time_command(argv, effort.first_token_runs, effort.startup_warmup), "folder": note,
            "what": FIRST_TOKEN}


def startup_section(ckpt, build_folder: Path | None, tmp: Path, threads: int, effort: Effort,
                    say: Progress) -> dict:
    """``gamexport --help``, and the time to first token of ``gamexport generate`` on a build folder of SOURCE
    (``first_token``) and on one of the demo model shipped in the package (``first_token_demo``: the model a new
    user meets first; absent where this install has none, or SOURCE is it)."""
    from gamexport.sources import demo_folder

    cmd = gamexport_command()
    say(f"startup: {' '.join(cmd[-1:])} --help, {effort.help_runs} runs")
    help_t = time_command([*cmd, "--help"], effort.help_runs, effort.startup_warmup)
    if build_folder is not None:
        first = _first_token(cmd, build_folder, "the SOURCE build folder", threads, effort, say)
    else:
        first = _first_token(cmd, graphs_folder(ckpt, tmp / "first-token-build", tmp / "graphs"),
                             "a build folder of the fp32 graphs with a manifest (no report), written for this run",
                             threads, effort, say)
    out = {"help": {**help_t, "what": "wall time of `gamexport --help`, process start to exit"}, "first_token": first}
    demo = demo_folder()
    if demo is not None:
        from gamexport.checkpoint import load_checkpoint

        demo_ckpt = load_checkpoint(demo)
        if demo_ckpt.sha256 != ckpt.sha256:
            out["first_token_demo"] = _first_token(
                cmd, graphs_folder(demo_ckpt, tmp / "first-token-demo"),
                "a build folder of the shipped demo model's fp32 graphs with a manifest, written for this run",
                threads, effort, say)
    return out
