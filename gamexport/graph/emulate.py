"""An independent emulation, in PyTorch, of the half-precision plan the graph builder writes.

It follows the plan's rules (``HALF_WEIGHTS`` in half precision, MatMuls in half, LayerNorm / Softmax /
sigmoid gates / residual / conv in fp32) with torch's own half and bfloat16 arithmetic on the CPU, so a graph
can be checked to compute *that* plan: a graph that silently stayed fp32 is further from the emulation than the
emulation tolerance, and a graph that dropped a fp32 island drifts too.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..config import GAMConfig
from .builder import is_half_weight


def emulate_logits(weights: Mapping[str, np.ndarray], cfg: GAMConfig, ids: np.ndarray,
                   precision: str) -> np.ndarray:
    """Logits (B, T, V) float32 of ``ids`` (B, T) from position 0 under the fp16/bf16 plan (or fp32)."""
    import torch
    import torch.nn.functional as F

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    W = {}
    for name, value in weights.items():
        t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        W[name] = t.to(dt) if is_half_weight(name) else t
    idx = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    B, T = idx.shape
    d, k, eps = cfg.d_model, cfg.kernel_size, cfg.ln_eps
    with torch.no_grad():
        x = W["token_embedding.weight"][idx].float() + W["pos_embedding.weight"][:T]
        for i in range(cfg.n_layers):
            p = f"blocks.{i}."
            h = F.layer_norm(x, (d,), W[p + "ln1.weight"], W[p + "ln1.bias"], eps)          # fp32
            padded = F.pad(h.transpose(1, 2), (k - 1, 0))
            local = F.conv1d(padded, W[p + "causal_conv.weight"], W[p + "causal_conv.bias"],
                             groups=d).transpose(1, 2)                                       # fp32
            hm = h.to(dt)
            M = W[p + "memory_bank"]
            weights_ = torch.softmax((hm @ M.T).float(), dim=-1)                            # fp32 softmax
            glob = (weights_.to(dt) @ M).float()
            g = (hm @ W[p + "gate.weight"].T + W[p + "gate.bias"]).float()
            x = x + torch.sigmoid(g[..., :d]) * local + torch.sigmoid(g[..., d:]) * glob
            hn = F.layer_norm(x, (d,), W[p + "ln2.weight"], W[p + "ln2.bias"], eps).to(dt)
            u = F.gelu(hn @ W[p + "ffn.0.weight"].T + W[p + "ffn.0.bias"])
            x = x + (u @ W[p + "ffn.2.weight"].T + W[p + "ffn.2.bias"]).float()
        xf = F.layer_norm(x, (d,), W["ln_f.weight"], W["ln_f.bias"], eps).to(dt)
        return (xf @ W["token_embedding.weight"].T).float().numpy()


def round_weights(weights: Mapping[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    """The fp32 weights a half-precision graph effectively holds: HALF_WEIGHTS rounded to fp16/bf16 and back.

    Running the fp32 model on these emulates "half-precision weights, fp32 compute" — what ONNX Runtime's CPU
    provider does with an fp16 graph (it inserts casts around ops it has no fp16 kernel for).
    """
    import ml_dtypes  # a dependency of onnx

    half = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}[precision]
    return {k: (v.astype(half).astype(np.float32) if is_half_weight(k) else v) for k, v in weights.items()}
