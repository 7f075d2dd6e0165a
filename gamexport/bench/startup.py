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


def startup_section(ckpt, build_folder: Path | None, tmp: Path, threads: int, effort: Effort,
                    say: Progress) -> dict:
    """``gamexport --help`` and the time to first token of ``gamexport generate`` on a build folder."""
    cmd = gamexport_command()
    say(f"startup: {' '.join(cmd[-1:])} --help, {effort.help_runs} runs")
    help_t = time_command([*cmd, "--help"], effort.help_runs, effort.startup_warmup)
    folder = build_folder
    note = "the SOURCE build folder"
    if folder is None:
        from gamexport.manifest import write_manifest

        folder = tmp / "first-token-build"
        folder.mkdir()
        for name in ("model.onnx", "step.onnx"):
            shutil.copyfile(tmp / "graphs" / name, folder / name)
        write_manifest(folder, ckpt)
        note = "a build folder of the fp32 graphs with a manifest (no report), written for this run"
    argv = [*cmd, "generate", str(folder), "--ids", "1", "--max-new-tokens", "1", "--threads", str(threads)]
    say(f"startup: gamexport generate (1 new token) on {note}, {effort.first_token_runs} runs")
    first = time_command(argv, effort.first_token_runs, effort.startup_warmup)
    return {"help": {**help_t, "what": "wall time of `gamexport --help`, process start to exit"},
            "first_token": {**first, "folder": note,
                            "what": "wall time of `gamexport generate FOLDER --ids 1 --max-new-tokens 1`, process "
                                    "start to exit: imports, manifest check (sha256 of the graphs), ONNX Runtime "
                                    "session creation, prefill and sampling of the first token"}}
