"""gamexport.onnxfile: the onnx-free read of an ONNX file before ONNX Runtime loads it, against onnx's own parse.

The oracle is ``onnx.load`` of the same bytes: every tensor it sees (initializers dense and sparse, attribute tensors
of every graph, subgraph and function, training info) is one the walk must judge, the embedding dims it reads are
the ones the walk returns, and a file it cannot decode because it was cut short is one the walk refuses as well.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from gamexport.errors import GraphError
from gamexport.graph import build_graph, inline
from gamexport.graph.builder import embedding_shapes, serialize
from gamexport.graph_metadata import EMBEDDING_TABLES
from gamexport.onnxfile import DecodeError, check_external_data, scan
from test_fuzz import mutate


@pytest.fixture(scope="module")
def step(tiny_cfg, tiny_weights):
    return build_graph(tiny_cfg, tiny_weights, "step", source_sha256="abc")


def _write(tmp_path: Path, model_or_bytes, name: str = "step.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString())
    return path


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every TensorProto onnx.load exposes, wherever it sits (the oracle for what the walk must visit)."""
    found = []

    def graph(g):
        found.extend(g.initializer)
        for sp in g.sparse_initializer:
            found.extend([sp.values, sp.indices])
        nodes(g.node)

    def attribute(a):
        if a.HasField("t"):
            found.append(a.t)
        found.extend(a.tensors)
        if a.HasField("sparse_tensor"):
            found.extend([a.sparse_tensor.values, a.sparse_tensor.indices])
        for sp in a.sparse_tensors:
            found.extend([sp.values, sp.indices])
        if a.HasField("g"):
            graph(a.g)
        for g in a.graphs:
            graph(g)

    def nodes(ns):
        for n in ns:
            for a in n.attribute:
                attribute(a)

    graph(model.graph)
    for f in model.functions:
        nodes(f.node)
        for a in f.attribute_proto:
            attribute(a)
    for t in model.training_info:
        graph(t.initialization)
        graph(t.algorithm)
    return found


def _external(tensor: onnx.TensorProto, location: str) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def test_built_graphs_read_as_onnx_reads_them(tiny_cfg, tiny_weights, tmp_path):
    """Every graph kind and precision the builder writes, with functions and inlined: the walk visits as many
    tensors as onnx.load exposes, none external, and returns the embedding dims onnx reads."""
    from gamexport.calibration import calibrate

    cal = calibrate(tiny_cfg, tiny_weights, [np.arange(8, dtype=np.int64)[None] % tiny_cfg.vocab_size])
    for precision in ("fp32", "fp16", "int8", "int4"):
        for kind in ("prefill", "step"):
            model = build_graph(tiny_cfg, tiny_weights, kind, precision=precision,
                                calibration=cal if precision == "int8" else None)
            for form in (model, inline(model)):
                path = _write(tmp_path, serialize(form))
                found = check_external_data(path, dims_of=EMBEDDING_TABLES)
                assert len(found.tensors) == len(_all_tensors(form)), (precision, kind)
                assert not any(t.external or t.locations for t in found.tensors)
                assert found.initializer_dims == embedding_shapes(form), (precision, kind)


@pytest.mark.parametrize("where", ["initializer", "constant", "function", "subgraph", "subgraph-list",
                                   "attribute-list", "sparse", "sparse-attribute", "sparse-attribute-list",
                                   "function-default", "training-info"])
@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", ""])
def test_external_data_outside_the_folder_is_refused_wherever_it_sits(step, tmp_path, where, location):
    """A tensor reading external data from outside the folder is refused in every place a model can hold one —
    places the old onnx-based check walked (initializers, node and function attribute tensors) and the ones it did
    not (subgraphs, attribute tensor lists, sparse tensors, function attribute defaults, training info), which
    ONNX Runtime would load all the same."""
    model = onnx.ModelProto()
    model.CopyFrom(step)
    bad = numpy_helper.from_array(np.zeros(1, np.float32), "bad")
    _external(bad, location)
    if where == "initializer":
        model.graph.initializer.append(bad)
    elif where == "constant":
        model.graph.node.append(helper.make_node("Constant", [], ["c"], value=bad))
    elif where == "function":
        model.functions[0].node.append(helper.make_node("Constant", [], ["c"], value=bad))
    elif where == "subgraph":
        body = helper.make_graph([helper.make_node("Identity", ["bad"], ["y"])], "body", [],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=[bad])
        model.graph.node.append(helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body))
    elif where == "subgraph-list":
        body = helper.make_graph([], "body", [], [], initializer=[bad])
        model.graph.node.append(helper.make_node("Custom", [], ["c"], domain="x"))
        model.graph.node[-1].attribute.append(helper.make_attribute("bodies", [helper.make_graph([], "b0", [], []),
                                                                                body]))
    elif where == "attribute-list":
        attr = helper.make_attribute("weights", [numpy_helper.from_array(np.zeros(1, np.float32), "ok"), bad])
        model.graph.node.append(helper.make_node("Custom", [], ["c"], domain="x"))
        model.graph.node[-1].attribute.append(attr)
    elif where == "sparse":
        indices = numpy_helper.from_array(np.zeros(1, np.int64), "bad_indices")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(bad, indices, [4]))
    elif where in ("sparse-attribute", "sparse-attribute-list"):   # AttributeProto sparse_tensor / sparse_tensors
        sparse = helper.make_sparse_tensor(bad, numpy_helper.from_array(np.zeros(1, np.int64), "bad_indices"), [4])
        attr = onnx.AttributeProto(name="s", type=onnx.AttributeProto.SPARSE_TENSOR)
        if where == "sparse-attribute":
            attr.sparse_tensor.CopyFrom(sparse)
        else:
            attr.type = onnx.AttributeProto.SPARSE_TENSORS
            attr.sparse_tensors.extend([sparse])
        model.graph.node.append(helper.make_node("Custom", [], ["c"], domain="x"))
        model.graph.node[-1].attribute.append(attr)
    elif where == "function-default":
        model.functions[0].attribute_proto.append(helper.make_attribute("w", bad))
    elif where == "training-info":
        info = model.training_info.add()
        info.initialization.CopyFrom(helper.make_graph([], "init", [], [], initializer=[bad]))
    assert any(t.name == "bad" and t.data_location == TensorProto.EXTERNAL
               for t in _all_tensors(onnx.load_from_string(model.SerializeToString())))
    path = _write(tmp_path, model)
    with pytest.raises(GraphError, match=re.escape(f"step.onnx: tensor 'bad' reads external data from {location!r}, "
                                                   f"outside {tmp_path.resolve()}")):
        check_external_data(path)


def test_external_data_inside_the_folder_is_allowed(step, tmp_path):
    model = onnx.ModelProto()
    model.CopyFrom(step)
    tensor = next(t for t in model.graph.initializer if t.name == "ln_f.bias")
    _external(tensor, "weights/ln_f.bin")
    found = check_external_data(_write(tmp_path, model), dims_of=EMBEDDING_TABLES)
    assert [(t.name, t.locations) for t in found.tensors if t.external] == [("ln_f.bias", ["weights/ln_f.bin"])]
    assert found.initializer_dims == embedding_shapes(step)


def test_a_link_out_of_the_folder_is_refused(step, tmp_path):
    (tmp_path / "out").symlink_to("/etc")
    model = onnx.ModelProto()
    model.CopyFrom(step)
    _external(next(t for t in model.graph.initializer if t.name == "ln_f.bias"), "out/passwd")
    with pytest.raises(GraphError, match="tensor 'ln_f.bias' reads external data from 'out/passwd', outside"):
        check_external_data(_write(tmp_path, model))


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_a_tensor_merged_from_two_occurrences_is_judged_by_every_location(step, tmp_path):
    """A singular message written twice is merged by a parser: a Constant's tensor whose first occurrence says
    "external, in the folder" and whose second only adds a location outside it is, once merged, external data read
    from outside (the last location counts). The walk sees the occurrences apart and refuses the outside location
    wherever it is."""
    first = numpy_helper.from_array(np.zeros(1, np.float32), "merged")
    _external(first, "inside.bin")
    second = TensorProto()
    entry = second.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    attr_bytes = (helper.make_attribute("value", first).SerializeToString()
                  + _field(5, second.SerializeToString()))          # AttributeProto.t, a second time
    node = helper.make_node("Constant", [], ["merged_out"])
    node_bytes = node.SerializeToString() + _field(5, attr_bytes)  # NodeProto.attribute
    data = step.SerializeToString() + _field(7, _field(1, node_bytes))  # ModelProto.graph (merged), GraphProto.node
    merged = next(n for n in onnx.load_from_string(data).graph.node if n.output == ["merged_out"]).attribute[0].t
    assert merged.data_location == TensorProto.EXTERNAL
    assert [e.value for e in merged.external_data if e.key == "location"][-1] == "../../etc/passwd"
    with pytest.raises(GraphError, match=r"reads external data from '\.\./\.\./etc/passwd', outside"):
        check_external_data(_write(tmp_path, data))


def test_a_cut_file_is_refused_exactly_when_onnx_cannot_decode_it(tiny_cfg, tiny_weights, tmp_path):
    """Cut short at the start, at the end, and at random places in between: the walk refuses (as DecodeError)
    every cut onnx.load refuses, and accepts the cuts onnx.load accepts (those between two top-level fields)."""
    data = serialize(build_graph(tiny_cfg, tiny_weights, "step"))
    rng = random.Random(0)
    cuts = {*range(0, 300), *range(len(data) - 300, len(data)), *rng.sample(range(len(data)), 300)}
    path = tmp_path / "cut.onnx"
    verdicts = set()
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        try:
            onnx.load_from_string(data[:cut])
            onnx_ok = True
        except Exception:  # noqa: BLE001 - protobuf's DecodeError
            onnx_ok = False
        try:
            check_external_data(path)
            ours = True
        except GraphError as exc:
            assert re.search(r"cannot read ONNX file \S*cut\.onnx: DecodeError", exc.line()), exc.line()
            ours = False
        assert ours == onnx_ok, f"cut at {cut} of {len(data)}: onnx {'accepts' if onnx_ok else 'refuses'} it"
        verdicts.add(ours)
    assert verdicts == {True, False}  # both kinds of cut were tried


def _unsafe(tensor: onnx.TensorProto, folder: Path) -> bool:
    locations = [e.value for e in tensor.external_data if e.key == "location"]
    if tensor.data_location == TensorProto.EXTERNAL and not locations:
        locations = [""]
    return any(not loc or Path(loc).is_absolute() or folder not in (folder / loc).resolve().parents
               for loc in locations)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_graphs_are_judged_as_onnx_parses_them(step, tmp_path_factory, data):
    """Bytes of a step graph (one tensor's data in a file beside it) flipped, overwritten, inserted or cut: when
    onnx.load decodes them, the walk decodes them too, and refuses the file exactly when a tensor onnx sees reads
    external data from outside the folder; when onnx.load cannot decode them, the walk may refuse them or leave them
    to ONNX Runtime's parser."""
    model = onnx.ModelProto()
    model.CopyFrom(step)
    _external(next(t for t in model.graph.initializer if t.name == "ln_f.bias"), "ln_f.bin")
    original = model.SerializeToString()
    folder = tmp_path_factory.mktemp("m")
    edits = [(data.draw(st.sampled_from(["truncate", "flip", "overwrite", "insert"])),
              data.draw(st.integers(0, len(original))), data.draw(st.binary(min_size=1, max_size=16)))
             for _ in range(data.draw(st.integers(1, 3)))]
    buf = mutate(original, edits)   # the fuzz tests' byte mutator
    path = _write(folder, buf)
    try:
        parsed = onnx.load_from_string(path.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf's DecodeError: no oracle
        parsed = None
    try:
        check_external_data(path)
        refused = None
    except GraphError as exc:
        refused = exc.line()
    if parsed is not None:
        assert refused is None or "DecodeError" not in refused, refused
        unsafe = any(_unsafe(t, folder.resolve()) for t in _all_tensors(parsed))
        assert (refused is not None) == unsafe, refused


@pytest.mark.parametrize("data", [b"\x0f", b"\x00\x01", b"\x08" + b"\xff" * 11, b"\x3a\x05ab", b"\x0c"])
def test_malformed_bytes_are_a_decode_error(tmp_path, data):
    """Wire type 7, field number 0, an overlong varint, a length past the end, an end-group without a start."""
    path = _write(tmp_path, data, "bad.onnx")
    with pytest.raises(DecodeError):
        scan(path)
    with pytest.raises(GraphError, match=r"cannot read ONNX file \S*bad\.onnx: DecodeError"):
        check_external_data(path)


@pytest.mark.parametrize("data,well_formed", [
    (b"\x0b\x08\x01\x0c", True),                    # field 1 as a group holding a varint: an unknown field, skipped
    (b"\x0b\x13\x08\x01\x14\x0c\x08\x0a", True),    # a group inside a group, then ir_version 10
    (b"\x0b\x14", False),                            # a group of field 1 closed by field 2's end-group
    (b"\x0b\x08\x01", False),                        # a group never closed
    (b"\x0b" * 150 + b"\x0c" * 150, False),           # groups nested past protobuf's limit of 100
])
def test_groups_are_skipped_or_refused_as_onnx_parses_them(tmp_path, data, well_formed):
    """Groups (wire types 3 and 4, unknown fields to ONNX) are skipped when well formed and a DecodeError when not,
    exactly where onnx.load refuses the same bytes."""
    try:
        onnx.load_from_string(data)
        onnx_reads = True
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        onnx_reads = False
    assert onnx_reads == well_formed
    path = _write(tmp_path, data, "group.onnx")
    if well_formed:
        assert scan(path).tensors == []
    else:
        with pytest.raises(DecodeError):
            scan(path)


def test_nesting_past_the_limit_is_a_decode_error_not_a_crash(tmp_path):
    """Subgraphs nested 200 deep: DecodeError (protobuf's limit is 100), never Python's RecursionError."""
    graph = b""
    for _ in range(200):
        graph = _field(1, _field(5, _field(6, graph)))  # GraphProto.node → NodeProto.attribute → AttributeProto.g
    with pytest.raises(GraphError, match="DecodeError"):
        check_external_data(_write(tmp_path, _field(7, graph), "deep.onnx"))


def test_an_empty_file_passes_to_onnx_runtime(tmp_path):
    """Zero bytes are an empty ModelProto to onnx too: nothing external; ONNX Runtime refuses it at load."""
    path = _write(tmp_path, b"", "empty.onnx")
    assert onnx.load(str(path)).graph.name == ""
    assert check_external_data(path).tensors == []


def test_reading_imports_no_onnx(tmp_path, step):
    """The module exists so that the runtime path does not import onnx."""
    path = _write(tmp_path, step)
    code = (f"import sys; from gamexport.onnxfile import check_external_data; "
            f"check_external_data({str(path)!r}); sys.exit('onnx' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
