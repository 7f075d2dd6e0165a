"""What runs inside one fresh measuring process: a scaling point (one block, one mode, one T) or a training
point (full AdamW steps of one language model), and the peak memory of that process.

The blocks: GAM's own ``GAMBlock`` and the baselines' ``TransformerBlock`` (``gamexport.training.baselines``,
the one definition), both at the scaling shape of ``settings``.
"""

from __future__ import annotations

from gamexport.bench.settings import SCALING_D, SCALING_HEADS, SCALING_KERNEL, SCALING_SLOTS
from gamexport.config import GAMConfig


def make_transformer_block(d: int = SCALING_D, n_heads: int = SCALING_HEADS):
    """The baselines' pre-LN Transformer block, the one definition (``gamexport.training.baselines``):
    x + proj(SDPA_causal(LN1 x)); x + MLP(LN2 x) with a 4d GELU MLP; dropout 0, as the GAM block's."""
    from gamexport.training.baselines import TransformerBlock, TransformerConfig

    return TransformerBlock(TransformerConfig(vocab_size=1, d_model=d, n_layers=1, n_heads=n_heads, dropout=0.0))


def make_gam_block(d: int = SCALING_D):
    """One GAM block (``gamexport.model.GAMBlock``) at the scaling shape, dropout 0."""
    from gamexport.model import GAMBlock

    return GAMBlock(GAMConfig(d_model=d, n_slots=SCALING_SLOTS, kernel_size=SCALING_KERNEL, dropout=0.0))


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


PEAK_METHOD = ("peak RSS of the point's own process: VmHWM from /proc/self/status after resetting it through "
               "/proc/self/clear_refs once the block and input exist (peak_extra_mb = that peak − the RSS then)")


PEAK_FALLBACK = "getrusage(RUSAGE_SELF).ru_maxrss of the point's own process (includes its start-up)"


def scaling_point(spec: dict) -> dict:
    """Time one (block, mode, T) point in this process; runs inside a fresh process (see ``run_scaling``)."""
    import resource

    import torch

    from gamexport.bench.timing import measure

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    T, d = int(spec["T"]), int(spec.get("d", SCALING_D))
    block = make_gam_block(d) if spec["block"] == "gam" else make_transformer_block(d)
    x = torch.randn(1, T, d)
    past = torch.zeros(1, SCALING_KERNEL - 1, d)
    call = (lambda: block(x, past)[0]) if spec["block"] == "gam" else (lambda: block(x))
    if spec["mode"] == "forward":
        block.eval()

        def fn():
            with torch.inference_mode():
                call()
    else:
        block.train()

        def fn():
            block.zero_grad(set_to_none=True)
            call().sum().backward()
    rss0 = _proc_status_kib("VmRSS")
    exact = _reset_peak_rss()
    timing = measure(fn, warmup=int(spec.get("warmup", 1)), runs=int(spec["runs"]),
                     max_seconds=float(spec["max_seconds"]))
    if exact:
        peak = _proc_status_kib("VmHWM") or 0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**timing.as_dict(), "peak_rss_mb": peak / 1024,
            "peak_extra_mb": (peak - rss0) / 1024 if exact and rss0 is not None else None,
            "peak_method": PEAK_METHOD if exact else PEAK_FALLBACK, "threads": torch.get_num_threads()}


def training_point(spec: dict) -> dict:
    """Time full training steps (forward, cross-entropy, backward, gradient clipping, AdamW) of one language model
    in this process; runs inside a fresh process (see ``run_training``)."""
    import torch

    from gamexport.bench.timing import measure
    from gamexport.training.baselines import build_lm

    torch.set_num_threads(int(spec["threads"]))
    cfg = GAMConfig.from_dict(spec["config"]).replace(dropout=0.0)
    model = build_lm(spec["model"], cfg, seed=0).train()
    B, T = int(spec["batch"]), int(spec["T"])
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def fn():
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    timing = measure(fn, warmup=int(spec.get("warmup", 1)), runs=int(spec["runs"]),
                     max_seconds=float(spec["max_seconds"]))
    return {**timing.as_dict(), "parameters": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads()}


def run_point(spec: dict) -> dict:
    """One measurement of a fresh process: a scaling point or a training point."""
    return training_point(spec) if spec.get("kind") == "training" else scaling_point(spec)
