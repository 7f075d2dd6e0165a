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


def time_commands(argvs: list[list[str]], runs: int, warmup: int) -> list[dict]:
    """Wall time of whole processes (start to exit), median of ``runs`` after ``warmup`` untimed runs each; the
    commands take turns, in reversed order every other round, so that a host that slows down meanwhile slows
    them alike."""
    from gamexport.bench.timing import summarize

    env = {**os.environ, "GAMEXPORT_DEBUG": ""}
    samples: list[list[float]] = [[] for _ in argvs]
    for i in range(warmup + runs):
        for k in (range(len(argvs)) if i % 2 == 0 else reversed(range(len(argvs)))):
            t0 = time.perf_counter()
            proc = subprocess.run(argvs[k], capture_output=True, text=True, env=env, timeout=600)
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                raise GamexportError(f"{' '.join(argvs[k][-6:])} failed while timing start-up: {tail}",
                                     "run it by hand to see why")
            if i >= warmup:
                samples[k].append(elapsed)
    return [{"command": argv, **summarize(mine, warmup).as_dict()} for argv, mine in zip(argvs, samples)]


def time_command(argv: list[str], runs: int, warmup: int) -> dict:
    """Wall time of a whole process (start to exit), median of ``runs`` after ``warmup`` untimed runs."""
    return time_commands([argv], runs, warmup)[0]


def graphs_folder(ckpt, folder: Path, graphs: Path | None = None, prepacked: int | None = None) -> Path:
    """``folder``, made a build folder of ``ckpt``'s fp32 prefill and step graphs with a manifest (no report): the
    graphs copied from ``graphs`` (already exported for this run), else exported here; with ``prepacked`` (the
    threads), the step graph pre-packed for this machine too, as ``gamexport build`` writes it."""
    from gamexport.manifest import write_manifest

    if graphs is None:
        from gamexport.graph.builder import export_graphs

        graphs = folder.with_name(folder.name + "-graphs")
        graphs.mkdir()
        export_graphs(ckpt.config, ckpt.weights, graphs, ckpt.sha256)
    folder.mkdir()
    for name in ("model.onnx", "step.onnx"):
        shutil.copyfile(graphs / name, folder / name)
    if prepacked is not None:
        from gamexport.engines.ort import write_prepacked

        write_prepacked(folder / "step.onnx", folder, prepacked)
    write_manifest(folder, ckpt)
    return folder


#: What the first-token timings measure.
FIRST_TOKEN = ("wall time of `gamexport generate FOLDER --ids 1 --max-new-tokens 1`, process start to exit: imports, "
               "manifest check (sha256 of the graph it opens), the external-data check, ONNX Runtime session "
               "creation, prefill and sampling of the first token")
#: The folders the first token is timed on (``first_token``, ``first_token_demo``): as ``gamexport build`` writes
#: them, with the step graph pre-packed for this machine; ``first_token_step_onnx`` times the same model without it.
BUILT = "with the step graph pre-packed for this machine, as gamexport build writes it"
WITHOUT = "without the prepacked step graph (gamexport build --no-prepacked): ONNX Runtime packs step.onnx at load"


def _first_tokens(cmd: list[str], folders: list[tuple[Path, str]], threads: int, effort: Effort,
                  say: Progress) -> list[dict]:
    """The first token on each folder, timed in turns."""
    argvs = [[*cmd, "generate", str(folder), "--ids", "1", "--max-new-tokens", "1", "--threads", str(threads)]
             for folder, _ in folders]
    say(f"startup: gamexport generate (1 new token) on {' and on '.join(note for _, note in folders)}, "
        f"{effort.first_token_runs} runs each")
    return [{**timed, "folder": note, "what": FIRST_TOKEN}
            for timed, (_, note) in zip(time_commands(argvs, effort.first_token_runs, effort.startup_warmup),
                                        folders)]


#: What the build measurement is.
BUILD = ("peak resident memory and wall time of `gamexport build SOURCE --threads N` with its defaults (parity, "
         "latency, the prepacked step graph), in a process of its own whose only child is the build")

#: Run as ``python -c``: the build (argv[1:]) as the only child of a fresh process, then its peak RSS (Linux: KiB).
_PEAK = ("import resource, subprocess, sys\n"
         "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
         "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def build_peak(cmd: list[str], source: list[str], out: Path, threads: int, say: Progress) -> dict | None:
    """``gamexport build`` of ``source`` (its CLI arguments) into ``out``: peak resident memory and wall time, or
    None where the platform cannot say (no ``resource`` module: not Linux or macOS)."""
    try:
        import resource  # noqa: F401  (the wrapper needs it; the same platforms have it here)
    except ImportError:
        return None
    argv = [*cmd, "build", *source, "--out", str(out), "--threads", str(threads)]
    say(f"startup: gamexport build {' '.join(source)} (peak memory)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK, *argv], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "GAMEXPORT_DEBUG": ""})
    wall = time.perf_counter() - t0
    try:
        rc, kib = (int(v) for v in proc.stdout.split())
    except ValueError:
        rc, kib = proc.returncode or 1, 0
    if rc != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {rc}"])[-1]
        raise GamexportError(f"gamexport build {' '.join(source)} failed while measuring its peak memory: {tail}",
                             "run it by hand to see why")
    scale = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, KiB on Linux
    return {"command": argv, "peak_rss_mb": kib * scale / 2**20, "wall_s": wall, "what": BUILD}


def startup_section(ckpt, build_folder: Path | None, tmp: Path, threads: int, effort: Effort,
                    say: Progress, build_source: list[str] | None = None) -> dict:
    """``gamexport --help``, and the time to first token of ``gamexport generate`` on a build folder of SOURCE
    (``first_token``) and on one of the demo model shipped in the package (``first_token_demo``: the model a new
    user meets first; absent where this install has none, or SOURCE is it); with ``build_source`` (SOURCE's
    arguments to ``gamexport build``), that build's peak memory and wall time (``build``)."""
    from gamexport.sources import demo_folder

    cmd = gamexport_command()
    say(f"startup: {' '.join(cmd[-1:])} --help, {effort.help_runs} runs")
    help_t = time_command([*cmd, "--help"], effort.help_runs, effort.startup_warmup)
    out = {"help": {**help_t, "what": "wall time of `gamexport --help`, process start to exit"}}
    if build_folder is not None:
        [out["first_token"]] = _first_tokens(cmd, [(build_folder, "the SOURCE build folder")], threads, effort, say)
    else:
        mine = "a build folder of the fp32 graphs with a manifest (no report), written for this run"
        out["first_token"], out["first_token_step_onnx"] = _first_tokens(cmd, [
            (graphs_folder(ckpt, tmp / "first-token-build", tmp / "graphs", prepacked=threads), f"{mine}, {BUILT}"),
            (graphs_folder(ckpt, tmp / "first-token-step-onnx", tmp / "graphs"), f"{mine}, {WITHOUT}")],
            threads, effort, say)
    demo = demo_folder()
    if demo is not None:
        from gamexport.checkpoint import load_checkpoint

        demo_ckpt = load_checkpoint(demo)
        if demo_ckpt.sha256 != ckpt.sha256:
            [out["first_token_demo"]] = _first_tokens(
                cmd, [(graphs_folder(demo_ckpt, tmp / "first-token-demo", prepacked=threads),
                       f"a build folder of the shipped demo model's fp32 graphs with a manifest, written for this "
                       f"run, {BUILT}")], threads, effort, say)
    if build_source is not None:
        built = build_peak(cmd, build_source, tmp / "peak-build", threads, say)
        if built is not None:
            out["build"] = built
    return out
