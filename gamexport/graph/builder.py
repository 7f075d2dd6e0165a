"""Build the prefill graph (``model.onnx``) and the streaming chunk graph (``step.onnx``) from weights.

Both share one body: embeddings → L × ``gam.Block`` → final LayerNorm → tied head. The prefill graph starts
from a zero state at position 0 and returns each layer's state after its tokens (``present.{i}.conv_state``);
the step graph takes the position of every token (``position_ids`` [B, T]) and each layer's state after the
earlier tokens (``past_key_values.{i}.conv_state``) — the names onnxruntime-genai, Optimum and transformers.js
use for a convolution cache (``gamexport.config.io_spec``). The prefill graph returns every position's logits
(scoring, perplexity); the step graph only the chunk's last position's (generation samples from nothing else),
so a prompt fed to it as one chunk runs the tied head once instead of T times. Files are byte-identical for
identical inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import __version__
from ..config import INPUT_IDS, LOGITS, POSITION_IDS, GAMConfig, io_spec, past_state_name, present_state_name
from ..errors import GraphError
# The metadata helpers live in a module without onnx (the runtime path reads them); re-exported here.
from ..graph_metadata import (EMBEDDING_TABLES, META_CONFIG, check_config_against_graph,  # noqa: F401
                              config_from_metadata)
from ..layout import GRAPH_PRECISIONS, graph_file
from . import int4 as q4
from .int4 import Int4Plan

OPSET = 20
IR_VERSION = 10
FUNCTION_DOMAIN = "gam"
PRODUCER = "gamexport"

# Metadata keys written into every file (and META_CONFIG, from gamexport.graph_metadata).
META_VERSION = "gamexport.version"
META_SOURCE_SHA = "gamexport.source_sha256"
META_GRAPH = "gamexport.graph"

_DTYPES = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}

#: The builder writes ``layout.GRAPH_PRECISIONS``. In a half-precision graph the
#: weights of every MatMul (memory bank, gate, FFN, tied embedding/head) and their biases are stored and
#: multiplied in half precision; LayerNorm, Softmax, the sigmoid gates and fusion, the residual stream, the (tiny,
#: depthwise) convolution and therefore the streaming state stay fp32 — the "fp32 islands". Graph inputs and
#: outputs keep their types.
MS_DOMAIN = "com.microsoft"   # ONNX Runtime's contrib operators (MatMulNBits)
META_INT4_PLAN = "gamexport.int4_plan"
HALF_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
META_PRECISION = "gamexport.precision"

#: Tensors stored in the compute precision of a half-precision graph (suffixes of state_dict names).
HALF_WEIGHTS = ("token_embedding.weight", "memory_bank", "gate.weight", "gate.bias", "ffn.0.weight", "ffn.0.bias",
                "ffn.2.weight", "ffn.2.bias")


def is_half_weight(name: str) -> bool:
    return name.endswith(HALF_WEIGHTS)


#: INT8 (static Q/DQ, symmetric, zero point 0 — what TensorRT accepts): every weight MatMul takes int8 weights,
#: quantized per output channel, through DequantizeLinear; its activation input is quantized per tensor with a
#: scale calibrated on real text (``QuantizeLinear → DequantizeLinear``), except the memory read's softmax
#: probabilities, which stay fp32: over S slots most probabilities are far below one int8 step of the largest.
#: Everything else (LayerNorm, Softmax, gates, conv, residual, state) stays fp32.
#:
#: The token embedding shares the tied head's int8 values and per-row scales, but its lookup gathers them from an
#: fp16 copy (every integer in [-127, 127] is exact in fp16) and casts to fp32: TensorRT's ONNX operator table
#: lists Gather and Cast for FP32/FP16/BF16/INT32/INT64/BOOL, not INT8, and dequantizing the whole table before
#: the Gather would cost every call a pass over V × d values (1.5 ms per step on CPU at the paper's shape).
INT8_ACTIVATIONS = ("act.h", "act.hn", "act.gelu")   # per block: LN1 out, LN2 out, GELU out; plus "act.x_f"
INT8_MAX = 127


def quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``w`` with one scale per index of ``axis``: (int8 values, fp32 scales)."""
    amax = np.abs(w).max(axis=1 - axis)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    shape = (1, -1) if axis == 1 else (-1, 1)
    q = np.clip(np.rint(w / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def activation_scale(amax: float) -> float:
    return float(amax) / INT8_MAX if amax > 0 else 1.0


def _initializer(name: str, value: np.ndarray, precision: str) -> onnx.TensorProto:
    value = np.ascontiguousarray(value, dtype=np.float32)
    if precision in HALF_TYPES and is_half_weight(name):
        import ml_dtypes  # a dependency of onnx

        value = value.astype(np.float16 if precision == "fp16" else ml_dtypes.bfloat16)
    return numpy_helper.from_array(value, name)


def _opsets(contrib: bool = False) -> list:
    """The model's (and every function's) opset imports; ``contrib`` adds com.microsoft (INT4's MatMulNBits)."""
    return [helper.make_opsetid("", OPSET), helper.make_opsetid(FUNCTION_DOMAIN, 1),
            *([helper.make_opsetid(MS_DOMAIN, 1)] if contrib else [])]


def _const_i64(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                             [len(values)], values))


def _make_function(name: str, inputs: list[str], outputs: list[str], nodes: list, doc: str,
                   contrib: bool = False) -> onnx.FunctionProto:
    """The local function ``gam.<name>``; every value name in its body is prefixed ``<name>/`` (see below)."""
    def scoped(values) -> list[str]:
        return [_scoped(name, v) for v in values]

    for node in nodes:
        node.input[:], node.output[:] = scoped(node.input), scoped(node.output)
    return helper.make_function(FUNCTION_DOMAIN, name, scoped(inputs), scoped(outputs), nodes, _opsets(contrib),
                                doc_string=doc)


def _scoped(function: str, value: str) -> str:
    """``value`` inside function ``function``: ``Block/x``, ``FeedForward/x`` ("" stays "": an omitted input).

    onnx-tensorrt's local-function importer binds a formal input by *name* when the caller's scope already holds
    a tensor of that name (a warning, then the caller's tensor is used instead of the argument), so a callee's
    names must never coincide with a name its callers can see. Main-graph names (I/O, state_dict keys, ``x_0``…)
    contain no ``/`` and every function has its own prefix, so no two scopes share a name;
    ``checks.scope_problems`` asserts it on every graph the build writes.
    """
    return f"{function}/{value}" if value else value


class _Body:
    """Collects the nodes of a function body; casts appear only in half-precision graphs, Q/DQ only in INT8,
    MatMulNBits only in INT4 (``int4``: its plan)."""

    def __init__(self, half: int | None, int8: bool = False, int4: Int4Plan | None = None):
        self.half = half
        self.int8 = int8
        self.int4 = int4
        self.nodes: list[onnx.NodeProto] = []
        self._zero: str | None = None

    def zero_point(self) -> str:
        if self._zero is None:
            self._zero = "int8_zero"
            self.nodes.append(helper.make_node("Constant", [], [self._zero],
                                               value=helper.make_tensor("z", TensorProto.INT8, [], [0])))
        return self._zero

    def linear(self, x: str, w: str, out: str, transposed: bool = True, act_scale: str | None = None,
               kn: tuple[int, int] = (0, 0)) -> str:
        """``x · wᵀ`` (or ``x · w`` when not ``transposed``) for a weight function input ``w``.

        INT8: the weight arrives as int8 ``w.qT`` (pre-transposed, [in, out]) or ``w.q`` plus per-column scales,
        dequantized on the fly; ``act_scale`` adds a Q/DQ pair on ``x``. INT4: one MatMulNBits of the packed
        4-bit blocks ``w.q4`` / ``w.q4T`` and their scales; ``kn`` = (K inputs, N outputs) of the product.
        """
        if self.int4 is not None:
            return self.op("MatMulNBits", [x, *weight_inputs(w, transposed, "int4")], out, domain=MS_DOMAIN,
                           K=kn[0], N=kn[1], bits=4, block_size=self.int4.block_size,
                           accuracy_level=self.int4.accuracy_level)
        if self.int8:
            if act_scale is not None:
                zp = self.zero_point()
                q = self.op("QuantizeLinear", [x, act_scale, zp], f"{out}_xq")
                x = self.op("DequantizeLinear", [q, act_scale, zp], f"{out}_xdq")
            wq = weight_inputs(w, transposed, True)
            wd = self.op("DequantizeLinear", wq, f"{out}_wdq", axis=1)
            return self.op("MatMul", [x, wd], out)
        if transposed:
            w = self.op("Transpose", [w], f"{out}_wt", perm=[1, 0])
        return self.op("MatMul", [x, w], out)

    def op(self, op_type: str, inputs: list[str], output: str | list[str], **attrs) -> str:
        outputs = [output] if isinstance(output, str) else output
        domain = attrs.pop("domain", "")
        self.nodes.append(helper.make_node(op_type, inputs, outputs, domain=domain, **attrs))
        return outputs[0]

    def to_half(self, src: str, name: str) -> str:
        return self.op("Cast", [src], name, to=self.half) if self.half else src

    def to_float(self, src: str, name: str) -> str:
        return self.op("Cast", [src], name, to=TensorProto.FLOAT) if self.half else src

    def output(self, src: str, name: str) -> None:
        """Make ``name`` (a function output) hold ``src``: a Cast to fp32, or a rename of its producer."""
        if self.half:
            self.op("Cast", [src], name, to=TensorProto.FLOAT)
            return
        last = self.nodes[-1]
        assert last.output[0] == src, "output() must follow the node that produced src"
        last.output[0] = name


def make_functions(cfg: GAMConfig, precision: str = "fp32", int4: Int4Plan | None = None) -> list[onnx.FunctionProto]:
    """The local functions of the block; ``group`` and the state length are fixed per model.

    In a half-precision graph the block casts the LN1 output once (``hm``) for the memory read and the gate,
    whose MatMuls run in half precision; Softmax, the sigmoids, the fusion and LayerNorm run in fp32.
    ``int4``: the plan of an INT4 graph (precision "int4"; the default plan when None).
    """
    k1 = cfg.state_len
    half = HALF_TYPES.get(precision)
    int8 = precision == "int8"
    int4 = (int4 or Int4Plan()) if precision == "int4" else None
    d, S = cfg.d_model, cfg.n_slots

    def body() -> _Body:
        return _Body(half, int8, int4)

    def w(name: str, transposed: bool = True) -> list[str]:
        return weight_inputs(name, transposed, precision)

    def _function(*args, **kwargs) -> onnx.FunctionProto:   # every function imports com.microsoft in INT4
        return _make_function(*args, **kwargs, contrib=int4 is not None)

    def scale(name: str) -> list[str]:
        return [name + ".scale"] if int8 else []

    b = body()
    k = cfg.kernel_size
    end = int(np.iinfo(np.int64).max)
    b.op("Concat", ["past", "h"], "hcat", axis=1)                                   # (B, k-1+T, d)
    # Depthwise conv as k shifted multiply-adds in the (B, T, d) layout: tap j weights hcat[:, j : j+T], the
    # input j - (k-1) rows before the output. Same sums as Conv(group=d), without the two layout transposes and
    # ONNX Runtime's per-channel grouped Conv, which cost more than the model's GEMVs around them when decoding.
    b.nodes += [_const_i64("taps_shape", [cfg.d_model, k]), _const_i64("axis", [1])]
    b.op("Transpose", [b.op("Reshape", ["weight", "taps_shape"], "w_dk")], "w_kd", perm=[1, 0])  # (k, d)
    acc = "bias"
    for j in range(k):
        b.nodes.append(helper.make_node("Constant", [], [f"tap{j}"],
                                        value=helper.make_tensor(f"tap{j}", TensorProto.INT64, [], [j])))
        if j < k1:
            b.nodes += [_const_i64(f"start{j}", [j]), _const_i64(f"end{j}", [j - k1])]
            rows = b.op("Slice", ["hcat", f"start{j}", f"end{j}", "axis"], f"rows{j}")  # (B, T, d)
        else:
            rows = "h"                                                   # the newest tap: hcat[:, k-1:] is h
        tap = b.op("Gather", ["w_kd", f"tap{j}"], f"w{j}", axis=0)                   # (d,): folds to a constant
        acc = b.op("Add", [acc, b.op("Mul", [rows, tap], f"m{j}")], "local" if j == k - 1 else f"acc{j}")
    b.nodes += [_const_i64("start", [-k1]), _const_i64("end", [end])]
    b.op("Slice", ["hcat", "start", "end", "axis"], "present")                     # (B, k-1, d) newest rows
    conv = _function("CausalConv", ["h", "past", "weight", "bias"], ["local", "present"], b.nodes,
                     "Local path: depthwise causal Conv1d over [past k-1 LN1 outputs, h] written as k shifted "
                     "multiply-adds; returns the new past. Always fp32 (k·d weights), so the streaming state is "
                     "exact at every precision.")

    b = body()
    h_scale = "h.scale" if int8 else None
    scores = b.linear("h", "memory", "scores", act_scale=h_scale, kn=(d, S))      # (B, T, S), unscaled
    weights = b.op("Softmax", [b.to_float(scores, "scores_f")], "weights", axis=-1)
    read = b.linear(b.to_half(weights, "weights_h"), "memory", "read", transposed=False, kn=(S, d))  # (B, T, d)
    b.output(read, "global")
    memory_inputs = list(dict.fromkeys(["h", *w("memory"), *w("memory", False), *scale("h")]))  # fp: M once
    memory = _function("MemoryRead", memory_inputs, ["global"], b.nodes,
                       "Global path: softmax(h · Mᵀ) · M over the learned memory slots, per token, no scaling.")

    b = body()
    b.linear("h", "weight", "g0", act_scale=h_scale, kn=(d, 2 * d))                # (B, T, 2d)
    g = b.to_float(b.op("Add", ["g0", "bias"], "g_h"), "g")
    b.op("Split", [b.op("Sigmoid", [g], "s")], ["s_local", "s_global"], axis=-1, num_outputs=2)
    b.op("Mul", ["s_local", "local"], "a")
    b.op("Mul", ["s_global", "global"], "b")
    b.op("Add", ["a", "b"], "fused")
    fusion = _function("GatedFusion", ["h", "local", "global", *w("weight"), "bias", *scale("h")], ["fused"],
                       b.nodes,
                       "Gate: Linear(d, 2d) split into two sigmoid gates weighting the local and global paths.")

    b = body()
    hn = b.op("LayerNormalization", ["x", "ln_weight", "ln_bias"], "hn", axis=-1, epsilon=cfg.ln_eps)
    b.linear(b.to_half(hn, "hn_h"), "w1", "u0", act_scale="hn.scale" if int8 else None, kn=(d, 4 * d))
    b.op("Add", ["u0", "b1"], "u")                                                  # (B, T, 4d)
    b.op("Gelu", ["u"], "a", approximate="none")
    b.linear("a", "w2", "v0", act_scale="gelu.scale" if int8 else None, kn=(4 * d, d))
    b.output(b.op("Add", ["v0", "b2"], "v"), "y")                                   # (B, T, d)
    ffn = _function("FeedForward", ["x", "ln_weight", "ln_bias", *w("w1"), "b1", *w("w2"), "b2",
                                    *scale("hn"), *scale("gelu")], ["y"], b.nodes,
                    "Pre-LN feed-forward: LayerNorm → Linear(d, 4d) → exact GELU → Linear(4d, d).")

    b = body()
    h = b.op("LayerNormalization", ["x", "ln1.weight", "ln1.bias"], "h", axis=-1, epsilon=cfg.ln_eps)
    b.op("CausalConv", [h, "past", "causal_conv.weight", "causal_conv.bias"], ["local", "present"],
         domain=FUNCTION_DOMAIN)
    hm = b.to_half(h, "hm")
    b.op("MemoryRead", list(dict.fromkeys([hm, *w("memory_bank"), *w("memory_bank", False), *scale("act.h")])),
         "global", domain=FUNCTION_DOMAIN)
    b.op("GatedFusion", [hm, "local", "global", *w("gate.weight"), "gate.bias", *scale("act.h")], "fused",
         domain=FUNCTION_DOMAIN)
    b.op("Add", ["x", "fused"], "x1")
    b.op("FeedForward", ["x1", "ln2.weight", "ln2.bias", *w("ffn.0.weight"), "ffn.0.bias", *w("ffn.2.weight"),
                         "ffn.2.bias", *scale("act.hn"), *scale("act.gelu")], "f", domain=FUNCTION_DOMAIN)
    b.op("Add", ["x1", "f"], "y")
    block = _function("Block", ["x", "past", *block_params(precision)], ["y", "present"], b.nodes,
                      "GAM block: x + gate(conv(LN1 x), memory(LN1 x)); then x + FFN(LN2 x).")
    return [conv, memory, fusion, ffn, block]


# Parameters of gam.Block, in call order; the main graph passes blocks.{i}.<name>.
BLOCK_PARAMS = ["ln1.weight", "ln1.bias", "causal_conv.weight", "causal_conv.bias", "memory_bank",
                "gate.weight", "gate.bias", "ln2.weight", "ln2.bias", "ffn.0.weight", "ffn.0.bias",
                "ffn.2.weight", "ffn.2.bias"]


def weight_inputs(name: str, transposed: bool, precision: str | bool) -> list[str]:
    """Names carrying a weight: itself; in INT8 its int8 tensor and per-column scales; in INT4 its packed 4-bit
    blocks and their scales (``.q4``: the rows of the stored [out, in] weight, for ``x · wᵀ``; ``.q4T``: the
    columns, for ``x · w``). ``precision`` True/False is the older spelling of "int8"/not."""
    precision = {True: "int8", False: "fp32"}.get(precision, precision)
    if precision == "int4":
        q = f"{name}.q4" if transposed else f"{name}.q4T"
    elif precision == "int8":
        q = f"{name}.qT" if transposed else f"{name}.q"
    else:
        return [name]
    return [q, q + ".scale"]


def block_params(precision: str) -> list[str]:
    """gam.Block's weight parameters at a precision (INT8 replaces weights by int8 + scales, adds act scales;
    INT4 replaces them by packed blocks + scales)."""
    if precision not in ("int8", "int4"):
        return BLOCK_PARAMS
    params: list[str] = []
    for p in BLOCK_PARAMS:
        if p == "memory_bank":
            params += weight_inputs(p, True, precision) + weight_inputs(p, False, precision)
        elif p.endswith("weight") and not p.startswith(("ln", "causal_conv")):
            params += weight_inputs(p, True, precision)
        else:
            params.append(p)
    return params + ([a + ".scale" for a in INT8_ACTIVATIONS] if precision == "int8" else [])


def int8_initializers(cfg: GAMConfig, weights: Mapping[str, np.ndarray],
                      calibration: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Every initializer of an INT8 graph: quantized weights with scales, fp32 rest, activation scales."""
    out: dict[str, np.ndarray] = {}
    emb = np.asarray(weights["token_embedding.weight"], dtype=np.float32)
    q, s = quantize_per_channel(emb, axis=0)               # one scale per vocabulary row
    out["token_embedding.weight.qT"], out["token_embedding.weight.qT.scale"] = np.ascontiguousarray(q.T), s
    out["token_embedding.weight.q_fp16"] = q.astype(np.float16)   # the same int8 values, exact in fp16
    out["pos_embedding.weight"] = weights["pos_embedding.weight"]
    for i in range(cfg.n_layers):
        for p in block_params("int8"):
            key = f"blocks.{i}.{p}"
            if p.startswith("act."):
                out[key] = np.array(activation_scale(calibration[key.removesuffix(".scale")]), np.float32)
            elif p.endswith(".qT"):
                w = np.asarray(weights[key.removesuffix(".qT")], dtype=np.float32)   # (out, in)
                out[key], out[key + ".scale"] = quantize_per_channel(np.ascontiguousarray(w.T), axis=1)
            elif p.endswith(".q"):
                w = np.asarray(weights[key.removesuffix(".q")], dtype=np.float32)    # (S, d), used as x · M
                out[key], out[key + ".scale"] = quantize_per_channel(w, axis=1)
            elif not p.endswith(".scale"):
                out[key] = weights[key]
    out["ln_f.weight"], out["ln_f.bias"] = weights["ln_f.weight"], weights["ln_f.bias"]
    out["act.x_f.scale"] = np.array(activation_scale(calibration["act.x_f"]), np.float32)
    return out


def int4_initializers(cfg: GAMConfig, weights: Mapping[str, np.ndarray], plan: Int4Plan) -> dict[str, np.ndarray]:
    """Every initializer of an INT4 graph: each weight MatMul's matrix as MatMulNBits' packed 4-bit blocks and
    scales (``int4.quantize``; the memory bank twice, once per orientation, as in INT8), the tied head/embedding
    table as ``plan.head`` says, everything else fp32 (position table, conv, biases, LayerNorms)."""
    bs = plan.block_size
    out: dict[str, np.ndarray] = {}
    emb = "token_embedding.weight"
    if plan.head_bits is None:
        out[emb] = weights[emb]
    else:  # MatMulNBits' B for logits = x_f · Eᵀ holds E's rows; the embedding gathers the same rows (head_gather)
        suffix = f".q{plan.head_bits}"
        w = np.asarray(weights[emb], dtype=np.float32)
        out[emb + suffix], out[emb + suffix + ".scale"] = q4.quantize(w.T, plan.head_bits, bs)
    out["pos_embedding.weight"] = weights["pos_embedding.weight"]
    for i in range(cfg.n_layers):
        for p in block_params("int4"):
            key = f"blocks.{i}.{p}"
            if p.endswith((".q4", ".q4T")):
                w = np.asarray(weights[key.rsplit(".", 1)[0]], dtype=np.float32)   # (out, in), or M (S, d)
                out[key], out[key + ".scale"] = q4.quantize(w.T if p.endswith(".q4") else w, 4, bs)
            elif not p.endswith(".scale"):
                out[key] = weights[key]
    out["ln_f.weight"], out["ln_f.bias"] = weights["ln_f.weight"], weights["ln_f.bias"]
    return out


def _int4_embedding(nodes: list, cfg: GAMConfig, plan: Int4Plan) -> None:
    """Nodes computing ``tok_emb`` (B, T, d) fp32 in an INT4 graph.

    With a quantized head the lookup reads the head's own packed rows (no second copy of the table): Gather the
    ids' rows [B, T, n_blocks, blob] of uint8, split each byte into its two 4-bit codes (low nibble first, as
    MatMulNBits packs them), then (code − 2^(bits−1)) · the row's block scale. Only T rows are unpacked per call.
    """
    n = helper.make_node
    emb = "token_embedding.weight"
    bits = plan.head_bits
    if bits is None:
        nodes.append(n("Gather", [emb, INPUT_IDS], ["tok_emb"], axis=0))
        return
    packed, scale, bs = f"{emb}.q{bits}", f"{emb}.q{bits}.scale", plan.block_size
    nb = q4.n_blocks(cfg.d_model, bs)
    nodes.append(n("Gather", [packed, INPUT_IDS], ["tok_codes_packed"], axis=0))          # (B, T, nb, blob) u8
    codes = "tok_codes_packed"
    if bits == 4:
        nodes.append(helper.make_node("Constant", [], ["nibble_mask"],
                                      value=helper.make_tensor("m", TensorProto.UINT8, [], [0x0F])))
        nodes.append(helper.make_node("Constant", [], ["nibble_shift"],
                                      value=helper.make_tensor("s", TensorProto.UINT8, [], [4])))
        nodes.append(_const_i64("last_axis", [-1]))
        nodes.append(n("BitwiseAnd", [codes, "nibble_mask"], ["tok_low"]))
        nodes.append(n("BitShift", [codes, "nibble_shift"], ["tok_high"], direction="RIGHT"))
        nodes.append(n("Unsqueeze", ["tok_low", "last_axis"], ["tok_low_5d"]))
        nodes.append(n("Unsqueeze", ["tok_high", "last_axis"], ["tok_high_5d"]))
        nodes.append(n("Concat", ["tok_low_5d", "tok_high_5d"], ["tok_pairs"], axis=-1))  # (B, T, nb, blob, 2)
        nodes.append(_const_i64("block_shape", [0, 0, nb, bs]))
        nodes.append(n("Reshape", ["tok_pairs", "block_shape"], ["tok_codes"]))           # (B, T, nb, bs)
        codes = "tok_codes"
    nodes.append(n("Cast", [codes], ["tok_codes_f"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Constant", [], ["code_zero"],
                                  value=helper.make_tensor("z", TensorProto.FLOAT, [], [float(1 << (bits - 1))])))
    nodes.append(n("Sub", ["tok_codes_f", "code_zero"], ["tok_q"]))
    nodes.append(n("Gather", [scale, INPUT_IDS], ["tok_scale"], axis=0))                  # (B, T, nb)
    nodes.append(_const_i64("minus_one", [-1]))
    nodes.append(n("Unsqueeze", ["tok_scale", "minus_one"], ["tok_scale_4d"]))
    nodes.append(n("Mul", ["tok_q", "tok_scale_4d"], ["tok_blocks"]))                    # (B, T, nb, bs)
    nodes.append(_const_i64("row_shape", [0, 0, nb * bs]))
    padded = nb * bs != cfg.d_model
    nodes.append(n("Reshape", ["tok_blocks", "row_shape"], ["tok_emb_padded" if padded else "tok_emb"]))
    if padded:  # d is not a whole number of blocks: drop the zero padding
        nodes += [_const_i64("emb_start", [0]), _const_i64("emb_end", [cfg.d_model])]
        nodes.append(n("Slice", ["tok_emb_padded", "emb_start", "emb_end", "minus_one"], ["tok_emb"]))


def _int4_head(nodes: list, cfg: GAMConfig, plan: Int4Plan) -> None:
    """The tied head of an INT4 graph: MatMulNBits over the packed table, or the fp32 table transposed."""
    emb = "token_embedding.weight"
    bits = plan.head_bits
    if bits is None:
        nodes.append(helper.make_node("Transpose", [emb], ["head_t"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["x_f", "head_t"], [LOGITS]))
        return
    nodes.append(helper.make_node("MatMulNBits", ["x_f", f"{emb}.q{bits}", f"{emb}.q{bits}.scale"], [LOGITS],
                                  domain=MS_DOMAIN, K=cfg.d_model, N=cfg.vocab_size, bits=bits,
                                  block_size=plan.block_size, accuracy_level=plan.accuracy_level))


#: ``Slice``'s end for "to the end of the axis" (INT64_MAX, as the ONNX spec and TensorRT's parser accept).
LAST_END = 2 ** 63 - 1


def _value_info(name: str, dtype: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, _DTYPES[dtype], shape)


def build_graph(cfg: GAMConfig, weights: Mapping[str, np.ndarray], kind: str, source_sha256: str = "",
                name: str = "gam", precision: str = "fp32",
                calibration: Mapping[str, float] | None = None, int4: Int4Plan | None = None) -> onnx.ModelProto:
    """The ONNX model of one graph kind ("prefill" or "step") at one precision, weights as initializers.

    INT8 needs ``calibration``: the max |activation| per quantized activation (``blocks.{i}.act.h``, ``.act.hn``,
    ``.act.gelu`` and ``act.x_f``), shared by the prefill and step graphs so that chunk steps equal prefill.
    INT4 (ONNX Runtime only: MatMulNBits) follows ``int4`` (the default ``Int4Plan()`` when None).
    """
    if kind not in ("prefill", "step"):
        raise ValueError(f"kind must be 'prefill' or 'step', not {kind!r}")
    if precision not in GRAPH_PRECISIONS:
        raise ValueError(f"precision must be one of {GRAPH_PRECISIONS}, not {precision!r}")
    half = HALF_TYPES.get(precision)
    int8 = precision == "int8"
    plan = (int4 or Int4Plan()) if precision == "int4" else None
    if int8 and calibration is None:
        raise ValueError("an INT8 graph needs a calibration table")
    n = helper.make_node
    nodes: list[onnx.NodeProto] = []
    d, L, k1 = cfg.d_model, cfg.n_layers, cfg.state_len
    emb = "token_embedding.weight"

    if int8:  # the head's int8 rows × their per-row scales, gathered from an fp16 copy (see INT8_EMBEDDING)
        nodes.append(n("Gather", [emb + ".q_fp16", INPUT_IDS], ["tok_emb_q"], axis=0))         # (B, T, d)
        nodes.append(n("Gather", [emb + ".qT.scale", INPUT_IDS], ["tok_scale"], axis=0))      # (B, T)
        nodes.append(n("Cast", ["tok_emb_q"], ["tok_emb_f"], to=TensorProto.FLOAT))
        nodes.append(_const_i64("minus_one", [-1]))
        nodes.append(n("Unsqueeze", ["tok_scale", "minus_one"], ["tok_scale_3d"]))
        nodes.append(n("Mul", ["tok_emb_f", "tok_scale_3d"], ["tok_emb"]))
    elif plan is not None:
        _int4_embedding(nodes, cfg, plan)
    else:
        nodes.append(n("Gather", [emb, INPUT_IDS], ["tok_emb_h" if half else "tok_emb"], axis=0))  # (B, T, d)
    if half:
        nodes.append(n("Cast", ["tok_emb_h"], ["tok_emb"], to=TensorProto.FLOAT))
    if kind == "step":   # every token's absolute position, as the caller gives it (checked by the runners)
        positions = POSITION_IDS                                                      # (B, T)
    else:
        nodes.append(n("Shape", [INPUT_IDS], ["seq_len_1d"], start=1, end=2))         # [T]
        nodes.append(n("Squeeze", ["seq_len_1d"], ["seq_len"]))
        nodes.append(helper.make_node("Constant", [], ["zero_s"], value_int=0))
        nodes.append(helper.make_node("Constant", [], ["one_s"], value_int=1))
        nodes.append(n("Range", ["zero_s", "seq_len", "one_s"], ["positions"]))     # (T,)
        positions = "positions"
    nodes.append(n("Gather", ["pos_embedding.weight", positions], ["pos_emb"], axis=0))
    nodes.append(n("Add", ["tok_emb", "pos_emb"], ["x_0"]))

    if kind == "prefill":
        nodes.append(n("Shape", [INPUT_IDS], ["batch_1d"], start=0, end=1))
        nodes.append(_const_i64("state_tail", [k1, d]))
        nodes.append(n("Concat", ["batch_1d", "state_tail"], ["zero_state_shape"], axis=0))
        nodes.append(n("ConstantOfShape", ["zero_state_shape"], ["zero_state"],
                       value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])))   # (B, k-1, d)
    for i in range(L):
        past = past_state_name(i) if kind == "step" else "zero_state"                 # (B, k-1, d)
        nodes.append(n("Block", [f"x_{i}", past, *[f"blocks.{i}.{p}" for p in block_params(precision)]],
                       [f"x_{i + 1}", present_state_name(i)], domain=FUNCTION_DOMAIN, name=f"blocks.{i}"))
    final = f"x_{L}"
    if kind == "step":   # generation samples from the last position only: the head runs once per chunk
        nodes.append(_const_i64("last_start", [-1]))
        nodes.append(_const_i64("last_end", [LAST_END]))
        nodes.append(_const_i64("token_axis", [1]))
        nodes.append(n("Slice", [final, "last_start", "last_end", "token_axis"], ["x_last"]))  # (B, 1, d)
        final = "x_last"
    nodes.append(n("LayerNormalization", [final, "ln_f.weight", "ln_f.bias"], ["x_f"], axis=-1,
                   epsilon=cfg.ln_eps))
    if int8:  # tied head: the same int8 values as the embedding rows, stored transposed
        nodes.append(helper.make_node("Constant", [], ["int8_zero"],
                                      value=helper.make_tensor("z", TensorProto.INT8, [], [0])))
        nodes.append(n("QuantizeLinear", ["x_f", "act.x_f.scale", "int8_zero"], ["x_f_q"]))
        nodes.append(n("DequantizeLinear", ["x_f_q", "act.x_f.scale", "int8_zero"], ["x_f_dq"]))
        nodes.append(n("DequantizeLinear", [emb + ".qT", emb + ".qT.scale"], ["head_t"], axis=1))  # (d, V)
        nodes.append(n("MatMul", ["x_f_dq", "head_t"], [LOGITS]))
    elif plan is not None:
        _int4_head(nodes, cfg, plan)
    else:
        nodes.append(n("Transpose", [emb], ["head_t"], perm=[1, 0]))                   # (d, V), tied head
    if half:
        nodes.append(n("Cast", ["x_f"], ["x_f_h"], to=half))
        nodes.append(n("MatMul", ["x_f_h", "head_t"], ["logits_h"]))
        nodes.append(n("Cast", ["logits_h"], [LOGITS], to=TensorProto.FLOAT))         # (B, T or 1, V)
    elif not int8 and plan is None:
        nodes.append(n("MatMul", ["x_f", "head_t"], [LOGITS]))                         # (B, T or 1, V)

    spec = io_spec(cfg, kind)
    if int8:
        table = int8_initializers(cfg, weights, calibration)
        inits = [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in table.items()]
    elif plan is not None:
        inits = [numpy_helper.from_array(np.ascontiguousarray(v), k)
                 for k, v in int4_initializers(cfg, weights, plan).items()]
    else:
        inits = [_initializer(key, weights[key], precision) for key in _initializer_names(cfg)]
    graph = helper.make_graph(nodes, f"{name}_{kind}_{precision}",
                              [_value_info(*v) for v in spec["inputs"]],
                              [_value_info(*v) for v in spec["outputs"]], initializer=inits)
    model = helper.make_model(graph, opset_imports=_opsets(plan is not None),
                              functions=make_functions(cfg, precision, plan),
                              producer_name=PRODUCER, producer_version=__version__, ir_version=IR_VERSION)
    helper.set_model_props(model, {META_CONFIG: cfg.to_json(), META_VERSION: __version__,
                                   META_SOURCE_SHA: source_sha256, META_GRAPH: kind, META_PRECISION: precision,
                                   **({META_INT4_PLAN: plan.to_json()} if plan is not None else {})})
    return model


def _initializer_names(cfg: GAMConfig) -> list[str]:
    names = ["token_embedding.weight", "pos_embedding.weight"]
    for i in range(cfg.n_layers):
        names += [f"blocks.{i}.{p}" for p in BLOCK_PARAMS]
    return names + ["ln_f.weight", "ln_f.bias"]


def inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every local function inlined, for tools that do not walk functions."""
    from onnx import inliner

    inlined = inliner.inline_local_functions(model)
    del inlined.functions[:]
    return inlined


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def export_graphs(cfg: GAMConfig, weights: Mapping[str, np.ndarray], out_dir: Path, source_sha256: str = "",
                  precisions: tuple[str, ...] = ("fp32",),
                  calibration: Mapping[str, float] | None = None, int4: Int4Plan | None = None) -> dict[str, Path]:
    """Write the prefill and step graphs (and inlined twins) at each precision atomically; {file name: path}."""
    from ..fsutil import atomic_write_bytes

    written = {}
    for precision in precisions:
        for kind in ("prefill", "step"):
            model = build_graph(cfg, weights, kind, source_sha256, precision=precision, calibration=calibration,
                                int4=int4)
            for inlined, proto in ((False, model), (True, inline(model))):
                path = Path(out_dir) / graph_file(kind, precision, inlined)
                written[path.name] = atomic_write_bytes(path, serialize(proto))
    return written


def read_graph_config(model: onnx.ModelProto | str | Path) -> tuple[GAMConfig, dict[str, str]]:
    """The GAMConfig and metadata stored in a gamexport graph (file path or proto, weights not needed)."""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and others for corrupt files
            raise GraphError(f"cannot read ONNX file {path}: {type(exc).__name__}",
                             "the file is truncated or corrupt; rebuild it with gamexport build") from exc
        where = str(path)
    else:
        where = f"ONNX model {model.graph.name or '(unnamed)'}"
    meta = {p.key: p.value for p in model.metadata_props}
    cfg = config_from_metadata(meta, where)
    dims = lambda vi: [d.dim_value or None for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    shapes = {vi.name: dims(vi) for vi in [*model.graph.input, *model.graph.output]}
    check_config_against_graph(cfg, {**shapes, **embedding_shapes(model)}, where)
    return cfg, meta


def embedding_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Shapes of the graph's embedding tables (token: vocabulary rows; position: learned positions)."""
    return {t.name: list(t.dims) for t in model.graph.initializer if t.name in EMBEDDING_TABLES}
