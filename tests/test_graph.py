"""The custom ONNX graph: structure, opset/IR pins, dynamic axes, determinism, and ONNX Runtime parity."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
import pytest
import torch

from gamexport.config import (INPUT_IDS, LOGITS, POSITION_IDS, io_spec, past_state_name, present_state_name,
                              present_state_names)
from gamexport.graph import FUNCTION_DOMAIN, IR_VERSION, OPSET, build_graph, inline
from gamexport.graph.builder import serialize
from gamexport.graph.checks import FUNCTION_NAMES, structure_problems
from gamexport.model import build_model
from gamexport.state import packed_present, past_tensors


@pytest.fixture(scope="module")
def graphs(tiny_cfg, tiny_weights):
    return {kind: build_graph(tiny_cfg, tiny_weights, kind, source_sha256="abc") for kind in ("prefill", "step")}


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(serialize(model), so, providers=["CPUExecutionProvider"])


def _run(sess, ids, first=None, state=None):
    """(logits, packed state) of a prefill (``first`` None) or of a step at positions first + 0..T-1 per row."""
    feeds = {INPUT_IDS: ids}
    if first is not None:
        first = np.asarray(first, np.int64).reshape(-1, 1)
        feeds[POSITION_IDS] = first + np.arange(ids.shape[1], dtype=np.int64)[None, :]
        feeds.update(past_tensors(state))
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return out[LOGITS], packed_present(out, len(out) - 1)


def test_step_graph_io_is_the_ecosystem_convention(graphs, tiny_cfg):
    """onnxruntime-genai (lfm2), Optimum and transformers.js: per-layer rank-3 conv states, every position's id."""
    def io(values):
        return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                 onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in values]

    k1, d, V = tiny_cfg.state_len, tiny_cfg.d_model, tiny_cfg.vocab_size
    step, pre = graphs["step"], graphs["prefill"]
    assert io(step.graph.input) == [("input_ids", ["batch", "chunk"], "int64"),
                                    ("position_ids", ["batch", "chunk"], "int64"),
                                    ("past_key_values.0.conv_state", ["batch", k1, d], "float32"),
                                    ("past_key_values.1.conv_state", ["batch", k1, d], "float32")]
    # the chunk's last position only, as a static 1: onnxruntime-genai reads that as "pruned" prefill logits
    assert io(step.graph.output) == [("logits", ["batch", 1, V], "float32"),
                                     ("present.0.conv_state", ["batch", k1, d], "float32"),
                                     ("present.1.conv_state", ["batch", k1, d], "float32")]
    assert io(pre.graph.input) == [("input_ids", ["batch", "sequence"], "int64")]
    assert io(pre.graph.output) == [("logits", ["batch", "sequence", V], "float32"),
                                    ("present.0.conv_state", ["batch", k1, d], "float32"),
                                    ("present.1.conv_state", ["batch", k1, d], "float32")]
    assert [n for n, _, _ in io_spec(tiny_cfg, "step")["outputs"][1:]] == present_state_names(tiny_cfg)
    assert (past_state_name(1), present_state_name(1)) == ("past_key_values.1.conv_state", "present.1.conv_state")


def test_step_graph_uses_every_position_as_given(graphs, tiny_cfg, tiny_weights):
    """position_ids [B, T] feeds the positional Gather directly: a row's positions are its own (not first + i)."""
    step = _session(graphs["step"])
    ids = np.random.default_rng(2).integers(0, tiny_cfg.vocab_size, size=(1, 3))
    state = np.zeros((1, tiny_cfg.n_layers, tiny_cfg.state_len, tiny_cfg.d_model), np.float32)
    feeds = {INPUT_IDS: ids, **past_tensors(state)}
    a, b, c = (step.run(["logits"], {**feeds, POSITION_IDS: np.array([p], np.int64)})[0]
               for p in ([5, 6, 7], [5, 6, 9], [8, 6, 7]))
    assert np.abs(a - b).max() > 1e-3   # the last token's position embedding is row 9's
    assert np.abs(a - c).max() > 1e-3   # the first token's reaches the last through the conv


def test_step_graph_returns_the_last_position_only(graphs, tiny_cfg):
    """The head runs on the chunk's last position: a chunk's logits are prefill's last row, at any chunk length
    (a graph slicing the first position, or none, fails here)."""
    pre, step = _session(graphs["prefill"]), _session(graphs["step"])
    ids = np.random.default_rng(4).integers(0, tiny_cfg.vocab_size, size=(2, 9))
    full, full_state = _run(pre, ids)
    zero = np.zeros((2, tiny_cfg.n_layers, tiny_cfg.state_len, tiny_cfg.d_model), np.float32)
    for T in (1, 2, 9):
        logits, _ = _run(step, ids[:, :T], [0, 0], zero)
        assert logits.shape == (2, 1, tiny_cfg.vocab_size)
        np.testing.assert_allclose(logits, full[:, T - 1:T], rtol=0, atol=1e-5)


def test_pins_and_checker(graphs, tiny_cfg):
    for model in graphs.values():
        assert model.ir_version == IR_VERSION == 10
        assert {o.domain: o.version for o in model.opset_import}[""] == OPSET == 20
        onnx.checker.check_model(model, full_check=True)
        onnx.checker.check_model(inline(model), full_check=True)
        assert structure_problems(model, tiny_cfg) == []
        assert structure_problems(inline(model), tiny_cfg) == []


def test_one_function_per_path_and_weights_as_initializers(graphs, tiny_cfg, tiny_weights):
    model = graphs["prefill"]
    names = {(f.domain, f.name) for f in model.functions}
    assert names == {(FUNCTION_DOMAIN, n) for n in FUNCTION_NAMES}
    block = next(f for f in model.functions if f.name == "Block")
    assert [n.op_type for n in block.node if n.domain == FUNCTION_DOMAIN] == [
        "CausalConv", "MemoryRead", "GatedFusion", "FeedForward"]
    assert not any(n.op_type == "Constant" and n.attribute[0].t.dims and n.attribute[0].t.dims[0] > 8
                   for f in model.functions for n in f.node), "weights must not live inside functions"
    inits = {i.name for i in model.graph.initializer}
    assert inits == set(tiny_weights)  # state_dict names, tied head stored once
    calls = [n for n in model.graph.node if n.domain == FUNCTION_DOMAIN]
    assert [n.op_type for n in calls] == ["Block"] * tiny_cfg.n_layers
    mem = next(f for f in model.functions if f.name == "MemoryRead")
    assert [n.op_type for n in mem.node] == ["Transpose", "MatMul", "Softmax", "MatMul"]  # no scaling
    inlined = inline(model)
    assert not inlined.functions and all(n.domain != FUNCTION_DOMAIN for n in inlined.graph.node)


def test_structure_check_catches_a_missing_function(graphs, tiny_cfg):
    broken = onnx.ModelProto()
    broken.CopyFrom(graphs["prefill"])
    keep = [f for f in broken.functions if f.name != "MemoryRead"]
    del broken.functions[:]
    broken.functions.extend(keep)
    problems = structure_problems(broken, tiny_cfg)
    assert any("MemoryRead" in p for p in problems)


def test_metadata(graphs, tiny_cfg):
    meta = {p.key: p.value for p in graphs["step"].metadata_props}
    assert meta["gamexport.graph"] == "step"
    assert meta["gamexport.source_sha256"] == "abc"
    assert "gamexport.version" in meta
    from gamexport.graph import read_graph_config
    assert read_graph_config(graphs["step"])[0] == tiny_cfg


def test_byte_identical_rebuilds(tiny_cfg, tiny_weights):
    for kind in ("prefill", "step"):
        a = serialize(build_graph(tiny_cfg, tiny_weights, kind))
        b = serialize(build_graph(tiny_cfg, {k: v.copy() for k, v in tiny_weights.items()}, kind))
        assert a == b
        assert serialize(inline(build_graph(tiny_cfg, tiny_weights, kind))) == serialize(
            inline(build_graph(tiny_cfg, tiny_weights, kind)))


@pytest.mark.parametrize("length_name", ["1", "2", "k", "P"])
def test_dynamic_axes_prefill_parity(graphs, tiny_cfg, tiny_weights, length_name):
    T = {"1": 1, "2": 2, "k": tiny_cfg.kernel_size, "P": tiny_cfg.max_positions}[length_name]
    sess = _session(graphs["prefill"])
    model = build_model(tiny_cfg, tiny_weights)
    for batch in (1, 3):
        ids = np.random.default_rng(T + batch).integers(0, tiny_cfg.vocab_size, size=(batch, T))
        logits, state = _run(sess, ids)
        with torch.no_grad():
            ref_logits, ref_state = model.prefill(torch.from_numpy(ids))
        assert logits.shape == (batch, T, tiny_cfg.vocab_size)
        assert state.shape == (batch, tiny_cfg.n_layers, tiny_cfg.state_len, tiny_cfg.d_model)
        np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(state, ref_state.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n,m", [(0, 1), (0, 3), (1, 2), (2, 5), (5, 6), (10, 64), (63, 64)])
def test_step_graph_chunks_equal_prefill(graphs, tiny_cfg, n, m):
    pre, step = _session(graphs["prefill"]), _session(graphs["step"])
    ids = np.random.default_rng(n + 7 * m).integers(0, tiny_cfg.vocab_size, size=(2, 64))
    full, _ = _run(pre, ids)
    if n == 0:
        state = np.zeros((2, tiny_cfg.n_layers, tiny_cfg.state_len, tiny_cfg.d_model), np.float32)
    else:
        state = _run(pre, ids[:, :n])[1]
    chunk, new_state = _run(step, ids[:, n:m], [n, n], state)
    np.testing.assert_allclose(chunk, full[:, m - 1:m], rtol=0, atol=1e-5)   # the chunk's last position
    np.testing.assert_allclose(new_state, _run(pre, ids[:, :m])[1], rtol=0, atol=1e-5)


def test_step_graph_rows_at_different_positions(graphs, tiny_cfg, tiny_weights):
    """position_ids is per row: a server can batch sequences that are at different points."""
    step = _session(graphs["step"])
    model = build_model(tiny_cfg, tiny_weights)
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, tiny_cfg.vocab_size, size=(2, 30))
    na, nb = 4, 17
    with torch.no_grad():
        sa = model.prefill(torch.from_numpy(a[None, :na]))[1]
        sb = model.prefill(torch.from_numpy(b[None, :nb]))[1]
        ra = model.prefill(torch.from_numpy(a[None, :na + 3]))[0][:, -1:]
        rb = model.prefill(torch.from_numpy(b[None, :nb + 3]))[0][:, -1:]
    ids = np.stack([a[na:na + 3], b[nb:nb + 3]])
    logits, _ = _run(step, ids, [na, nb], torch.cat([sa, sb]).numpy())
    np.testing.assert_allclose(logits, torch.cat([ra, rb]).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_plan_is_in_the_graph(tiny_cfg, tiny_weights, precision):
    from gamexport.graph.checks import precision_problems

    for kind in ("prefill", "step"):
        model = build_graph(tiny_cfg, tiny_weights, kind, precision=precision)
        onnx.checker.check_model(model, full_check=True)
        assert precision_problems(model, precision) == []
        # A graph that silently stayed fp32 fails the half check, and vice versa: the check can fail.
        assert len(precision_problems(build_graph(tiny_cfg, tiny_weights, kind), precision)) == \
            5 * tiny_cfg.n_layers + 1
        assert len(precision_problems(model, "fp32")) == 5 * tiny_cfg.n_layers + 1
        # Graph inputs and outputs keep their types.
        io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
        assert io[INPUT_IDS] == onnx.TensorProto.INT64
        assert all(t == onnx.TensorProto.FLOAT for name, t in io.items() if name != INPUT_IDS and
                   name != POSITION_IDS)


def test_fp16_graph_on_ort_is_fp16_weights_fp32_compute(tiny_cfg, tiny_weights):
    """ORT's CPU provider computes fp16 MatMuls in fp32: the graph equals fp32 math on fp16-rounded weights."""
    from gamexport.graph.emulate import emulate_logits, round_weights

    ids = np.random.default_rng(2).integers(0, tiny_cfg.vocab_size, size=(1, 40))
    logits = _session(build_graph(tiny_cfg, tiny_weights, "prefill", precision="fp16")).run(None, {INPUT_IDS: ids})[0]
    with torch.no_grad():
        rounded = build_model(tiny_cfg, round_weights(tiny_weights, "fp16")).prefill(torch.from_numpy(ids))[0]
        exact = build_model(tiny_cfg, tiny_weights).prefill(torch.from_numpy(ids))[0]
    assert np.abs(logits - rounded.numpy()).max() < 1e-5
    assert np.abs(logits - exact.numpy()).max() > 1e-4  # it is not the fp32 model
    # The torch emulation of true half compute stays within the fp16 gate of fp32.
    emu = emulate_logits(tiny_weights, tiny_cfg, ids, "fp16")
    assert np.abs(emu - exact.numpy()).max() < 1e-2


def test_bf16_graph_runs_in_the_onnx_reference_evaluator(tiny_cfg, tiny_weights):
    """ORT's CPU provider has no bf16 kernels; onnx.reference executes the inlined bf16 graph."""
    from onnx.reference import ReferenceEvaluator

    from gamexport.parity import compare_logits, tolerance

    ids = np.random.default_rng(4).integers(0, tiny_cfg.vocab_size, size=(1, 12))
    model = onnx.shape_inference.infer_shapes(inline(build_graph(tiny_cfg, tiny_weights, "prefill",
                                                                 precision="bf16")))
    logits = ReferenceEvaluator(model).run(None, {INPUT_IDS: ids})[0]
    with torch.no_grad():
        exact = build_model(tiny_cfg, tiny_weights).prefill(torch.from_numpy(ids))[0].numpy()
    result = compare_logits(exact, logits, tolerance("bf16"))
    assert result["passed"], result
    assert result["max_abs_diff"] > 1e-4  # bf16 rounding is visible: it did not compute in fp32 throughout


def test_int8_dynamic_quantizes_every_weight_matmul(tiny_build, tiny_cfg, tmp_path):
    from gamexport.errors import GraphError
    from gamexport.graph.checks import check_int8_dynamic_file

    path = tiny_build / "model.int8-dyn.onnx"
    check_int8_dynamic_file(path, tiny_cfg)  # 5 per block + head
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["gamexport.precision"] == "int8-dyn" and "gamexport.config" in meta
    # The unquantized graph fails the same check: it can fail.
    with pytest.raises(GraphError, match=r"quantizes 0 of 11 weight MatMuls \(11 float MatMuls left\)"):
        check_int8_dynamic_file(tiny_build / "step.inlined.onnx", tiny_cfg)


def test_int8_dynamic_is_deterministic(tiny_build, tmp_path):
    from gamexport.engines.ort import write_int8_dynamic

    again = write_int8_dynamic(tiny_build / "step.inlined.onnx", tmp_path / "step.int8-dyn.onnx")
    assert again.read_bytes() == (tiny_build / "step.int8-dyn.onnx").read_bytes()


@pytest.fixture(scope="module")
def int8_graphs(tiny_cfg, tiny_weights):
    from gamexport.calibration import calibrate

    ids = np.random.default_rng(11).integers(0, tiny_cfg.vocab_size, size=(2, 64))
    table = calibrate(tiny_cfg, tiny_weights, [ids])
    return {kind: build_graph(tiny_cfg, tiny_weights, kind, precision="int8", calibration=table)
            for kind in ("prefill", "step")}, table


def test_int8_graph_quantizes_every_weight_matmul(int8_graphs, tiny_cfg, tiny_weights):
    from gamexport.graph.checks import precision_problems

    graphs, table = int8_graphs
    assert set(table) == {f"blocks.{i}.act.{a}" for i in range(tiny_cfg.n_layers) for a in ("h", "hn", "gelu")} | {
        "act.x_f"}
    for model in graphs.values():
        onnx.checker.check_model(model, full_check=True)
        assert structure_problems(model, tiny_cfg) == []
        assert precision_problems(model, "int8") == []
        inits = {t.name: t for t in model.graph.initializer}
        int8 = [name for name, t in inits.items() if t.data_type == onnx.TensorProto.INT8]
        # Five weight MatMuls per block (memory scores and read use two int8 copies of M) and the tied head, whose
        # int8 values the embedding gathers from an exact fp16 copy.
        assert len(int8) == 5 * tiny_cfg.n_layers + 1
        emb = numpy_helper.to_array(inits["token_embedding.weight.q_fp16"])
        np.testing.assert_array_equal(emb.T, numpy_helper.to_array(inits["token_embedding.weight.qT"]))
        zero_points = [n for n in inline(model).graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                       and len(n.input) == 3]
        for node in zero_points:  # symmetric: every explicit zero point is int8 0
            producer = next(p for p in inline(model).graph.node if node.input[2] in p.output)
            assert numpy_helper.to_array(producer.attribute[0].t) == 0
    assert len(precision_problems(build_graph(tiny_cfg, tiny_weights, "step"), "int8")) > 0


def test_int8_step_chunks_equal_int8_prefill(int8_graphs, tiny_cfg, tiny_weights):
    """One calibration table for both graphs: streaming in chunks reproduces the INT8 prefill."""
    graphs, _ = int8_graphs
    pre, step = _session(graphs["prefill"]), _session(graphs["step"])
    ids = np.random.default_rng(3).integers(0, tiny_cfg.vocab_size, size=(1, 40))
    full, full_state = _run(pre, ids)
    state = np.zeros((1, tiny_cfg.n_layers, tiny_cfg.state_len, tiny_cfg.d_model), np.float32)
    outs, pos = [], 0
    for size in (1, 2, 3, 9, 25):
        logits, state = _run(step, ids[:, pos:pos + size], [pos], state)
        outs.append(logits)
        pos += size
    ends = np.cumsum((1, 2, 3, 9, 25)) - 1   # each chunk's last position
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full[:, ends], rtol=0, atol=1e-4)
    np.testing.assert_allclose(state, full_state, rtol=0, atol=1e-5)
    with torch.no_grad():
        exact = build_model(tiny_cfg, tiny_weights).prefill(torch.from_numpy(ids))[0].numpy()
    assert 1e-3 < np.abs(full - exact).max() < 0.5 * np.abs(exact).max()  # quantized, but the same model


# ---- function scoping: names TensorRT's importer would bind by name --------------------------------------------
def _calls_model(functions, nodes, inputs=("x",)):
    """A tiny float model [2] → [2] over gam functions (each a list: name, formals, outputs, body nodes)."""
    from onnx import TensorProto, helper

    from gamexport.graph.builder import _opsets

    fs = [helper.make_function(FUNCTION_DOMAIN, name, ins, outs, body, _opsets())
          for name, ins, outs, body in functions]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi(i) for i in inputs], [vi("out")])
    return helper.make_model(graph, opset_imports=_opsets(), functions=fs, ir_version=IR_VERSION)


def _twice(formal="x"):
    from onnx import helper

    return ["Twice", [formal], ["y"], [helper.make_node("Add", [formal, formal], ["y"])]]


def test_scope_check_catches_a_formal_named_like_a_callers_value():
    """The old gam.Block bug in miniature: the callee's formal ``x`` is the caller's input, the argument is x1.
    ONNX Runtime computes -2x; onnx-tensorrt would read the caller's x and compute 2x."""
    from onnx import helper

    from gamexport.graph.checks import scope_problems

    call = lambda arg: helper.make_node("Twice", [arg], ["out"], domain=FUNCTION_DOMAIN)  # noqa: E731
    bad = _calls_model([_twice()], [helper.make_node("Neg", ["x"], ["x1"]), call("x1")])
    assert scope_problems(bad) == [
        "gam.Twice called from the main graph: formal input 'x' is also a name in the caller's scope, so TensorRT "
        "would read that tensor instead of the argument 'x1'"]
    np.testing.assert_array_equal(_session(bad).run(None, {"x": np.array([1, 2], np.float32)})[0], [-2, -4])
    # Bound to that very name, a formal is the caller's tensor anyway; a formal of its own is never ambiguous.
    assert scope_problems(_calls_model([_twice()], [call("x")])) == []
    assert scope_problems(_calls_model([_twice("Twice/x")], [helper.make_node("Neg", ["x"], ["x1"]), call("x1")])) \
        == []


def test_scope_check_looks_through_every_enclosing_scope_and_at_internal_names():
    """gam.Inner's formal ``u`` is no name of gam.Outer, but of the main graph around it: the importer's one
    tensor map holds both. An output or internal value named like a caller's value is refused too."""
    from onnx import helper

    from gamexport.graph.checks import scope_problems

    inner = ["Inner", ["u"], ["v"], [helper.make_node("Neg", ["u"], ["v"])]]
    outer = ["Outer", ["p"], ["r"], [helper.make_node("Abs", ["p"], ["q"]),
                                     helper.make_node("Inner", ["q"], ["r"], domain=FUNCTION_DOMAIN)]]
    main = [helper.make_node("Relu", ["x"], ["u"]), helper.make_node("Outer", ["u"], ["out"], domain=FUNCTION_DOMAIN)]
    problems = scope_problems(_calls_model([inner, outer], main))
    assert "gam.Inner called from gam.Outer: formal input 'u' is also a name in the caller's scope, so TensorRT " \
        "would read that tensor instead of the argument 'q'" in problems
    assert "gam.Outer called from the main graph: its output or internal value 'u' is also a name in the " \
        "caller's scope" in problems  # Inner's formal, registered while importing Outer
    shadow = ["Shadow", ["p"], ["x"], [helper.make_node("Neg", ["p"], ["x"])]]  # output named like main's input
    call = helper.make_node("Shadow", ["x"], ["out"], domain=FUNCTION_DOMAIN)
    assert scope_problems(_calls_model([shadow], [call])) == [
        "gam.Shadow called from the main graph: its output or internal value 'x' is also a name in the caller's scope"]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
def test_every_built_graph_passes_the_scope_check_and_the_old_ones_fail_it(int8_graphs, tiny_cfg, tiny_weights,
                                                                           names_before_scoping, precision):
    from gamexport.graph.checks import scope_problems

    for kind in ("prefill", "step"):
        model = int8_graphs[0][kind] if precision == "int8" else build_graph(tiny_cfg, tiny_weights, kind,
                                                                              precision=precision)
        assert scope_problems(model) == []
        old = scope_problems(names_before_scoping(model))
        assert "gam.FeedForward called from gam.Block: formal input 'x' is also a name in the caller's scope, so " \
            "TensorRT would read that tensor instead of the argument 'x1'" in old
        if precision in ("fp16", "bf16"):
            assert sum("formal input 'h'" in p and "argument 'hm'" in p for p in old) == 2  # MemoryRead, GatedFusion


def test_the_build_check_refuses_a_graph_with_colliding_names(graphs, tiny_cfg, names_before_scoping, tmp_path):
    from gamexport.errors import GraphError
    from gamexport.graph.checks import check_graph_file

    path = tmp_path / "model.onnx"
    path.write_bytes(serialize(graphs["prefill"]))
    check_graph_file(path, tiny_cfg)
    path.write_bytes(serialize(names_before_scoping(graphs["prefill"])))
    with pytest.raises(GraphError, match=r"model.onnx breaks the graph contract: gam.FeedForward called from "
                                         r"gam.Block: formal input 'x' is also a name in the caller's scope"):
        check_graph_file(path, tiny_cfg)


# ---- TensorRT's ONNX operator table ------------------------------------------------------------------------------
#: The types TensorRT's ONNX parser supports per op, for every op the builder emits: the "Supported Types" column
#: of docs/operators.md in onnx/onnx-tensorrt at 96e781103cfc4adf4a6bb557e94bac8e693f6f4c (TensorRT 10), copied
#: row by row. The type is that of the op's data input (input 0), or of its output for Constant/ConstantOfShape;
#: Cast's target type must be listed too. (ConstantOfShape's row reads "INF64", a typo for INT64.)
TRT_OPERATOR_TYPES = {
    "Add": {"FP32", "FP16", "BF16", "INT32", "INT64"},
    "Cast": {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"},
    "Concat": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Constant": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "ConstantOfShape": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "DequantizeLinear": {"INT8", "FP8", "INT4"},
    "Gather": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Gelu": {"FP32", "FP16", "BF16", "INT8", "INT32", "INT64"},
    "Identity": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "LayerNormalization": {"FP32", "FP16", "BF16"},
    "MatMul": {"FP32", "FP16", "BF16"},
    "Mul": {"FP32", "FP16", "BF16", "INT32", "INT64"},
    "QuantizeLinear": {"FP32", "FP16", "BF16"},
    "Range": {"FP32", "FP16", "BF16", "INT32", "INT64"},
    "Reshape": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Shape": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Sigmoid": {"FP32", "FP16", "BF16"},
    "Slice": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Softmax": {"FP32", "FP16", "BF16"},
    "Split": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Squeeze": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Transpose": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
    "Unsqueeze": {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"},
}
_TYPE_NAMES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.INT8: "INT8", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64",
               onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.UINT8: "UINT8"}


def trt_type_problems(model) -> list[str]:
    """Nodes of ``model`` (inlined, types inferred) whose op/type pair TensorRT's operator table does not list.

    One exception, from the parser's code rather than the table: an int8 Constant that only feeds the zero-point
    input of QuantizeLinear/DequantizeLinear (onnxOpImporters.cpp, ``QuantDequantLinearHelper``, reads such a
    constant's weights directly: "For patterns "const" -> Q/DQ, the zero point constant can be shared").
    """
    typed = onnx.shape_inference.infer_shapes(inline(model), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.input]}
    types.update({t.name: t.data_type for t in typed.graph.initializer})
    qdq = ("QuantizeLinear", "DequantizeLinear")
    zero_points = {n.input[2] for n in typed.graph.node if n.op_type in qdq and len(n.input) > 2}
    other_uses = {i for n in typed.graph.node for k, i in enumerate(n.input) if not (n.op_type in qdq and k == 2)}
    problems = []
    for node in typed.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            checked = [types.get(node.output[0])]
            if checked == [onnx.TensorProto.INT8] and node.output[0] in zero_points - other_uses:
                continue
        else:
            checked = [types.get(node.input[0])]
        if node.op_type == "Cast":
            checked.append(next(a.i for a in node.attribute if a.name == "to"))
        for t in checked:
            if _TYPE_NAMES.get(t, str(t)) not in TRT_OPERATOR_TYPES.get(node.op_type, ()):
                problems.append(f"{node.op_type} on {_TYPE_NAMES.get(t, t)} ({node.output[0]})")
    return problems


def trt_restriction_problems(model) -> list[str]:
    """Nodes of ``model`` (inlined, shapes inferred) that break a restriction TensorRT's ONNX parser places on an op
    gamexport emits: the table's "Restrictions" column at the commit above, and the importers in onnxOpImporters.cpp
    there (TensorRT 10.1) — Slice, Squeeze and Unsqueeze axes known when the engine is built (a Constant node or an
    initializer; Squeeze without axes only on a static shape: "Cannot infer squeeze dimensions from a dynamic
    shape"), Q/DQ zero points zero, LayerNormalization's first output only, no sparse or string Constant."""
    typed = onnx.shape_inference.infer_shapes(inline(model), strict_mode=True)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*typed.graph.value_info, *typed.graph.input]}
    consts = {t.name: numpy_helper.to_array(t) for t in typed.graph.initializer}
    for node in typed.graph.node:
        if node.op_type == "Constant":
            attr = node.attribute[0]
            value = (numpy_helper.to_array(attr.t) if attr.name == "value" else
                     np.array(onnx.helper.get_attribute_value(attr)) if attr.name.startswith("value_") else None)
            consts[node.output[0]] = value
    problems = []
    for node in typed.graph.node:
        where = f"{node.op_type} ({node.output[0]})"
        axes = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1}.get(node.op_type)
        if axes is not None and len(node.input) > axes and node.input[axes]:
            if node.input[axes] not in consts:
                problems.append(f"{where}: axes {node.input[axes]!r} are not a constant")
        elif node.op_type == "Squeeze" and None in shapes.get(node.input[0], [None]):
            problems.append(f"{where}: no axes, on the dynamic shape {shapes.get(node.input[0])}")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = consts.get(node.input[2])
            if zp is None or np.any(zp != 0):
                problems.append(f"{where}: zero point {node.input[2]!r} is not a constant zero")
        if node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            problems.append(f"{where}: outputs beyond Y")
        if node.op_type == "Constant" and node.attribute[0].name in ("sparse_value", "value_string", "value_strings"):
            problems.append(f"{where}: a {node.attribute[0].name} Constant")
    return problems


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
def test_every_node_keeps_tensorrts_parser_restrictions(int8_graphs, tiny_cfg, tiny_weights, precision):
    for kind in ("prefill", "step"):
        model = int8_graphs[0][kind] if precision == "int8" else build_graph(tiny_cfg, tiny_weights, kind,
                                                                              precision=precision)
        assert trt_restriction_problems(model) == [], kind


def test_the_restriction_check_can_fail(graphs):
    """Plants, each a graph TensorRT's parser refuses: Slice axes computed at run time, a Squeeze without axes on a
    dynamic shape, a DequantizeLinear with a non-zero zero point."""
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(graphs["prefill"])
    g = model.graph
    def const(name, dtype, dims, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, values))

    g.node.extend([
        const("planted_axes", onnx.TensorProto.INT64, [1], [2]), const("zp", onnx.TensorProto.INT8, [], [3]),
        const("q", onnx.TensorProto.INT8, [2], [1, 2]), const("s", onnx.TensorProto.FLOAT, [], [0.5]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Slice", ["ids_shape", "ids_shape", "ids_shape", "ids_shape"], ["computed_axes"]),
        helper.make_node("Unsqueeze", ["input_ids", "planted_axes"], ["ids_3d"]),
        helper.make_node("Squeeze", ["ids_3d"], ["ids_squeezed"]),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
    ])
    model = onnx.shape_inference.infer_shapes(model)
    problems = trt_restriction_problems(model)
    assert any("Slice (computed_axes): axes 'ids_shape' are not a constant" in p for p in problems), problems
    assert any(p.startswith("Squeeze (ids_squeezed): no axes, on the dynamic shape") for p in problems), problems
    assert any("DequantizeLinear (dq): zero point 'zp' is not a constant zero" in p for p in problems), problems


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
def test_every_op_type_pair_is_in_tensorrts_operator_table(int8_graphs, tiny_cfg, tiny_weights, precision):
    for kind in ("prefill", "step"):
        model = int8_graphs[0][kind] if precision == "int8" else build_graph(tiny_cfg, tiny_weights, kind,
                                                                              precision=precision)
        assert trt_type_problems(model) == []


def test_the_operator_table_check_can_fail(int8_graphs):
    """The INT8 embedding lookup as it was: a Gather of int8 rows and a Cast from int8, neither in the table."""
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(int8_graphs[0]["prefill"])
    rows = next(t for t in model.graph.initializer if t.name == "token_embedding.weight.q_fp16")
    rows.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(rows).astype(np.int8), rows.name))
    assert trt_type_problems(model) == ["Gather on INT8 (tok_emb_q)", "Cast on INT8 (tok_emb_f)"]
    model.graph.node.append(helper.make_node("Constant", [], ["stray"], value=helper.make_tensor(
        "s", onnx.TensorProto.INT8, [], [0])))  # an int8 constant that is no zero point
    assert trt_type_problems(model)[-1] == "Constant on INT8 (stray)"
