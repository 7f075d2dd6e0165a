"""``gamexport build``: export, check parity, measure latency, write a build folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gamexport.layout import PRECISIONS, parse_list

from .common import DebugOption, ThreadsOption, run, say


def _profile(lo: str | None, opt: str | None, hi: str | None) -> dict | None:
    given = {k: v for k, v in (("min", lo), ("opt", opt), ("max", hi)) if v is not None}
    return given or None


def build(
    source: Annotated[str | None, typer.Argument(
        help="Checkpoint (.safetensors, .pt, .pth) or a folder holding one; omitted: the embedded default.",
        show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (replaced only by a complete, "
                                                          "passing build).")] = Path("gamexport-build"),
    preset: Annotated[str | None, typer.Option(help="Without SOURCE: build seeded untrained weights of this "
                                                    "preset (paper, small, tiny).")] = None,
    precision: Annotated[str, typer.Option(
        help=f"Graph precisions to write, comma-separated (fp32 always): {', '.join(PRECISIONS)}.")] = "fp32",
    engines: Annotated[str, typer.Option(
        help="Engines, comma-separated: onnxruntime, tensorrt (TensorRT needs --device cuda).")] = "onnxruntime",
    device: Annotated[str, typer.Option(help="cpu, or cuda for ONNX Runtime's CUDA provider and TensorRT.")] = "cpu",
    trt_min: Annotated[str | None, typer.Option("--min", help="TensorRT profile minimum, BATCHxSEQ.")] = None,
    trt_opt: Annotated[str | None, typer.Option("--opt", help="TensorRT profile optimum, BATCHxSEQ.")] = None,
    trt_max: Annotated[str | None, typer.Option("--max", help="TensorRT profile maximum, BATCHxSEQ.")] = None,
    cuda_graph: Annotated[bool, typer.Option(
        "--cuda-graph", help="TensorRT: capture decode steps into CUDA graphs and replay them.")] = False,
    triton: Annotated[Path | None, typer.Option(
        help="Also write a Triton Inference Server model repository here (see docs/serving.md).")] = None,
    int4_block: Annotated[int | None, typer.Option(
        "--int4-block", help="int4: weights per 4-bit block and scale, a power of two >= 16.",
        show_default="32")] = None,
    int4_head: Annotated[str | None, typer.Option(
        "--int4-head", help="int4: the tied head and embedding in int8 blocks, int4 blocks or fp32 "
                            "(docs/int4.md: int8 costs 4x less perplexity than int4 for 0.03x of the bytes).",
        show_default="int8")] = None,
    prepacked: Annotated[bool, typer.Option(
        "--prepacked/--no-prepacked", help="Also write step.prepacked.onnx: the fp32 step graph with its weights "
                                           "packed for this CPU and ONNX Runtime, which gamexport generate opens "
                                           "faster on this machine (and ignores on another). It holds every "
                                           "weight twice, as given and packed.")] = True,
    threads: ThreadsOption = None,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure latency.")] = True,
    prefill_len: Annotated[list[int] | None, typer.Option(
        "--prefill-len", help="Batch-1 prefill length to time (repeatable; default min(256, P)).")] = None,
    debug: DebugOption = False,
) -> None:
    """Export a GAM checkpoint to ONNX (prefill + streaming step graphs), check parity, measure latency.

    Writes OUT/{model.onnx, step.onnx, their .inlined twins, the same per extra precision (model.fp16.onnx, …),
    config.json, report.json, report.md, latency.png, manifest.json}. Exits 1 when a parity check fails (diagnostics kept in OUT.failed),
    2 on bad input.
    """

    def body() -> None:
        from gamexport.pipeline import BuildOptions, build as run_build
        from gamexport.pipeline.options import int4_plan

        precisions = parse_list(precision)
        result = run_build(BuildOptions(source=source, out=out, preset=preset, threads=threads,
                                        latency=latency, prefill_lengths=tuple(prefill_len or ()),
                                        precisions=precisions, engines=parse_list(engines), device=device,
                                        trt_profile=_profile(trt_min, trt_opt, trt_max), cuda_graph=cuda_graph,
                                        triton=triton, int4=int4_plan(precisions, int4_block, int4_head),
                                        prepacked=prepacked, progress=say))
        rep = result.report
        from gamexport.parity import Verdict

        print(f"parity: {Verdict.from_counts(rep['parity_counts']).headline()}")
        from gamexport.report import latency_line

        for row in rep["latency"]:
            print(latency_line(row))
        if any(row["noisy"] for row in rep["latency"]):
            say("warning: some timings are too noisy to trust ((p90-p10)/p50 > 0.3); is other work sharing "
                "the cores? Rerun on a quiet machine.")
        print(f"report: {result.out / 'report.md'}")

    run(body, debug)
