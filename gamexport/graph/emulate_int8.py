"""An independent NumPy emulation of the INT8 plan the graph builder writes (fake quantization).

The same plan as ``builder.build_graph(..., precision="int8")``, from the same numbers: the int8 weights and their
per-channel scales of ``builder.int8_initializers`` (dequantized: ``q · scale``), and each activation quantized
per tensor with the calibration table's scale (``clip(rint(x / s), -128, 127) · s``, what a
QuantizeLinear → DequantizeLinear pair computes) at the points the graph quantizes: each block's LN1 output
(memory scores, gate), LN2 output and GELU output (the FFN), and the final LayerNorm's output (the head). The
memory read's softmax probabilities, LayerNorm, the conv, the gates and the residual stay fp32.

A graph that computes this plan differs from it only by where a value lies within float rounding of a
quantization step boundary; a wrong scale (one tensor 3 % off), a dropped bias or a mis-wired op moves it far
more (the zoo in tests/test_zoo.py measures both).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ..config import GAMConfig
from ..reference import _layer_norm, _softmax  # the paper's float64 LayerNorm and softmax

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _fake_quant(x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(x / scale), -128, 127) * scale


def _deq(table: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """A weight as the graph dequantizes it: int8 values × the per-column (last axis) scales."""
    return table[name].astype(np.float64) * table[name + ".scale"].astype(np.float64)[None, :]


def _causal_conv(W: Mapping[str, object], p: str, h: np.ndarray, past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Layer ``p``'s causal depthwise conv (float in every plan) of ``h`` (B, T, d) after ``past`` (B, k-1, d):
    (the local path (B, T, d), the new state (B, k-1, d))."""
    T, k1 = h.shape[1], past.shape[1]
    hcat = np.concatenate([past, h], axis=1)                                      # (B, k-1+T, d)
    conv_w = W[p + "causal_conv.weight"][:, 0, :]                                 # (d, k)
    local = W[p + "causal_conv.bias"] + sum(hcat[:, j:j + T] * conv_w[:, j] for j in range(k1 + 1))
    return local, hcat[:, -k1:]


def plan_forward(cfg: GAMConfig, W: Mapping[str, np.ndarray], x: np.ndarray, position: int, state: np.ndarray | None,
                 mm, head: str, last_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The GAM forward pass the INT8 and INT4 plans share, from the token embeddings ``x`` (B, T, d): LayerNorms,
    the conv, softmax, the gates, GELU, biases and the residual stream in float64; every weight MatMul through
    ``mm(activation, layer prefix, input, weight name)`` — the plan's quantization (activation is one of
    ``h``, ``probs``, ``hn``, ``gelu``, ``x_f``). (logits (B, T, V), state (B, L, k-1, d)) as float32;
    ``last_only``: the head on the last position only, (B, 1, V), as a step graph computes it (a run-time
    activation scale of the head's input then comes from that position alone)."""
    B, T, d = x.shape
    eps = cfg.ln_eps
    x = x + W["pos_embedding.weight"][position + np.arange(T)][None]
    past_all = (np.zeros((B, cfg.n_layers, cfg.state_len, d)) if state is None
                else np.asarray(state, dtype=np.float64))
    presents = []
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        h = _layer_norm(x, W[p + "ln1.weight"], W[p + "ln1.bias"], eps)
        local, present = _causal_conv(W, p, h, past_all[:, i])
        presents.append(present)
        glob = mm("probs", p, _softmax(mm("h", p, h, "memory_bank.qT")), "memory_bank.q")
        g = mm("h", p, h, "gate.weight.qT") + W[p + "gate.bias"]
        sig = 1.0 / (1.0 + np.exp(-g))
        x = x + sig[..., :d] * local + sig[..., d:] * glob
        hn = _layer_norm(x, W[p + "ln2.weight"], W[p + "ln2.bias"], eps)
        u = mm("hn", p, hn, "ffn.0.weight.qT") + W[p + "ffn.0.bias"]
        a = 0.5 * u * (1.0 + _erf(u / math.sqrt(2.0)))
        x = x + mm("gelu", p, a, "ffn.2.weight.qT") + W[p + "ffn.2.bias"]
    xf = _layer_norm(x[:, -1:] if last_only else x, W["ln_f.weight"], W["ln_f.bias"], eps)
    logits = mm("x_f", "", xf, head)
    return logits.astype(np.float32), np.stack(presents, axis=1).astype(np.float32)


def int8_plan(cfg: GAMConfig, table: Mapping[str, np.ndarray], ids: np.ndarray, position: int = 0,
              state: np.ndarray | None = None, last_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(logits (B, T, V), state (B, L, k-1, d)) of ``ids`` (B, T) starting at ``position`` after ``state`` (the
    zero state when None) under the INT8 plan; ``table`` is ``builder.int8_initializers(cfg, weights, calib)``."""
    W = {k: (np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v))
         for k, v in table.items()}
    emb = "token_embedding.weight"
    ids = np.asarray(ids, dtype=np.int64)
    x = W[emb + ".q_fp16"][ids] * W[emb + ".qT.scale"][ids][..., None]
    # Static Q/DQ: each activation at its calibrated scale; the softmax probabilities stay fp32 (the plan's island).
    scale = {"h": "act.h.scale", "hn": "act.hn.scale", "gelu": "act.gelu.scale"}

    def mm(act: str, p: str, v: np.ndarray, weight: str) -> np.ndarray:
        if act == "probs":
            return v @ _deq(W, p + weight)
        name = "act.x_f.scale" if act == "x_f" else p + scale[act]
        return _fake_quant(v, float(W[name])) @ _deq(W, p + weight)
    return plan_forward(cfg, W, x, position, state, mm, head=emb + ".qT", last_only=last_only)


# ---- dynamic INT8: what ONNX Runtime's quantize_dynamic makes of the fp32 graph --------------------------------
def quantize_weight_dynamic(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A MatMul weight ``w`` (K, N) as ``onnxruntime.quantization.quantize_dynamic`` quantizes it with the options
    of ``engines.ort.write_int8_dynamic`` (int8, per channel, no reduce_range): one symmetric scale per output
    column, ``max|w[:, j]| / 127`` (stored as float32), values ``rint(w / scale)`` in float32 arithmetic (the
    quantizer's own), zero point 0. Returns (int8 values as float64, scales (N,) float64)."""
    w32 = np.asarray(w, dtype=np.float32)
    absmax = np.abs(w32).max(axis=0).astype(np.float64)
    scale = (2.0 * absmax / 254.0).astype(np.float32)
    scale[scale < np.finfo(np.float32).tiny] = 1.0   # an all-zero column: the quantizer's scale 1
    q = np.clip(np.rint(w32 / scale[None, :]), -128, 127)
    return q.astype(np.float64), scale.astype(np.float64)


def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """ONNX ``DynamicQuantizeLinear`` of one whole tensor (one call's activation): uint8, asymmetric; the range
    is [min(x), max(x)] widened to include 0, scale = range / 255, zero point = rint(−min / scale) saturated to
    0..255, values rint(x / scale) + zero point saturated (rint: round half to even). Returns (values, scale,
    zero point)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = float(np.clip(np.rint(-lo / scale), 0, 255))
    return np.clip(np.rint(x / scale) + zero, 0, 255), scale, zero


def _dyn_matmul(x: np.ndarray, w: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``x @ W`` as the dynamically quantized graph computes it: x quantized per tensor at run time, the integer
    product (exact), then × (x scale · the column's weight scale)."""
    q, scale = w
    xq, x_scale, x_zero = dynamic_quantize(x)
    return ((xq - x_zero) @ q) * (x_scale * scale)


def int8_dynamic_weights(cfg: GAMConfig, weights: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The checkpoint's fp32 weights with every weight MatMul's operand quantized as ``quantize_dynamic`` does
    (:func:`quantize_weight_dynamic`, on the (K, N) operand the graph multiplies by); the rest float64."""
    W: dict[str, object] = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        bank = np.asarray(weights[p + "memory_bank"], dtype=np.float32)               # (S, d)
        W[p + "memory_bank.qT"] = quantize_weight_dynamic(bank.T)                      # scores: h · Mᵀ
        W[p + "memory_bank.q"] = quantize_weight_dynamic(bank)                         # read: p · M
        for name in ("gate.weight", "ffn.0.weight", "ffn.2.weight"):                   # Linear: x · Wᵀ
            W[p + name + ".qT"] = quantize_weight_dynamic(np.asarray(weights[p + name], np.float32).T)
    W["head.qT"] = quantize_weight_dynamic(np.asarray(weights["token_embedding.weight"], np.float32).T)
    return W


def int8_dynamic_plan(cfg: GAMConfig, W: Mapping[str, object], ids: np.ndarray, position: int = 0,
                      state: np.ndarray | None = None, last_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(logits (B, T, V), state (B, L, k-1, d)) of one call of the int8-dyn graph on ``ids`` (B, T) from
    ``position`` after ``state``; ``W`` is :func:`int8_dynamic_weights`. Every activation that feeds a weight
    MatMul is quantized over this call's whole tensor, as the graph does at run time — so a step graph fed in
    chunks must be emulated chunk by chunk. LayerNorm, the conv, softmax, the gates, GELU, biases and the residual
    stay float (the fp32 graph's ops)."""
    x = W["token_embedding.weight"][np.asarray(ids, dtype=np.int64)]

    def mm(act: str, p: str, v: np.ndarray, weight: str) -> np.ndarray:   # every input quantized per call
        return _dyn_matmul(v, W[p + weight])
    return plan_forward(cfg, W, x, position, state, mm, head="head.qT", last_only=last_only)
