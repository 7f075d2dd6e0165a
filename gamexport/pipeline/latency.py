"""The build's latency stage: the machine's limits, batch-1 prefill and decode timed for eager and every runner of
the plan in one run, and the latency plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gamexport.bench.limits import BUILD_LIMITS, measure_limits
from gamexport.config import GAMConfig
from gamexport.targets import TARGETS

from .options import Progress, check_prefill_lengths


def build_limits(cfg: GAMConfig, pairs: list[tuple[str, str]], threads: int | None, progress: Progress) -> dict:
    """The machine's limits as ``gamexport bench`` defines them, measured in the build's own run (fewer runs),
    at the precisions the plan runs on the CPU."""
    cpu_precisions = tuple(p for runtime, p in pairs if TARGETS[runtime].device == "cpu") or ("fp32",)
    return measure_limits(cfg, cpu_precisions, threads or 1, BUILD_LIMITS, progress)


def latency_rows(eager, ort_runners: list, cfg: GAMConfig, threads: int | None, runs: int,
                 progress: Progress, prefill_lengths: tuple[int, ...] = ()) -> list[dict]:
    """Batch-1 prefill at each length (default min(256, P)) and per-token decode with state, for eager and
    ONNX Runtime in one run; ``speedup_vs_eager`` compares rows of the same mode and length. Report dicts of
    ``gamexport.parity.rows.LatencyRow``."""
    from gamexport.bench import measure, measure_decode
    from gamexport.parity.rows import LatencyRow

    lengths = check_prefill_lengths(cfg, prefill_lengths)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, cfg.max_positions), dtype=np.int64)
    rows = []
    for runner in (eager, *ort_runners):
        runner.check_finite = False  # time the backend alone, the same work on every row (parity checked outputs)
        for T in lengths:
            progress(f"latency: {runner.runtime} {runner.precision} prefill, batch 1 × {T} tokens")
            timing = measure(lambda: runner.prefill(ids[:, :T]), warmup=2, runs=runs)
            rows.append(LatencyRow(runner.runtime, runner.precision, "prefill", 1, T, timing.as_dict(), threads))
        progress(f"latency: {runner.runtime} {runner.precision} decode, one token per step with state")
        n = min(64, cfg.max_positions - 1)
        state = {"s": runner.prefill(ids[:, :1])[1]}

        def one(pos: int, runner=runner, state=state) -> None:
            state["s"] = runner.step(ids[:, pos:pos + 1], np.array([[pos]], np.int64), state["s"])[1]

        timing = measure_decode(one, range(1, 1 + n))
        rows.append(LatencyRow(runner.runtime, runner.precision, "decode", 1, 1, timing.as_dict(), threads))
    base = {(r.mode, r.seq_len): r.p50_ms for r in rows if r.runtime == eager.runtime}
    for r in rows:
        r.speedup_vs_eager = base[(r.mode, r.seq_len)] / r.p50_ms
    return [r.to_dict() for r in rows]




def write_plot(latency: list[dict], path: Path) -> bool:
    """Bar chart of p50 latency per runtime for prefill and decode; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import io

    modes = ["prefill", "decode"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, mode in zip(axes, modes):
        rows = [r for r in latency if r["mode"] == mode]
        names = [f"{r['runtime']}\n{r['precision']}" for r in rows]
        values = [r["p50_ms"] for r in rows]
        errs = [[r["p50_ms"] - r.get("min_ms", r["p50_ms"]) for r in rows],
                [r["p90_ms"] - r["p50_ms"] for r in rows]]
        ax.bar(names, values, yerr=errs, color=["#888888", "#2a7ab9", "#d9822b", "#3a9a4a"][: len(rows)])
        if rows:
            ax.set_title(f"{mode}: batch {rows[0]['batch']} × {rows[0]['seq_len']} tokens")
        ax.set_ylabel("p50 ms (bars: min..p90)")
    fig.suptitle("gamexport build latency (lower is better)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    from gamexport.fsutil import atomic_write_bytes
    atomic_write_bytes(path, buf.getvalue())
    return True

