"""What ``gamexport build`` is asked (``BuildOptions``) and what it returns (``BuildResult``), and the checks of
those options that need no model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gamexport.config import GAMConfig
from gamexport.layout import PRECISIONS

Progress = Callable[[str], None]


@dataclass
class BuildOptions:
    source: str | None = None      # checkpoint file/folder; None: the embedded default
    out: Path = Path("gamexport-build")
    preset: str | None = None      # seeded weights of this preset when no source is given
    threads: int | None = None     # ONNX Runtime and torch intra-op threads (None: all cores)
    latency: bool = True
    latency_runs: int = 20
    prefill_lengths: tuple[int, ...] = ()  # batch-1 prefill lengths to time; () = (min(256, P),)
    precisions: tuple[str, ...] = ("fp32",)  # graph precisions to write; fp32 is always built
    engines: tuple[str, ...] = ("onnxruntime",)
    device: str = "cpu"
    trt_profile: dict | None = None   # {"min": "1x1", "opt": "1x256", "max": "8x256"} for TensorRT
    cuda_graph: bool = False          # TensorRT decode steps replay CUDA graphs (TrtRunner(cuda_graph=True))
    triton: Path | None = None        # also write a Triton model repository here (fp32)
    int4: object | None = None        # graph.int4.Int4Plan of the int4 graphs (None: Int4Plan(), docs/int4.md)
    prepacked: bool = True            # also the fp32 step graph pre-packed for this CPU (gamexport generate's start)
    progress: Progress = field(default=lambda msg: None)


@dataclass
class BuildResult:
    out: Path
    report: dict
    passed: bool


def check_precisions(precisions: tuple[str, ...]) -> tuple[str, ...]:
    """The asked-for precisions in the vocabulary's order, fp32 always among them; an unknown one is an error."""
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        from gamexport.errors import InputError
        raise InputError(f"unknown precision {unknown[0]!r}", f"choose from {', '.join(PRECISIONS)}")
    return tuple(p for p in PRECISIONS if p == "fp32" or p in precisions)


def int4_plan(precisions: tuple[str, ...], block_size: int | None, head: str | None):
    """The INT4 plan of ``--int4-block`` / ``--int4-head`` (None: the default's), or None without them; either
    option without ``int4`` among the precisions is an error (it would change nothing)."""
    from gamexport.errors import InputError

    if block_size is None and head is None:
        return None
    if "int4" not in precisions:
        raise InputError("--int4-block and --int4-head shape the int4 graphs, and int4 was not asked for",
                         "add int4 to --precision, or drop the option")
    from gamexport.graph.int4 import HEADS, Int4Plan

    if head is not None and head not in HEADS:
        raise InputError(f"--int4-head {head!r} is not one of {', '.join(HEADS)}",
                         "choose int8 (the default: 8-bit blocks), int4 (4-bit blocks) or fp32")
    defaults = Int4Plan()
    try:
        return Int4Plan(block_size=defaults.block_size if block_size is None else block_size,
                        head=defaults.head if head is None else head)
    except ValueError as exc:
        raise InputError(f"--int4-block: {exc}", "pass a power of two, 16 or more (32 is the default)") from None


def check_prefill_lengths(cfg: GAMConfig, lengths: tuple[int, ...]) -> tuple[int, ...]:
    """The prefill lengths to time, each within the model's positions; () means (min(256, P),)."""
    from gamexport.errors import InputError

    for T in lengths:
        if not 1 <= T <= cfg.max_positions:
            raise InputError(f"prefill length {T} is outside 1..{cfg.max_positions}",
                             f"choose lengths within the model's {cfg.max_positions} positions")
    return lengths or (min(256, cfg.max_positions),)
