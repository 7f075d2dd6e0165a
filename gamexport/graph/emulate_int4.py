"""An independent NumPy (float64) emulation of the INT4 plan the graph builder writes.

Computed from the checkpoint's fp32 weights, never from a graph (a bug in the graph must not be copied into its
reference): every weight of the five MatMuls per block (memory scores, memory read, gate, FFN in and out) is
quantized and dequantized with ``int4.fake_quantize`` (4-bit blocks along the product's input axis, signed
scale rounded to fp32), the tied head/embedding table as ``Int4Plan.head`` says (4- or 8-bit blocks of each
vocabulary row, or fp32), and with ``accuracy_level=4`` each MatMul's input is quantized to int8 per block
(``int4.quantize_activation_blocks``) as ONNX Runtime's MatMulNBits does. LayerNorm, softmax, the conv, the
gates, GELU, biases, the residual stream and the state stay exact.

What is left between this and ONNX Runtime running the INT4 graphs is float rounding (fp32 against float64) and
the activation-quantization steps that rounding moves across; ``INT4_PLAN_NOISE`` records the measured size.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..config import GAMConfig
from . import int4 as q4
from .emulate_int8 import plan_forward
from .int4 import Int4Plan


def int4_weights(cfg: GAMConfig, weights: Mapping[str, np.ndarray], plan: Int4Plan) -> dict[str, np.ndarray]:
    """The float64 weights the INT4 plan multiplies by, as [K, N] matrices (``x · W``): ``blocks.{i}.memory.scores``
    (Mᵀ), ``.memory.read`` (M), ``.gate``, ``.ffn.0``, ``.ffn.2``; ``head`` (d, V) and ``embedding`` (V, d); the
    rest of the checkpoint as float64."""
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    bs = plan.block_size
    out = dict(W)
    E = W["token_embedding.weight"]                                          # (V, d)
    head = E.T if plan.head_bits is None else q4.fake_quantize(E.T, plan.head_bits, bs)
    out["head"], out["embedding"] = head, head.T
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        M = W[p + "memory_bank"]                                              # (S, d)
        out[p + "memory.scores"] = q4.fake_quantize(M.T, 4, bs)               # h · Mᵀ: K = d
        out[p + "memory.read"] = q4.fake_quantize(M, 4, bs)                   # probs · M: K = S
        for name in ("gate", "ffn.0", "ffn.2"):
            out[p + name] = q4.fake_quantize(W[p + name + ".weight"].T, 4, bs)
    return out


#: The INT8 plans' weight names (``emulate_int8.plan_forward``'s ``mm``) → this table's.
_NAMES = {"memory_bank.qT": "memory.scores", "memory_bank.q": "memory.read", "gate.weight.qT": "gate",
          "ffn.0.weight.qT": "ffn.0", "ffn.2.weight.qT": "ffn.2", "head": "head"}


def int4_plan(cfg: GAMConfig, table: Mapping[str, np.ndarray], ids: np.ndarray, plan: Int4Plan,
              position: int = 0, state: np.ndarray | None = None, last_only: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """(logits (B, T, V), state (B, L, k-1, d)) of ``ids`` (B, T) from ``position`` after ``state`` (zero when
    None) under the INT4 plan; ``table`` is ``int4_weights(cfg, checkpoint weights, plan)``. The forward pass is
    the INT8 plans' (``emulate_int8.plan_forward``); what differs is each MatMul: the block-quantized weight and,
    at accuracy level 4, the input's int8 blocks (an fp32 head multiplies in fp32)."""
    def mm(act: str, p: str, x: np.ndarray, weight: str) -> np.ndarray:
        if plan.accuracy_level == 4 and (weight != "head" or plan.head_bits is not None):
            x = q4.quantize_activation_blocks(x, plan.block_size)
        return x @ table[p + _NAMES[weight]]

    x = table["embedding"][np.asarray(ids, dtype=np.int64)]
    return plan_forward(cfg, table, x, position, state, mm, head="head", last_only=last_only)


# ---- the gate ---------------------------------------------------------------------------------------------------
# Measured on the demo model (ONNX Runtime 1.32 CPU, 2 threads, AMD EPYC AVX2), logits of held-out text from
# position 0, |graph − emulation| relative to max(1, max|logit|), block 32, the default head (8-bit blocks); with
# a 4-bit head the numbers are within 15 % of these:
#
#                                              accuracy_level 0        accuracy_level 4
#                                              RMS       max           RMS       max
#   clean graph, 2 × 64 tokens                 7.4e-8    7.4e-7        2.9e-4    4.2e-3
#   clean graph, 4 × 256 tokens                6.9e-8    8.4e-7        2.6e-4    4.8e-3
#   one block's scale × 1.03 (blocks.1 FFN in) 1.3e-5    2.7e-4        4.4e-4    4.3e-3      (2 × 64 tokens)
#   one block's scale × 1.03 (blocks.2 read)   5.1e-6    7.6e-5        3.6e-4    4.2e-3      (2 × 64 tokens)
#   all scales × 1.03 (blocks.1 FFN out)       9.1e-4    6.4e-3        1.8e-3    1.3e-2      (2 × 64 tokens)
#   gate bias dropped (blocks.3 / blocks.0)    9.8e-4 / 4.0e-3         1.7e-3 / 4.4e-3     (2 × 64 tokens)
#
# At accuracy_level 0 the graph computes fp32 products of the dequantized weights: the emulation agrees to fp32
# noise, and a single block 3 % off stands 65× above it. At accuracy_level 4 ONNX Runtime rounds every block of
# every MatMul input to int8; fp32-vs-float64 rounding moves values across those steps, and that noise (2.5e-4)
# is as large as a one-block bug. So an INT4 graph is gated twice: its twin with accuracy_level 0 (the same
# weights and wiring; ``with_accuracy_level``) against the level-0 emulation under PLAN_RMS, which catches every
# bug above; and the graph as written against the emulation of its own level under WRITTEN_RMS, which catches the
# coarse ones (a whole tensor's scale, a dropped bias) in what actually ships.
PLAN_RMS = 1e-6       # 13× the level-0 noise; the smallest planted bug (5.1e-6) is 5× above it
WRITTEN_RMS = {0: PLAN_RMS, 1: PLAN_RMS, 4: 1e-3}   # level 4: 3.4× its noise; the coarse bugs are ≥ 1.5e-3
# Paper preset, seeded untrained weights, random ids 2 × 64: level 0 8.9e-8, level 4 7.1e-4 — the level-4 noise
# depends on the model, so a build should measure it rather than trust this constant (docs/int4.md).


def relative_rms(test: np.ndarray, plan: np.ndarray) -> float:
    """RMS of ``test − plan`` over max(1, max|plan|): the gate's distance (float64)."""
    diff = np.asarray(test, dtype=np.float64) - np.asarray(plan, dtype=np.float64)
    return float(np.sqrt(np.mean(diff * diff))) / max(1.0, float(np.abs(plan).max()))


def with_accuracy_level(model, level: int):
    """A copy of an INT4 ``onnx.ModelProto`` with every MatMulNBits' ``accuracy_level`` set to ``level`` (main graph
    and function bodies): the same weights and wiring, computed another way."""
    import onnx

    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    for nodes in [twin.graph.node, *[f.node for f in twin.functions]]:
        for node in nodes:
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = level
    return twin
