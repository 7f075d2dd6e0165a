"""INT8 calibration: the largest |activation| the eager fp32 model produces at every quantized point.

One table serves the prefill and the step graph (so chunk steps still equal prefill). The activations are the
inputs of the weight MatMuls: each block's LN1 output (``act.h``, feeding the memory scores and the gate), LN2
output (``act.hn``) and GELU output (``act.gelu``), and the final LayerNorm's output (``act.x_f``, the head).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from .config import GAMConfig


def calibrate(cfg: GAMConfig, weights: Mapping[str, np.ndarray], batches: Iterable[np.ndarray]) -> dict[str, float]:
    """Max |x| per quantized activation over ``batches`` of token ids (each (B, T), from position 0)."""
    import torch

    from .model import build_model

    model = build_model(cfg, weights)
    amax: dict[str, float] = {}

    def watch(module, name: str) -> None:
        def hook(_mod, _inp, out):
            amax[name] = max(amax.get(name, 0.0), float(out.detach().abs().max()))
        module.register_forward_hook(hook)

    for i, block in enumerate(model.blocks):
        watch(block.ln1, f"blocks.{i}.act.h")
        watch(block.ln2, f"blocks.{i}.act.hn")
        watch(block.ffn[1], f"blocks.{i}.act.gelu")
    watch(model.ln_f, "act.x_f")
    seen = 0
    with torch.inference_mode():
        for ids in batches:
            model.prefill(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
            seen += 1
    if not seen:
        raise ValueError("calibration needs at least one batch of token ids")
    return dict(sorted(amax.items()))
