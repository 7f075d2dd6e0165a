"""An independent float64 NumPy statement of the paper's equations, used as the ground truth in parity checks.

Written from the equations, not from ``model.py``: the convolution is an explicit sum over taps, softmax and
LayerNorm are spelled out, GELU uses math.erf. It is slow and meant for short sequences.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .config import GAMConfig

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _gelu(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def reference_logits(weights: Mapping[str, np.ndarray], cfg: GAMConfig, ids: np.ndarray) -> np.ndarray:
    """Logits (B, T, V) in float64 for token ids (B, T) starting at position 0."""
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    emb = W.get("token_embedding.weight", W.get("head.weight"))
    ids = np.asarray(ids, dtype=np.int64)
    B, T = ids.shape
    k, eps = cfg.kernel_size, cfg.ln_eps
    x = emb[ids] + W["pos_embedding.weight"][np.arange(T)][None]         # (B, T, d)
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        h = _layer_norm(x, W[p + "ln1.weight"], W[p + "ln1.bias"], eps)
        # local[t] = bias + Σ_j w[:, j] · h[t - (k-1) + j], h[<0] = 0
        conv_w = W[p + "causal_conv.weight"][:, 0, :]                     # (d, k)
        local = np.broadcast_to(W[p + "causal_conv.bias"], h.shape).copy()
        for t in range(T):
            for j in range(k):
                src = t - (k - 1) + j
                if src >= 0:
                    local[:, t] += conv_w[:, j] * h[:, src]
        M = W[p + "memory_bank"]                                          # (S, d)
        glob = _softmax(h @ M.T) @ M
        g = h @ W[p + "gate.weight"].T + W[p + "gate.bias"]               # (B, T, 2d)
        d = cfg.d_model
        x = x + _sigmoid(g[..., :d]) * local + _sigmoid(g[..., d:]) * glob
        f = _layer_norm(x, W[p + "ln2.weight"], W[p + "ln2.bias"], eps)
        f = _gelu(f @ W[p + "ffn.0.weight"].T + W[p + "ffn.0.bias"])
        x = x + f @ W[p + "ffn.2.weight"].T + W[p + "ffn.2.bias"]
    x = _layer_norm(x, W["ln_f.weight"], W["ln_f.bias"], eps)
    return x @ emb.T
