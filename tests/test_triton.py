"""Triton model repository: layout, and config.pbtxt parsed against Triton's ModelConfig schema and checked
against the ONNX graphs' I/O (names, dtypes, dims) — the semantics that parsing alone does not check."""

from __future__ import annotations

import onnx
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from gamexport.errors import GraphError
from gamexport.engines.triton import write_model_repository

ONNX_TO_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def _model_config_class():
    """``inference.ModelConfig`` from tritonclient when installed; otherwise the subset of Triton's
    model_config.proto that gamexport writes, with the same field names, types and enum values."""
    try:
        from tritonclient.grpc import model_config_pb2
        return model_config_pb2.ModelConfig
    except ImportError:
        pass
    f = descriptor_pb2.FileDescriptorProto(name="gamexport_test_model_config.proto", package="inference",
                                           syntax="proto3")
    dtype = f.enum_type.add(name="DataType")
    for i, n in enumerate(["INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                           "INT64", "FP16", "FP32", "FP64", "STRING", "BF16"]):
        dtype.value.add(name=f"TYPE_{n}", number=i)
    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED

    def msg(name, fields):
        m = f.message_type.add(name=name)
        for number, (fname, ftype, label, type_name) in enumerate(fields, start=1):
            field = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
        return m

    tensor = [("name", F.TYPE_STRING, opt, None), ("data_type", F.TYPE_ENUM, opt, ".inference.DataType"),
              ("dims", F.TYPE_INT64, rep, None)]
    msg("ModelInput", tensor)
    msg("ModelOutput", tensor)
    group = msg("ModelInstanceGroup", [("name", F.TYPE_STRING, opt, None), ("count", F.TYPE_INT32, opt, None),
                                       ("gpus", F.TYPE_INT32, rep, None),
                                       ("kind", F.TYPE_ENUM, opt, ".inference.ModelInstanceGroup.Kind")])
    kind = group.enum_type.add(name="Kind")
    for i, n in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=n, number=i)
    msg("ModelConfig", [("name", F.TYPE_STRING, opt, None), ("platform", F.TYPE_STRING, opt, None),
                        ("max_batch_size", F.TYPE_INT32, opt, None),
                        ("input", F.TYPE_MESSAGE, rep, ".inference.ModelInput"),
                        ("output", F.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
                        ("instance_group", F.TYPE_MESSAGE, rep, ".inference.ModelInstanceGroup")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


@pytest.fixture(scope="module")
def repo(tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "models"
    written = write_model_repository(tiny_build, out)
    return out, written


def _parse(path):
    cls = _model_config_class()
    return text_format.Parse(path.read_text(), cls())


def test_layout(repo, tiny_build):
    out, written = repo
    assert set(written) == {"gam_prefill", "gam_step"}
    for name, source in (("gam_prefill", "model.onnx"), ("gam_step", "step.onnx")):
        assert sorted(p.relative_to(out / name).as_posix() for p in (out / name).rglob("*") if p.is_file()) == \
            ["1/model.onnx", "config.pbtxt"]
        assert (out / name / "1" / "model.onnx").read_bytes() == (tiny_build / source).read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging folders left behind"


@pytest.mark.parametrize("name,source", [("gam_prefill", "model.onnx"), ("gam_step", "step.onnx")])
def test_config_matches_onnx_io(repo, tiny_build, tiny_cfg, name, source):
    out, _ = repo
    cfg = _parse(out / name / "config.pbtxt")
    assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
    model = onnx.load(str(tiny_build / source), load_external_data=False)
    enum = cfg.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type

    def expected(values):
        return [(v.name, ONNX_TO_TRITON[v.type.tensor_type.elem_type],
                 [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
                for v in values]

    def written(tensors):
        return [(t.name, enum.values_by_number[t.data_type].name, list(t.dims)) for t in tensors]

    assert written(cfg.input) == expected(model.graph.input)
    assert written(cfg.output) == expected(model.graph.output)
    # the state behind the batch axis is [layers, k-1, d]; the batch and token axes are dynamic
    c = tiny_cfg
    state = [-1, c.n_layers, c.kernel_size - 1, c.d_model]
    dims = {t.name: list(t.dims) for t in list(cfg.input) + list(cfg.output)}
    assert dims["input_ids"] == [-1, -1] and dims["logits"] == [-1, -1, c.vocab_size]
    assert dims.get("conv_state") == state
    if name == "gam_step":
        assert dims["position_ids"] == [-1, 1] and dims["conv_state_out"] == state
    assert len(cfg.instance_group) == 1 and cfg.instance_group[0].count == 1
    kind_enum = cfg.instance_group[0].DESCRIPTOR.fields_by_name["kind"].enum_type
    assert kind_enum.values_by_number[cfg.instance_group[0].kind].name == "KIND_CPU"


def test_step_config_documents_client_carried_state(repo):
    out, _ = repo
    text = (out / "gam_step" / "config.pbtxt").read_text()
    assert "client carries the state" in text.lower() and "sequence batcher" in text


def test_gpu_group_and_rewrite_in_place(tiny_build, tmp_path):
    out = tmp_path / "models"
    (out / "other_model").mkdir(parents=True)
    write_model_repository(tiny_build, out)
    write_model_repository(tiny_build, out, instance_kind="KIND_GPU", instance_count=2, gpus=[0], inlined=True)
    cfg = _parse(out / "gam_prefill" / "config.pbtxt")
    group = cfg.instance_group[0]
    assert group.count == 2 and list(group.gpus) == [0]
    assert (out / "gam_prefill" / "1" / "model.onnx").read_bytes() == \
        (tiny_build / "model.inlined.onnx").read_bytes()
    assert (out / "other_model").is_dir(), "models that are not ours are left alone"


def test_bad_arguments_refused_in_one_line(tiny_build, tmp_path):
    with pytest.raises(GraphError, match="does not exist"):
        write_model_repository(tmp_path / "nope", tmp_path / "models")
    with pytest.raises(GraphError, match="instance kind"):
        write_model_repository(tiny_build, tmp_path / "models", instance_kind="GPU")
    with pytest.raises(GraphError, match="gpus can only"):
        write_model_repository(tiny_build, tmp_path / "models", gpus=[0])
