"""The latency harness: warm-up, repeated runs, percentiles. Timing lives here, not inside runners.

Results are benchmarks, never pass/fail tests: timings on shared machines are noisy, so each measurement
carries its spread and a ``noisy`` flag, and comparisons are ratios taken in one run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

# The machine's facts live in the core (gamexport.machine); re-exported here for the harness's users.
from gamexport.machine import (BUSY_CORES, CPU_FLAGS, cpu_flags, cpu_name, cpu_seconds, llc_bytes,  # noqa: F401
                               machine_info, other_cpu_cores)

#: A measurement whose (p90 − p10) / p50 exceeds this is flagged as too noisy to trust.
NOISE_LIMIT = 0.30


@dataclass
class Timing:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int
    spread: float   # (p90 − p10) / p50
    noisy: bool

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(samples_s: list[float], warmup: int) -> Timing:
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    p10, p50, p90, p99 = np.percentile(ms, [10, 50, 90, 99])
    spread = float((p90 - p10) / p50) if p50 > 0 else 0.0
    return Timing(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(ms.mean()),
                  min_ms=float(ms.min()), runs=int(ms.size), warmup=warmup, spread=spread,
                  noisy=spread > NOISE_LIMIT)


def measure(fn: Callable[[], object], warmup: int = 3, runs: int = 20, max_seconds: float = 30.0) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then up to ``runs`` times timed (fewer if ``max_seconds`` passes)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(samples) >= 5:
            break
    return summarize(samples, warmup)


def measure_decode(step: Callable[[int], object], positions: range, warmup: int = 3) -> Timing:
    """Time one decode step per position (``step(pos)`` feeds one token at ``pos`` with carried state)."""
    for pos in list(positions)[:warmup]:
        step(pos)
    samples = []
    for pos in positions:
        t0 = time.perf_counter()
        step(pos)
        samples.append(time.perf_counter() - t0)
    return summarize(samples, warmup)

