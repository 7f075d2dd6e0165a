"""Triton model repository: layout; every config.pbtxt parsed with the ModelConfig schema that the ``tritonclient``
package ships; and the semantics parsing alone does not check — tensor names and dtypes against the ONNX I/O of
the files in the repository, batch axis left out of ``dims`` (max_batch_size > 0), the step model's implicit state
states past_key_values.{i}.conv_state <- present.{i}.conv_state, one per layer, dims [k-1, d_model] and a zero initial
state, the prefill model's dynamic batcher — plus an emulation of what the sequence batcher does with that state, run with ONNX Runtime."""

from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format

from gamexport.config import PRESETS, past_state_name, present_state_name, present_state_names
from gamexport.errors import GamexportError
from gamexport.bundles.triton import (BuildFolderError, MissingPlanError, TritonConfigError, choose_backend,
                                      write_model_repository)

ONNX_TO_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}
NAMES = {"gam_prefill": "model", "gam_step": "step"}


@functools.lru_cache(maxsize=1)
def _model_config_pb2():
    """``tritonclient.grpc.model_config_pb2`` (needs only protobuf). ``import tritonclient.grpc`` also needs
    grpcio (the ``tritonclient[grpc]`` extra), so without it the generated module is loaded from its file."""
    try:
        from tritonclient.grpc import model_config_pb2
        return model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient.grpc raises RuntimeError when grpcio is missing
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed (pip install tritonclient==2.73.0): its model_config_pb2 "
                    "is the schema config.pbtxt is parsed with")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("_gamexport_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _parse(path: Path):
    pb2 = _model_config_pb2()
    return text_format.Parse(path.read_text(), pb2.ModelConfig())  # unknown fields or bad enums raise


def _enum(message, field: str, value: int) -> str:
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[value].name


def _onnx_io(path: Path) -> tuple[list, list]:
    """[(name, Triton dtype, full dims with -1 for symbolic axes)] of a graph's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)

    def rows(values):
        return [(v.name, ONNX_TO_TRITON[v.type.tensor_type.elem_type],
                 [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
                for v in values]

    return rows(model.graph.input), rows(model.graph.output)


def _config_io(cfg, tensors) -> list:
    """The same rows from a parsed config: full shape = [-1] + dims when max_batch_size > 0."""
    assert cfg.max_batch_size > 0
    return [(t.name, _enum(t, "data_type", t.data_type), [-1, *t.dims]) for t in tensors]


@pytest.fixture(scope="module")
def repo(tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "models"
    written = write_model_repository(tiny_build, out)
    return out, written


# ---- layout ----------------------------------------------------------------------------------------------------
def test_layout(repo, tiny_build):
    out, written = repo
    assert written == {name: out / name for name in NAMES}
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["gam_prefill/1/model.onnx", "gam_prefill/config.pbtxt",
                     "gam_step/1/model.onnx", "gam_step/config.pbtxt"]
    for name, stem in NAMES.items():
        assert (out / name / "1" / "model.onnx").read_bytes() == (tiny_build / f"{stem}.onnx").read_bytes()
    assert not list(out.parent.glob(".*staging*")), "staging folders left behind"


# ---- prefill: dynamic batching ---------------------------------------------------------------------------------
def test_prefill_config(repo, tiny_cfg):
    out, _ = repo
    cfg = _parse(out / "gam_prefill" / "config.pbtxt")
    assert cfg.name == "gam_prefill" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
    onnx_in, onnx_out = _onnx_io(out / "gam_prefill" / "1" / "model.onnx")
    assert _config_io(cfg, cfg.input) == onnx_in
    assert _config_io(cfg, cfg.output) == onnx_out
    c = tiny_cfg
    dims = {t.name: list(t.dims) for t in [*cfg.input, *cfg.output]}
    assert dims == {"input_ids": [-1], "logits": [-1, c.vocab_size],
                    **{present_state_name(i): [c.kernel_size - 1, c.d_model] for i in range(c.n_layers)}}
    assert not any(t.allow_ragged_batch for t in cfg.input), "the graph takes [batch, sequence], not ragged"
    (group,) = cfg.instance_group
    assert group.count == 1 and _enum(group, "kind", group.kind) == "KIND_CPU" and not group.gpus


# ---- step: sequence batcher with implicit state ----------------------------------------------------------------
def test_step_config_implicit_state(repo, tiny_cfg):
    out, _ = repo
    cfg = _parse(out / "gam_step" / "config.pbtxt")
    assert cfg.name == "gam_step" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert cfg.WhichOneof("scheduling_choice") == "sequence_batching"
    seq = cfg.sequence_batching
    assert seq.WhichOneof("strategy_choice") == "oldest"
    assert seq.oldest.max_candidate_sequences == 32 and seq.max_sequence_idle_microseconds == 60_000_000
    assert not seq.control_input, "the graph has no START/END/READY/CORRID input (the ORT backend would need one)"

    c = tiny_cfg
    state_dims = [c.kernel_size - 1, c.d_model]
    assert [(s.input_name, s.output_name) for s in seq.state] == \
        [(past_state_name(i), present_state_name(i)) for i in range(c.n_layers)], "one implicit state per layer"
    onnx_in, onnx_out = _onnx_io(out / "gam_step" / "1" / "model.onnx")
    by_name_in, by_name_out = {r[0]: r for r in onnx_in}, {r[0]: r for r in onnx_out}
    for state in seq.state:
        assert list(state.dims) == state_dims, "state dims are [k-1, d] behind the batch axis"
        (init,) = state.initial_state
        assert init.WhichOneof("state_data") == "zero_data"
        assert init.data_type == state.data_type and list(init.dims) == state_dims and init.name
        # state tensors: in the model, same dtype and shape as configured, behind the batch axis
        for name in (state.input_name, state.output_name):
            onnx_name, onnx_type, onnx_dims = (by_name_in | by_name_out)[name]
            assert onnx_type == _enum(state, "data_type", state.data_type) and onnx_dims == [-1, *state_dims]
    # request tensors: every other graph input/output; the state never crosses the wire
    assert _config_io(cfg, cfg.input) == [r for r in onnx_in if r[0] not in {s.input_name for s in seq.state}]
    assert _config_io(cfg, cfg.output) == [r for r in onnx_out if r[0] not in {s.output_name for s in seq.state}]
    # the ONNX Runtime backend's load check: config inputs + control inputs + states == model inputs
    assert len(cfg.input) + len(seq.control_input) + len(seq.state) == len(onnx_in)
    assert {t.name: list(t.dims) for t in cfg.input} == {"input_ids": [-1], "position_ids": [-1]}


def test_expose_state_and_direct_strategy(tiny_build, tmp_path):
    out = tmp_path / "models"
    write_model_repository(tiny_build, out, expose_state=True, strategy="direct", max_batch_size=4,
                           instance_kind="KIND_GPU", instance_count=2, gpus=[0], sequence_idle_s=5,
                           queue_delay_us=100)
    cfg = _parse(out / "gam_step" / "config.pbtxt")
    assert [t.name for t in cfg.output] == ["logits", *present_state_names(PRESETS["tiny"])]
    assert cfg.sequence_batching.WhichOneof("strategy_choice") == "direct"
    assert cfg.sequence_batching.max_sequence_idle_microseconds == 5_000_000
    (group,) = cfg.instance_group
    assert group.count == 2 and list(group.gpus) == [0] and _enum(group, "kind", group.kind) == "KIND_GPU"
    pre = _parse(out / "gam_prefill" / "config.pbtxt")
    assert pre.max_batch_size == 4 and pre.dynamic_batching.max_queue_delay_microseconds == 100


def test_sequence_batcher_emulation_matches_prefill(repo):
    """Run the repository's step model the way the sequence batcher feeds it — zero initial state of the configured
    dims (batch 1 prepended, as Triton does for max_batch_size > 0), each request's present.{i}.conv_state becoming
    the next request's past_key_values.{i}.conv_state, the client sending only input_ids and position_ids — and
    compare with the prefill model."""
    ort = pytest.importorskip("onnxruntime")
    out, _ = repo
    cfg = _parse(out / "gam_step" / "config.pbtxt")
    states = list(cfg.sequence_batching.state)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    step = ort.InferenceSession(str(out / "gam_step" / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    pre = ort.InferenceSession(str(out / "gam_prefill" / "1" / "model.onnx"), opts,
                               providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 97, size=(1, 23), dtype=np.int64)
    ref_logits, *ref_states = pre.run(["logits", *[s.output_name for s in states]], {"input_ids": ids})

    # initial_state { zero_data: true }, per layer
    server = {s.input_name: np.zeros([1, *s.initial_state[0].dims], dtype=np.float32) for s in states}
    logits, pos = [], 0
    for chunk in (5, 1, 1, 2, 7, 3, 4):  # first request = the prompt, then decode-sized and odd chunks
        request = {"input_ids": ids[:, pos:pos + chunk],
                   "position_ids": np.arange(pos, pos + chunk, dtype=np.int64)[None, :]}
        assert set(request) == {t.name for t in cfg.input}
        out_logits, *presents = step.run(["logits", *[s.output_name for s in states]], {**request, **server})
        server = {s.input_name: p for s, p in zip(states, presents)}   # output_name -> input_name, per layer
        logits.append(out_logits)
        pos += chunk
    assert pos == ids.shape[1]
    ends = np.cumsum((5, 1, 1, 2, 7, 3, 4)) - 1   # a step request returns its chunk's last position's logits
    assert all(chunk.shape == (1, 1, 97) for chunk in logits)
    np.testing.assert_allclose(np.concatenate(logits, axis=1), ref_logits[:, ends], atol=1e-4, rtol=0)
    for s, ref in zip(states, ref_states, strict=True):
        np.testing.assert_allclose(server[s.input_name], ref, atol=1e-5, rtol=0)


# ---- TensorRT backend ------------------------------------------------------------------------------------------
@pytest.fixture
def plans_build(tiny_build, tiny_cfg, tmp_path, monkeypatch):
    """A copy of the tiny build with fp32 plans written by gamexport's own build_engines, driven through the
    TensorRT stand-in of tests/fakes/trt.py (no GPU here; a plan is opaque bytes to the repository writer)."""
    from gamexport.engines import trt as trt_mod
    from fakes.trt import install_fake_trt, make_fake_trt  # pytest puts tests/ on sys.path (rootdir-less modules)

    folder = tmp_path / "build"
    shutil.copytree(tiny_build, folder)
    install_fake_trt(monkeypatch, make_fake_trt(11, []))
    trt_mod.build_engines(folder, tiny_cfg, profiles={"prefill": {"max": "4x64"}, "step": {"max": "4x64"}})
    return folder


def test_tensorrt_backend(plans_build, tmp_path):
    assert choose_backend(plans_build)[0] == "tensorrt"
    out = tmp_path / "models"
    write_model_repository(plans_build, out, backend="tensorrt", max_batch_size=4)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["gam_prefill/1/model.plan", "gam_prefill/config.pbtxt",
                     "gam_step/1/model.plan", "gam_step/config.pbtxt"]
    for name, stem in NAMES.items():
        assert (out / name / "1" / "model.plan").read_bytes() == \
            (plans_build / "tensorrt" / f"{stem}.fp32.plan").read_bytes()
        cfg = _parse(out / name / "config.pbtxt")
        assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 4
        assert _enum(cfg.instance_group[0], "kind", cfg.instance_group[0].kind) == "KIND_GPU"
        onnx_in, onnx_out = _onnx_io(plans_build / f"{stem}.onnx")  # the graph each plan was built from
        states = {s.input_name for s in cfg.sequence_batching.state} | {s.output_name for s in
                                                                          cfg.sequence_batching.state}
        assert _config_io(cfg, cfg.input) == [r for r in onnx_in if r[0] not in states]
        assert _config_io(cfg, cfg.output) == [r for r in onnx_out if r[0] not in states]
    assert _parse(out / "gam_step" / "config.pbtxt").sequence_batching.state[0].input_name == past_state_name(0)

    # Triton forms batches up to max_batch_size: it must fit the plans' profile (built with max batch 4)
    with pytest.raises(TritonConfigError, match="does not fit model.fp32.plan's profile"):
        write_model_repository(plans_build, tmp_path / "m2", backend="tensorrt", max_batch_size=8)
    # a plan built from another graph than the build folder's is refused
    (plans_build / "step.onnx").write_bytes((plans_build / "step.onnx").read_bytes() + b"\0")
    with pytest.raises(MissingPlanError, match="was not built from this build folder's step.onnx"):
        write_model_repository(plans_build, tmp_path / "m3", backend="tensorrt", max_batch_size=4)
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists(), "checked before writing"


def test_tensorrt_without_plans(tiny_build, tmp_path):
    backend, why = choose_backend(tiny_build)
    assert backend == "onnxruntime" and "writing the ONNX Runtime backend only" in why
    with pytest.raises(MissingPlanError) as err:
        write_model_repository(tiny_build, tmp_path / "models", backend="tensorrt")
    line = err.value.line()
    assert "has no fp32 TensorRT plan model.fp32.plan, step.fp32.plan" in line and "\n" not in line
    assert not (tmp_path / "models").exists()


# ---- rewriting and bad input ---------------------------------------------------------------------------------
def test_rewrite_in_place(tiny_build, tmp_path):
    out = tmp_path / "models"
    (out / "other_model").mkdir(parents=True)
    write_model_repository(tiny_build, out)
    write_model_repository(tiny_build, out, inlined=True, name_prefix="gam")
    assert (out / "gam_prefill" / "1" / "model.onnx").read_bytes() == \
        (tiny_build / "model.inlined.onnx").read_bytes()
    assert (out / "other_model").is_dir(), "models that are not ours are left alone"
    assert sorted(p.name for p in out.iterdir()) == ["gam_prefill", "gam_step", "other_model"]


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"backend": "triton"}, TritonConfigError, "Triton backend 'triton' is not one of"),
    ({"instance_kind": "GPU"}, TritonConfigError, "instance kind 'GPU'"),
    ({"gpus": [0]}, TritonConfigError, "gpus can only be listed"),
    ({"max_batch_size": 0}, TritonConfigError, "max batch size must be an integer >= 1"),
    ({"backend": "tensorrt", "instance_kind": "KIND_CPU"}, TritonConfigError, "GPUs only"),
    ({"precision": "int8-dyn", "instance_kind": "KIND_GPU"}, TritonConfigError, "CPU-provider format"),
    ({"precision": "bf16"}, TritonConfigError, "no bf16 kernels"),
    ({"name_prefix": "../x"}, TritonConfigError, "not a valid folder name"),
    ({"strategy": "fifo"}, TritonConfigError, "sequence strategy 'fifo'"),
    ({"sequence_idle_s": 0}, TritonConfigError, "sequence idle time"),
])
def test_bad_arguments_refused_in_one_line(tiny_build, tmp_path, kwargs, error, needle):
    with pytest.raises(error) as err:
        write_model_repository(tiny_build, tmp_path / "models", **kwargs)
    assert isinstance(err.value, GamexportError) and needle in err.value.line() and "\n" not in err.value.line()
    assert not (tmp_path / "models").exists()


def test_missing_build_folder_or_graph(tiny_build, tmp_path):
    with pytest.raises(BuildFolderError, match="build folder .* does not exist"):
        write_model_repository(tmp_path / "nope", tmp_path / "models")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildFolderError, match="model.onnx does not exist"):
        write_model_repository(tmp_path / "empty", tmp_path / "models")
    fp32_only = tmp_path / "fp32"
    fp32_only.mkdir()
    for name in ("model.onnx", "step.onnx"):
        shutil.copyfile(tiny_build / name, fp32_only / name)
    with pytest.raises(BuildFolderError) as err:
        write_model_repository(fp32_only, tmp_path / "models", precision="fp16")
    assert "model.fp16.onnx does not exist (the build holds model.onnx)" in err.value.line()
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("precision,kind", [("fp16", "KIND_CPU"), ("bf16", "KIND_GPU"), ("int8", "KIND_CPU"),
                                            ("int8-dyn", "KIND_CPU")])
def test_every_precision_the_build_wrote(tiny_build, tiny_cfg, tmp_path, precision, kind):
    out = tmp_path / "models"
    write_model_repository(tiny_build, out, precision=precision, instance_kind=kind)
    c = tiny_cfg
    for name, stem in NAMES.items():
        served = out / name / "1" / "model.onnx"
        assert served.read_bytes() == (tiny_build / f"{stem}.{precision}.onnx").read_bytes()
        cfg = _parse(out / name / "config.pbtxt")
        onnx_in, onnx_out = _onnx_io(served)
        states = [s.input_name for s in cfg.sequence_batching.state] + \
            [s.output_name for s in cfg.sequence_batching.state]
        assert _config_io(cfg, cfg.input) == [r for r in onnx_in if r[0] not in states]
        assert _config_io(cfg, cfg.output) == [r for r in onnx_out if r[0] not in states]
        for state in cfg.sequence_batching.state:
            assert list(state.dims) == [c.kernel_size - 1, c.d_model]
