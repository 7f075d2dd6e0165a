"""Ceilings: what the kernels allow before any graph overhead — the model's weight MatMuls alone, in one ONNX
Runtime graph (fp32 MatMul and the integer GEMM), at every M a goal is scored at: a decode step's M = 1, a batched
decode step's M = 32, the prefills' M = 64 and min(256, P)."""

from __future__ import annotations

import gc

from gamexport.bench.flops import weight_bytes_per_step, weight_matmul_shapes
from gamexport.bench.kernels import weight_matmuls_calls
from gamexport.bench.limits import fraction
from gamexport.bench.settings import BATCHED_M, PREFILL_LENGTHS, Effort, Progress
from gamexport.config import GAMConfig


def measure_ceilings(cfg: GAMConfig, threads: int, effort: Effort, say: Progress) -> dict:
    """What the kernels allow before any graph overhead: the model's weight MatMuls alone (fp32 MatMul and the
    integer GEMM), at M = 1 (a decode step), M = 32 (a batched decode step, :data:`BATCHED_M`) and the prefill
    lengths (64 and 256), each capped at P: :func:`ceiling_Ms`.

    ``fp32_decode_fraction`` (set by :func:`refit_fractions`, against the run's final limits) is the
    bandwidth-roofline fraction a step would reach if everything but its weight MatMuls were free (h·Mᵀ and
    softmax·M read the memory bank in two layouts, which the roofline counts once);
    ``int8_speedup`` at each M is the fastest INT8 ÷ fp32 a graph built on these kernels can reach.
    """
    from gamexport.bench.timing import measure

    rows = []
    for kind in ("fp32", "int8"):
        calls = weight_matmuls_calls(cfg, kind, threads, ceiling_Ms(cfg), seed=3)
        for M, call in calls.items():
            say(f"ceilings: the model's {len(weight_matmul_shapes(cfg))} weight MatMuls alone, {kind}, M = {M}")
            timing = measure(call, warmup=effort.warmup, runs=effort.runs, max_seconds=effort.max_seconds)
            rows.append({"precision": kind, "M": M, **timing.as_dict()})
        del calls
        gc.collect()
    t = {(r["precision"], r["M"]): r["p50_ms"] for r in rows}
    Ms = sorted({r["M"] for r in rows})
    return {"what": "the model's weight MatMuls (per layer h·Mᵀ, softmax·M, gate, FFN×2; the head) in one ONNX "
                    "Runtime graph, each fed by a graph input, nothing else: fp32 MatMul and int8 "
                    "DynamicQuantizeMatMul",
            "matmuls": len(weight_matmul_shapes(cfg)), "rows": rows,
            "int8_speedup": {str(M): t[("fp32", M)] / t[("int8", M)] for M in Ms}}


def ceiling_Ms(cfg: GAMConfig) -> list[int]:
    """The M of every ceilings row: 1, the batched decode's 32 and the prefill lengths, capped at P."""
    return sorted({min(M, cfg.max_positions) for M in (1, BATCHED_M, *PREFILL_LENGTHS)})


def ceiling_decode_fraction(cfg: GAMConfig, ceilings: dict, limits: dict) -> float:
    """The bandwidth-roofline step time over the fp32 weight MatMuls' own time at M = 1."""
    roofline_ms = weight_bytes_per_step(cfg, "fp32") / (limits["bandwidth"]["gbps"] * 1e9) * 1e3
    return roofline_ms / next(r["p50_ms"] for r in ceilings["rows"] if r["precision"] == "fp32" and r["M"] == 1)


def ceiling_against_limits(cfg: GAMConfig, row: dict, limits: dict) -> dict:
    """A ceilings row against the limit it could beat: at M = 32 its GFLOP/s against the batched limit (the int8
    rows: int8-dyn's batched limit where measured, else int8's, else fp32's), as batched decode is scored; at other
    M > 1 its GFLOP/s (the int8 rows count the same FLOPs) against compute — for the int8 rows (DynamicQuantizeMatMul) the INT8 compute limit, int8-dyn's where it was
    measured (the same kernel family), else int8's, else fp32's; at M = 1 the bytes its weights hold (the memory bank twice, as the graph holds it) per second
    against the bandwidth over that precision's bytes. {} for an int8 row at M = 1 when no INT8 bandwidth was
    measured (its weights may sit in cache: the fp32 bandwidth is no limit for them)."""
    elements = sum(K * N for K, N in weight_matmul_shapes(cfg))
    if row["M"] == BATCHED_M:
        by_precision = limits.get("batched_by_precision") or {}
        key = "fp32" if row["precision"] == "fp32" else next((p for p in ("int8-dyn", "int8") if p in by_precision),
                                                            "fp32")
        row["limit_precision"] = key
        limit = (by_precision.get(key) or limits["batched"])["gflops"]
        achieved, unit, name = 2 * row["M"] * elements / (row["p50_ms"] / 1e3) / 1e9, "GFLOP/s", "batched"
    elif row["M"] > 1:
        flops = 2 * row["M"] * elements
        by_precision = limits.get("compute_by_precision") or {}
        key = "fp32" if row["precision"] == "fp32" else next((p for p in ("int8-dyn", "int8") if p in by_precision),
                                                            "fp32")
        row["limit_precision"] = key
        achieved, unit, name, limit = flops / (row["p50_ms"] / 1e3) / 1e9, "GFLOP/s", "compute", \
            by_precision.get(key, limits["compute"])["gflops"]
    else:
        by_precision = limits["bandwidth_by_precision"]
        key = "fp32" if row["precision"] == "fp32" else next((p for p in ("int8", "int8-dyn") if p in by_precision),
                                                            None)
        if key is None:
            return {}
        outputs = sum(N for _, N in weight_matmul_shapes(cfg))
        nbytes = 4 * elements if key == "fp32" else elements + 5 * outputs   # int8 weights + fp32 scale + zero point
        achieved, unit, name, limit = nbytes / (row["p50_ms"] / 1e3) / 1e9, "GB/s", "bandwidth", \
            by_precision[key]["gbps"]
        row["bandwidth_precision"] = key
    return {"achieved": achieved, "unit": unit, "limit": name, "limit_value": limit,
            "fraction": fraction(achieved, limit)}
