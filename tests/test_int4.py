"""INT4 (MatMulNBits) graphs: the packing, one node in ONNX Runtime, the builder's graphs, and the emulation gate.

The INT4 precision is not in the build yet (docs/int4.md): these tests cover the pieces the build will use.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gamexport.graph import int4 as q4
from gamexport.graph.builder import build_graph, inline, serialize
from gamexport.graph.checks import check_graph_file, precision_problems
from gamexport.graph.emulate_int4 import (PLAN_RMS, WRITTEN_RMS, int4_plan, int4_weights, relative_rms,
                                          with_accuracy_level)
from gamexport.graph.int4 import Int4Plan
from gamexport.state import past_tensors

ort = pytest.importorskip("onnxruntime")


# ---- packing ------------------------------------------------------------------------------------------------
def _reference_dequantize(packed, scales, K, bits, block_size):
    """MatMulNBits' weight element by element, straight from the operator's description (float64)."""
    N = packed.shape[0]
    w = np.zeros((K, N))
    for n in range(N):
        for k in range(K):
            block, offset = divmod(k, block_size)
            if bits == 4:
                byte = int(packed[n, block, offset // 2])
                code = byte & 0x0F if offset % 2 == 0 else byte >> 4
            else:
                code = int(packed[n, block, offset])
            w[k, n] = (code - (1 << (bits - 1))) * float(scales[n, block])
    return w


@pytest.mark.parametrize("bits, K, block_size", [(4, 80, 32), (4, 64, 16), (8, 48, 32)])
def test_packing_against_an_independent_float64_reading(bits, K, block_size):
    rng = np.random.default_rng(bits + K)
    w = rng.standard_normal((K, 12)) * 0.05
    packed, scales = q4.quantize(w, bits, block_size)
    nb = -(-K // block_size)
    assert packed.dtype == np.uint8 and packed.shape == (12, nb, block_size * bits // 8)
    assert scales.dtype == np.float32 and scales.shape == (12, nb)
    deq = q4.dequantize(packed, scales, K, bits, block_size)
    np.testing.assert_array_equal(deq, _reference_dequantize(packed, scales, K, bits, block_size))
    np.testing.assert_array_equal(deq, q4.fake_quantize(w, bits, block_size))
    # The rule: each block's largest |w| is stored exactly (as the most negative integer); the rest are within
    # half a step, or one step where they round to +2^(bits-1) and clip.
    step = np.repeat(np.abs(scales.astype(np.float64)).T, block_size, axis=0)[:K]
    err = np.abs(deq - w)
    assert np.all(err <= step * (1 + 1e-6))
    assert np.mean(err <= step / 2 * (1 + 1e-6)) > 0.97
    padded = np.zeros((nb * block_size, 12))
    padded[:K] = w
    largest = np.abs(padded.reshape(nb, block_size, 12)).max(axis=1)            # (nb, N)
    assert np.allclose(np.abs(scales.T) * (1 << (bits - 1)), largest, rtol=1e-6)


def _one_node(K, N, packed, scales, level, bits=4, block_size=32):
    node = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block_size, accuracy_level=level)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
                              initializer=[numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 20),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("K", [128, 80])
@pytest.mark.parametrize("level", [0, 4])
def test_onnx_runtime_multiplies_by_exactly_these_weights(K, level):
    """ONNX Runtime's MatMulNBits on our packing equals A times the quantized weights (computed without packing,
    ``fake_quantize``) at level 0, or the int8-blocked A times them at level 4, to fp32 rounding — and a packing
    with the nibbles swapped does not."""
    rng = np.random.default_rng(K + level)
    w = rng.standard_normal((K, 40)) * 0.05
    a = rng.standard_normal((6, K)).astype(np.float32)
    packed, scales = q4.quantize(w)
    want = (q4.quantize_activation_blocks(a) if level == 4 else a.astype(np.float64)) @ q4.fake_quantize(w)
    got = _one_node(K, 40, packed, scales, level).run(None, {"a": a})[0]
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    swapped = (packed >> 4) | (packed << 4)
    wrong = _one_node(K, 40, swapped, scales, level).run(None, {"a": a})[0]
    assert np.abs(wrong - want).max() > 0.05 * np.abs(want).max()


# ---- graphs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["int4", "int8", "fp32"])
def test_builder_writes_int4_graphs_that_pass_the_checks_and_run(head, tiny_cfg, tiny_weights, tmp_path):
    """Every weight MatMul in the gam functions is a 4-bit MatMulNBits (tiny: S = 16 < one block, padded), both
    graphs and their inlined twins pass the ONNX checker and the structural/precision/scope checks, and chunked
    steps equal the prefill graph."""
    plan = Int4Plan(head=head)
    runs = {}
    for kind in ("prefill", "step"):
        model = build_graph(tiny_cfg, tiny_weights, kind, precision="int4", int4=plan)
        nbits = [n for f in model.functions for n in f.node if n.op_type == "MatMulNBits"]
        assert sorted(n.output[0].split("/")[0] for n in nbits) == sorted(
            ["MemoryRead", "MemoryRead", "GatedFusion", "FeedForward", "FeedForward"])
        assert all(a.i == 4 for n in nbits for a in n.attribute if a.name == "bits")
        for inlined, proto in ((False, model), (True, inline(model))):
            path = tmp_path / f"{kind}.{inlined}.onnx"
            path.write_bytes(serialize(proto))
            check_graph_file(path, tiny_cfg, "int4")
            runs[kind, inlined] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(0, tiny_cfg.vocab_size, (2, 12))
    full = runs["prefill", False].run(None, {"input_ids": ids})
    assert np.array_equal(full[0], runs["prefill", True].run(None, {"input_ids": ids})[0])
    _, *states = runs["prefill", False].run(None, {"input_ids": ids[:, :5]})
    logits = runs["step", True].run(None, {"input_ids": ids[:, 5:], "position_ids": _positions(2, 5, 7),
                                           **past_tensors(np.stack(states, axis=1))})[0]
    np.testing.assert_allclose(logits, full[0][:, -1:], atol=1e-4 * np.abs(full[0]).max())   # the last position
    # Values: at accuracy_level 0 the graph is the emulation to fp32 noise (the head's packed rows unpacked by the
    # embedding, the memory read's K = 16 padded to one block of 32).
    exact = Int4Plan(head=head, accuracy_level=0)
    got = ort.InferenceSession(serialize(build_graph(tiny_cfg, tiny_weights, "prefill", precision="int4", int4=exact)),
                               providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    want = int4_plan(tiny_cfg, int4_weights(tiny_cfg, tiny_weights, exact), ids, exact)
    assert relative_rms(got[0], want[0]) < PLAN_RMS and np.abs(np.stack(got[1:], axis=1) - want[1]).max() < 1e-5


def test_precision_check_refuses_a_graph_that_is_not_int4(tiny_cfg, tiny_weights):
    fp32 = build_graph(tiny_cfg, tiny_weights, "prefill")
    problems = precision_problems(fp32, "int4")
    assert len(problems) == 5 * tiny_cfg.n_layers and all("is not a MatMulNBits" in p for p in problems)
    assert precision_problems(build_graph(tiny_cfg, tiny_weights, "prefill", precision="int4"), "int4") == []


# ---- the emulation gate (demo model: real weights, real text) -----------------------------------------------
@pytest.fixture(scope="module")
def demo():
    from gamexport.checkpoint import load_checkpoint
    from gamexport.parity.references import held_out_ids
    from gamexport.sources import demo_folder

    folder = demo_folder()
    if folder is None:
        pytest.skip("the demo checkpoint is not installed")
    ckpt = load_checkpoint(folder)
    return ckpt, held_out_ids(ckpt)[-2:, :64]


def _positions(batch: int, start: int, size: int) -> np.ndarray:
    """position_ids [batch, size]: every token's position, from ``start``."""
    return np.broadcast_to(np.arange(start, start + size, dtype=np.int64), (batch, size)).copy()


def _logits(model, ids, **feeds):
    sess = ort.InferenceSession(serialize(model), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids, **feeds})


def _planted(model, name, change):
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    tensor = next(t for t in bad.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()), name))
    return bad


def _one_block(scales):
    scales[3, 1] *= 1.03
    return scales


PLANTED = {"one block's scale x1.03": ("blocks.2.memory_bank.q4T.scale", _one_block),
           "a whole tensor's scales x1.03": ("blocks.1.ffn.2.weight.q4.scale", lambda s: s * np.float32(1.03)),
           "one layer's gate bias dropped": ("blocks.3.gate.bias", np.zeros_like)}


def test_emulation_agrees_with_onnx_runtime_and_planted_bugs_are_caught(demo):
    """Both gates pass the clean graphs (prefill and a step from the prefill's state) and fail each planted bug:
    the level-0 twin under PLAN_RMS catches all three, the graph as written (level 4) the coarse two."""
    ckpt, ids = demo
    cfg, plan = ckpt.config, Int4Plan()
    assert plan.accuracy_level == 4
    level0 = Int4Plan(accuracy_level=0)
    table = int4_weights(cfg, ckpt.weights, plan)
    want4, state = int4_plan(cfg, table, ids[:, :48], plan)
    want0, _ = int4_plan(cfg, table, ids[:, :48], level0)
    prefill = build_graph(cfg, ckpt.weights, "prefill", precision="int4", int4=plan)

    def distances(model):
        return (relative_rms(_logits(with_accuracy_level(model, 0), ids[:, :48])[0], want0),
                relative_rms(_logits(model, ids[:, :48])[0], want4))

    clean0, clean4 = distances(prefill)
    assert clean0 < PLAN_RMS and clean4 < WRITTEN_RMS[4]
    step = build_graph(cfg, ckpt.weights, "step", precision="int4", int4=plan)
    got = _logits(with_accuracy_level(step, 0), ids[:, 48:], position_ids=_positions(2, 48, ids.shape[1] - 48),
                  **past_tensors(state))
    want, want_state = int4_plan(cfg, table, ids[:, 48:], level0, position=48, state=state, last_only=True)
    assert relative_rms(got[0], want) < PLAN_RMS and np.abs(np.stack(got[1:], axis=1) - want_state).max() < 1e-5
    for label, (name, change) in PLANTED.items():
        bug0, bug4 = distances(_planted(prefill, name, change))
        assert bug0 > 4 * PLAN_RMS, label
        if label != "one block's scale x1.03":   # under level 4's own noise: the level-0 twin is the gate for it
            assert bug4 > WRITTEN_RMS[4], label


def test_the_build_writes_and_judges_the_plan_it_was_given(tmp_path, monkeypatch):
    """``--int4-block 64 --int4-head int4``: the graphs carry that plan, and the build's emulation reference is of
    that plan — an emulation of the default plan instead (the bug planted below) fails the int4 rows."""
    import json

    import onnx

    from gamexport.graph.builder import META_INT4_PLAN
    from gamexport.parity import emulation
    from gamexport.pipeline import BuildOptions, build

    plan = Int4Plan(block_size=64, head="int4")
    result = build(BuildOptions(preset="tiny", out=tmp_path / "ok", precisions=("int4",), int4=plan, latency=False,
                                threads=1))
    assert result.passed
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "ok" / "step.int4.onnx")).metadata_props}
    assert json.loads(meta[META_INT4_PLAN]) == {"accuracy_level": 4, "block_size": 64, "head": "int4"}
    rows = [r for r in result.report["parity"] if r["reference"] == "emulation-int4"]
    assert rows and all(r["passed"] and r.get("gated", True) for r in rows)

    default_plan = emulation._int4_emulation
    monkeypatch.setattr(emulation, "_int4_emulation", lambda ckpt, calibration, int4: default_plan(ckpt, calibration,
                                                                                                 None))
    monkeypatch.setattr(emulation, "EMULATIONS", tuple(
        e if e.precision != "int4" else emulation.Emulation(e.name, e.precision, emulation._int4_emulation,
                                                            e.tolerance) for e in emulation.EMULATIONS))
    monkeypatch.setattr(emulation, "BY_NAME", {e.name: e for e in emulation.EMULATIONS})
    from gamexport.errors import ParityError

    with pytest.raises(ParityError, match="gated parity checks failed"):
        build(BuildOptions(preset="tiny", out=tmp_path / "bad", precisions=("int4",), int4=plan, latency=False,
                           threads=1))
    failed = json.loads((tmp_path / "bad.failed" / "report.json").read_text())["parity"]
    assert {r["reference"] for r in failed if not r["passed"]} == {"emulation-int4"}
