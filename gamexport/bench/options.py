"""The options of ``gamexport bench`` and their checks: one ``error:`` line for a bad one, before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gamexport.bench.settings import SCALING_MAX_T, SCALING_MIN_T, Progress
from gamexport.errors import InputError
from gamexport.targets import CPU_PRECISIONS


#: Sections a run can skip (the limits are always measured: every fraction needs them).
SECTIONS = ("prefill", "decode", "ceilings", "goals", "scaling", "training", "startup")


#: ONNX Runtime CPU precisions the bench measures (bf16 has no CPU kernels: a skipped row says so).
PRECISIONS = CPU_PRECISIONS


@dataclass
class BenchOptions:
    source: str | None = None        # checkpoint, folder holding one, or a build folder; None: seeded --preset
    preset: str | None = None        # seeded weights of this preset when no source is given (default paper)
    out: Path = Path("gamexport-bench")
    threads: int = 2
    precisions: tuple[str, ...] = PRECISIONS
    compile: bool = False            # also time torch.compile (minutes to compile on CPU)
    quick: bool = False
    min_t: int | None = None         # scaling: shortest T (default min(256, max_t))
    max_t: int = SCALING_MAX_T
    skip: tuple[str, ...] = ()
    progress: Progress = field(default=lambda msg: None)


def check_options(opts: BenchOptions) -> tuple[tuple[str, ...], int, int]:
    """(precisions, min_t, max_t) after checking every option; one-line InputError for a bad one."""
    from gamexport.limits import MAX_SCALING_T, MAX_THREADS, check_range

    if not isinstance(opts.threads, int):
        raise InputError(f"--threads must be an integer, got {opts.threads!r}", "e.g. --threads 2")
    check_range("--threads", opts.threads, 1, MAX_THREADS)
    unknown = [p for p in opts.precisions if p not in PRECISIONS + ("bf16",)]
    if unknown:
        raise InputError(f"unknown precision {unknown[0]!r}", f"choose from {', '.join(PRECISIONS)}")
    if not opts.precisions:
        raise InputError("no precision given", f"pass --precision with some of {', '.join(PRECISIONS)}")
    bad = [s for s in opts.skip if s not in SECTIONS]
    if bad:
        raise InputError(f"unknown section {bad[0]!r} in --skip", f"choose from {', '.join(SECTIONS)}")
    check_range("--max-t", opts.max_t, 1, MAX_SCALING_T)
    min_t = opts.min_t if opts.min_t is not None else min(SCALING_MIN_T, opts.max_t)
    if min_t < 1 or min_t > opts.max_t:
        raise InputError(f"--min-t {min_t} must be between 1 and --max-t {opts.max_t}",
                         "lower --min-t or raise --max-t")
    if opts.source is not None and opts.preset is not None:
        raise InputError("--preset chooses seeded weights and cannot be combined with a SOURCE",
                         "drop --preset (the config comes from the source)")
    if opts.preset is not None:
        from gamexport.config import preset

        preset(opts.preset)  # one line for an unknown name, before any work
    ordered = tuple(p for p in PRECISIONS + ("bf16",) if p in opts.precisions)
    return ordered, min_t, opts.max_t
