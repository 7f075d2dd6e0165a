"""Training throughput: tokens/s of full training steps of GAM and of the Transformer width-matched to it, each in
a fresh process (``server``)."""

from __future__ import annotations

from gamexport.bench.server import PointServer
from gamexport.bench.settings import TRAIN_BATCH, TRAIN_SEQ, Effort, Progress
from gamexport.config import GAMConfig


def run_training(cfg: GAMConfig, threads: int, effort: Effort, say: Progress,
                 server: PointServer | None = None) -> tuple[dict | None, list[dict]]:
    """Training tokens/s of GAM and of the Transformer width-matched to it (``matched_config``), each in a fresh
    process: B = TRAIN_BATCH, T = min(TRAIN_SEQ, P), full AdamW steps; (section, skipped rows)."""
    from gamexport.errors import ConfigError
    from gamexport.training.baselines import matched_config

    T = min(TRAIN_SEQ, cfg.max_positions)
    try:
        tcfg = matched_config("transformer", cfg)
    except ConfigError as exc:
        return None, [{"runtime": "eager", "section": "training", "reason": str(exc)}]
    own = server is None
    server = server or PointServer()
    rows, skipped = [], []
    try:
        for model, mcfg in (("gam", cfg), ("transformer", tcfg)):
            say(f"training: {model} (d {mcfg.d_model}, {mcfg.n_params():,} parameters), B {TRAIN_BATCH}, T {T}, "
                "AdamW steps")
            spec = {"kind": "training", "model": model, "config": cfg.to_dict(), "batch": TRAIN_BATCH, "T": T,
                    "threads": threads, "runs": effort.training_runs, "warmup": 1,
                    "max_seconds": effort.scaling_max_seconds}
            result = server.point(spec)
            if "error" in result:
                skipped.append({"runtime": "eager", "section": "training", "model": model,
                                "reason": result["error"]})
                continue
            result["d_model"] = mcfg.d_model
            rows.append({"model": model, "batch": TRAIN_BATCH, "T": T, **result,
                         "tokens_per_s": TRAIN_BATCH * T / (result["p50_ms"] / 1e3)})
    finally:
        if own:
            server.close()
    tps = {r["model"]: r["tokens_per_s"] for r in rows}
    ratio = tps["gam"] / tps["transformer"] if len(tps) == 2 else None
    return {"framework": "torch (eager), fp32", "batch": TRAIN_BATCH, "T": T, "dropout": 0.0,
            "step": "forward, cross-entropy over all positions, backward, clip_grad_norm 1.0, AdamW",
            "process": "a fresh process per model, forked from one that has only imported torch",
            "rows": rows, "gam_over_transformer": ratio}, skipped
