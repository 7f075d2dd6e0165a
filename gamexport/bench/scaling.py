"""Scaling: the paper's Table 2 protocol at CPU scale — one GAM block and one Transformer block (pre-LN, 8 heads,
``scaled_dot_product_attention``), d 512, B 1, T from 256 to 8192, forward and forward+backward, in PyTorch.

Each point runs in a fresh process (``server``), its peak memory that process's ``VmHWM`` after a reset through
``/proc/self/clear_refs`` (``points``).
"""

from __future__ import annotations

from gamexport.bench.flops import gam_block_flops, transformer_block_flops
from gamexport.bench.points import PEAK_METHOD
from gamexport.bench.server import PointServer
from gamexport.bench.settings import SCALING_D, SCALING_HEADS, SCALING_KERNEL, SCALING_SLOTS, Effort, Progress


def scaling_lengths(min_t: int, max_t: int) -> list[int]:
    """T = min_t, 2·min_t, … ≤ max_t."""
    out, T = [], min_t
    while T <= max_t:
        out.append(T)
        T *= 2
    return out


def run_scaling(lengths: list[int], threads: int, effort: Effort, say: Progress,
                server: PointServer | None = None) -> tuple[dict, list[dict]]:
    """Every (block, mode, T) point, each in a fresh process; (section, skipped rows)."""
    specs = [{"block": block, "mode": mode, "T": T, "d": SCALING_D, "threads": threads,
              "runs": effort.scaling_runs, "warmup": 1, "max_seconds": effort.scaling_max_seconds}
             for mode in ("forward", "forward+backward") for block in ("gam", "transformer") for T in lengths]
    own = server is None
    server = server or PointServer()
    points, skipped = [], []
    try:
        for spec in specs:
            say(f"scaling: {spec['block']} block {spec['mode']}, d {SCALING_D}, B 1, T {spec['T']}")
            result = server.point(spec)
            if "error" in result:
                skipped.append({"runtime": "eager", "section": "scaling", "block": spec["block"],
                                "mode": spec["mode"], "T": spec["T"], "reason": result["error"]})
                continue
            flops = (gam_block_flops(spec["T"]) if spec["block"] == "gam" else transformer_block_flops(spec["T"]))
            flops *= 3 if spec["mode"] == "forward+backward" else 1
            points.append({"block": spec["block"], "mode": spec["mode"], "T": spec["T"], "batch": 1, **result,
                           "flops": flops, "achieved": flops / (result["p50_ms"] / 1e3) / 1e9, "unit": "GFLOP/s"})
    finally:
        if own:
            server.close()
    section = {"framework": "torch (eager)", "d_model": SCALING_D, "heads": SCALING_HEADS, "slots": SCALING_SLOTS,
               "kernel_size": SCALING_KERNEL, "batch": 1, "lengths": lengths,
               "flops": {"gam": "T·(4·S·d + 20·d² + 2·k·d)", "transformer": "T·(24·d² + 2·T·d), causal attention",
                         "forward+backward": "3 × forward"},
               "dropout": 0.0, "process": "a fresh process per point, forked from one that has only imported torch",
               "peak_memory": points[0]["peak_method"] if points else PEAK_METHOD,
               "points": points, "summary": scaling_summary(points)}
    return section, skipped


def scaling_summary(points: list[dict]) -> dict:
    """Growth of each block's time from T to 8·T (linear cost: 8), and the Transformer ÷ GAM time per T."""
    t = {(p["block"], p["mode"], p["T"]): p["p50_ms"] for p in points}
    growth, ratio = [], []
    for (block, mode, T), ms in sorted(t.items()):
        if (block, mode, T * 8) in t:
            growth.append({"block": block, "mode": mode, "from_T": T, "to_T": T * 8,
                           "time_ratio": t[(block, mode, T * 8)] / ms})
        if block == "gam" and ("transformer", mode, T) in t:
            ratio.append({"mode": mode, "T": T, "transformer_over_gam": t[("transformer", mode, T)] / ms,
                          "flop_ratio": transformer_block_flops(T) / gam_block_flops(T)})
    return {"growth_8x": growth, "transformer_over_gam": ratio}
