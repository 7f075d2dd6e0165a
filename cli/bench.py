"""``gamexport bench``: measure every runtime and precision against this machine's limits, in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gamexport.layout import parse_list
from gamexport.targets import CPU_PRECISIONS
from gamexport.limits import MAX_SCALING_T, MAX_THREADS

from .common import DebugOption, run, say


def bench(
    source: Annotated[str | None, typer.Argument(
        help="A build folder, a checkpoint (.safetensors, .pt, .pth) or a folder holding one; omitted: seeded "
             "weights of --preset.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for bench.json and the plots.")] = Path(
        "gamexport-bench"),
    preset: Annotated[str | None, typer.Option(help="Without SOURCE: seeded untrained weights of this preset "
                                                    "(paper, small, tiny); default paper.")] = None,
    threads: Annotated[int, typer.Option("--threads", "-j", min=1, max=MAX_THREADS,
                                         help=f"CPU threads for ONNX Runtime and torch, 1..{MAX_THREADS} (4 × this "
                                              "machine's CPUs), stated in every row.")] = 2,
    precision: Annotated[str, typer.Option(
        help=f"ONNX Runtime precisions, comma-separated: {', '.join(CPU_PRECISIONS)}.")] = ",".join(CPU_PRECISIONS),
    compile_: Annotated[bool, typer.Option("--compile", help="Also time torch.compile (minutes to compile on "
                                                            "CPU).")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: few runs, numbers not to be quoted.")] = False,
    min_t: Annotated[int | None, typer.Option("--min-t", min=1, max=MAX_SCALING_T, help=(
        f"Scaling: shortest sequence, 1..{MAX_SCALING_T} (default min(256, --max-t))."), show_default=False)] = None,
    max_t: Annotated[int, typer.Option("--max-t", min=1, max=MAX_SCALING_T, help=(
        f"Scaling: longest sequence, 1..{MAX_SCALING_T} (the Transformer's attention needs up to 8 heads·T²·4 "
        "bytes)."))] = 8192,
    skip: Annotated[str, typer.Option(help="Sections to leave out, comma-separated: prefill, decode, ceilings, "
                                           "goals, scaling, training, startup.")] = "",
    debug: DebugOption = False,
) -> None:
    """Benchmark against this machine's limits: prefill and decode per runtime and precision, the performance
    goals scored in paired rounds (each goal's rows timed in alternation with its limit's kernels, so that a host
    changing speed moves both), GAM vs Transformer block scaling, GAM vs Transformer training throughput,
    start-up.

    Writes OUT/{bench.json, scaling.png, fractions.png} and prints a table; progress goes to stderr. A benchmark,
    never a test: it exits 0 whatever the numbers, and warns when they are too noisy to trust. Run it on a quiet
    machine (docs/benchmarks.md).
    """

    def body() -> None:
        from gamexport.bench.command import BenchOptions, render_table, run_bench

        result = run_bench(BenchOptions(source=source, preset=preset, out=out, threads=threads,
                                        precisions=parse_list(precision), compile=compile_, quick=quick, min_t=min_t,
                                        max_t=max_t, skip=parse_list(skip), progress=say))
        print(render_table(result))
        print(f"bench: {out / 'bench.json'}" + "".join(f", {out / p}" for p in result["plots"]))
        if result["noisy"]:
            say(f"warning: {len(result['noisy'])} timings are too noisy to trust ((p90-p10)/p50 > 0.3: "
                f"{', '.join(result['noisy'][:4])}{', …' if len(result['noisy']) > 4 else ''}); is other work "
                "sharing the cores? Rerun on a quiet machine.")
        if quick:
            say("note: --quick is a smoke run; quote only a full run on a quiet machine.")

    run(body, debug)
