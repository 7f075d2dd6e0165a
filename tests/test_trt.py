"""TensorRT engines and runner.

Without a GPU: the module imports with tensorrt blocked and says how to install it; profiles and the sidecar
compatibility check are pure Python; and the builder and runner are driven end to end through a small stand-in
``tensorrt`` module that mirrors the documented Python API of TensorRT 10 and 11 (11 lacks the removed
FP16/INT8/BF16 builder flags and EXPLICIT_BATCH; STRONGLY_TYPED is bit 1 in 10 and bit 0 in 11), records every
call, and computes with ONNX Runtime on CPU through the device addresses the runner hands it — on the network its
parser imports the way onnx-tensorrt does, binding a local function's formal inputs by name (so a graph whose
function names collide with a caller's computes wrong numbers here, as it would on a GPU). The step engine's
reused buffers, its device-resident state and CUDA-graph capture run the real ``TorchCudaDevice`` over a fake
``torch.cuda`` (CPU tensors; a capture records the stand-in's work instead of running it, and replay runs it with
the shapes and addresses of capture time; like TensorRT, the stand-in cannot capture un-flushed shape changes).
The half-precision plan rows (reference ``emulation-fp16``/``emulation-bf16``) are checked on the CPU with half
arithmetic from onnx's reference evaluator, against graphs that silently compute in fp32.

With a GPU and TensorRT (``-m gpu``): a real engine for the tiny preset matches eager fp32 within 1e-3 max abs
(TF32 disabled at build time, the default) for prefill and chunked step; CUDA-graph decode equals un-captured
decode; a real fp16 engine passes its rows against the plan emulated on CUDA. With CUDA and no TensorRT: the plan
emulated on CUDA separates half arithmetic from fp32 compute.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import enum
import importlib.util
import json
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest

from gamexport.errors import ConfigError, GamexportError, GraphError, InputError
from gamexport.engines import trt as trt_mod
from gamexport.engines.trt import (EngineMismatchError, ProfileError, TensorRTError, TensorRTMissingError,
                                   TrtProfile, build_engine, check_engine_compatible, default_profile,
                                   make_profile, sidecar_path)

ENV = {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


# ---- (a) no tensorrt --------------------------------------------------------------------------------------------
def test_imports_and_refuses_in_one_line_without_tensorrt():
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'tensorrt':
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        import gamexport.engines.trt as m
        assert 'tensorrt' not in sys.modules and 'torch' not in sys.modules
        for call in (lambda: m.TrtRunner('model.fp32.plan', 'step.fp32.plan'),
                     lambda: m.build_engine('model.onnx', 'model.plan', None)):
            try:
                call()
            except m.TensorRTMissingError as e:
                print(e.line())
            else:
                raise SystemExit('no error')
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "TensorRT is not installed" in line and "pip install 'gamexport[tensorrt]'" in line


def test_missing_tensorrt_in_process(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ModuleNotFoundError
    with pytest.raises(TensorRTMissingError) as err:
        trt_mod.TrtRunner("a.plan", "b.plan")
    assert "\n" not in err.value.line() and "NVIDIA GPU" in err.value.line()
    assert isinstance(err.value, GamexportError)


# ---- (b) profiles -------------------------------------------------------------------------------------------------
def test_default_profiles(tiny_cfg):
    P = tiny_cfg.max_positions
    pre, step = default_profile(tiny_cfg, "prefill"), default_profile(tiny_cfg, "step")
    assert (pre.min, pre.opt, pre.max) == ((1, 1), (1, min(256, P)), (8, P))
    assert (step.min, step.opt, step.max) == ((1, 1), (1, 1), (8, P))
    assert make_profile(tiny_cfg, "step") == step


def test_profile_input_shapes(tiny_cfg):
    c = tiny_cfg
    prof = make_profile(c, "step", {"min": "1x1", "opt": "2x4", "max": (4, 16)})
    shapes = prof.input_shapes(c)
    assert shapes["input_ids"] == ((1, 1), (2, 4), (4, 16))
    assert shapes["position_ids"] == ((1, 1), (2, 1), (4, 1))
    s = (c.n_layers, c.kernel_size - 1, c.d_model)
    assert shapes["conv_state"] == ((1, *s), (2, *s), (4, *s))
    assert set(make_profile(c, "prefill").input_shapes(c)) == {"input_ids"}
    assert TrtProfile.from_dict(prof.to_dict()) == prof


@pytest.mark.parametrize("spec,needle", [
    ({"min": "2x1", "opt": "1x1"}, "batch must satisfy 1 <= min <= opt <= max"),
    ({"opt": "1x70", "max": "8x70"}, "exceeds the model's 64 learned positions"),
    ({"max": "8x0"}, "sequence must satisfy"),
    ({"max": "eight"}, "is not BATCHxTOKENS"),
    ({"maximum": "8x8"}, "unknown profile keys"),
])
def test_bad_profiles_refused(tiny_cfg, spec, needle):
    with pytest.raises(ProfileError) as err:
        make_profile(tiny_cfg, "prefill", spec)
    assert needle in err.value.line() and "\n" not in err.value.line()


def test_profile_check(tiny_cfg):
    prof = make_profile(tiny_cfg, "prefill", {"min": "1x4", "opt": "2x16", "max": "4x32"})
    for batch, seq in ((1, 4), (4, 32), (2, 10)):
        prof.check(batch, seq)
    for batch, seq in ((5, 8), (1, 3), (2, 33), (0, 8)):
        with pytest.raises(ProfileError) as err:
            prof.check(batch, seq, "model.fp32.plan")
        line = err.value.line()
        assert f"batch {batch} × sequence {seq} is outside" in line
        assert "batch 1..4, sequence 4..32" in line and "model.fp32.plan" in line
        assert isinstance(err.value, InputError)


# ---- (c) sidecar compatibility --------------------------------------------------------------------------------
def _meta(**over):
    meta = {"tensorrt_version": ENV["tensorrt_version"],
            "gpu": {"name": ENV["gpu_name"], "compute_capability": ENV["compute_capability"]}}
    meta.update(over)
    return meta


def test_compatible_engine_accepted():
    check_engine_compatible(_meta(), ENV, "model.fp32.plan")


@pytest.mark.parametrize("meta,needles", [
    (_meta(tensorrt_version="10.3.0"), ["built by TensorRT 10.3.0", "this machine has TensorRT 10.9.0.34",
                                        "tensorrt==10.3.0"]),
    (_meta(tensorrt_version="11.0.0"), ["built by TensorRT 11.0.0"]),
    (_meta(gpu={"name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}),
     ["built for NVIDIA A100-SXM4-40GB (compute capability 8.0)", "this GPU is NVIDIA H100 80GB HBM3",
      "rebuild the engine on this GPU"]),
    (_meta(gpu={"name": "NVIDIA H100 PCIe", "compute_capability": "9.0"}), ["built for NVIDIA H100 PCIe"]),
])
def test_incompatible_engine_refused(meta, needles):
    with pytest.raises(EngineMismatchError) as err:
        check_engine_compatible(meta, ENV, "/x/model.fp32.plan")
    line = err.value.line()
    assert "\n" not in line and line.startswith("model.fp32.plan ")
    for needle in needles:
        assert needle.lower() in line.lower(), line


# ---- the stand-in tensorrt module -------------------------------------------------------------------------------
class HostMemory(bytes):
    """IHostMemory stand-in: a buffer."""


#: stream handle -> the fake CUDA graph capturing it (set by FakeCuda.graph, read by the stand-in's contexts)
CUDA_CAPTURE: dict = {}


def import_like_onnx_tensorrt(model) -> tuple[object, list[str]]:
    """The network onnx-tensorrt's importer builds from ``model``, as a flat ONNX model, and its warnings.

    It follows onnx-tensorrt at 96e781103cfc4adf4a6bb557e94bac8e693f6f4c, read not copied: ModelImporter.cpp
    reserves the graph outputs' names, then registers inputs, initializers and each node's outputs by name in
    one tensor map. A call of a local function (onnxOpImporters.cpp, ``LocalFunctionImporter``) opens a name
    scope; a formal input named like its argument needs nothing; otherwise, when the formal's name is *already
    in the map* (any enclosing scope), it only warns and the body reads that tensor, not the argument; else the
    formal is mapped to the argument until the call ends. The body's values shadow the caller's names until the
    scope closes (ImporterContext.cpp, ``registerTensor`` / ``popBaseNameScope``). ONNX Runtime then computes
    what that network would: a graph whose names collide gives the wrong numbers here, as on a GPU.
    """
    import onnx
    from onnx import helper

    functions = {(f.domain, f.name): f for f in model.functions}
    g = model.graph
    tensors: dict = {o.name: None for o in g.output}          # reserved output names: null tensors
    tensors.update({v.name: v.name for v in [*g.input, *g.initializer]})
    used, nodes, warnings = set(tensors), [], []
    unbound = object()                                         # "not in the map before this scope"

    def fresh(name: str) -> str:                               # TensorRT's unique tensor names
        unique = name
        while unique in used:
            unique += "_"
        used.add(unique)
        return unique

    def import_nodes(body, scope: dict | None) -> None:
        for node in body:
            f = functions.get((node.domain, node.op_type))
            outputs = import_call(f, node) if f else import_op(node)
            for name, value in zip(node.output, outputs):
                if scope is not None and name not in scope:   # remember the caller's binding
                    scope[name] = tensors.get(name, unbound)
                tensors[name] = value

    def import_op(node) -> list[str]:
        flat = onnx.NodeProto()
        flat.CopyFrom(node)
        flat.input[:] = [tensors[i] if i else "" for i in node.input]
        flat.output[:] = [fresh(o) if o else "" for o in node.output]
        nodes.append(flat)
        return list(flat.output)

    def import_call(f, node) -> list[str]:
        local_inputs = []
        for formal, outside in zip(f.input, node.input):
            if formal == outside:
                continue
            if formal in tensors:
                warnings.append(f"Found input: {formal} that does not correspond to an outside scope name. "
                                "Behavior may be incorrect.")
                continue
            tensors[formal] = tensors[outside]
            local_inputs.append(formal)
        scope: dict = {}
        import_nodes(f.node, scope)
        outputs = [tensors[o] for o in f.output]
        for name in local_inputs:
            del tensors[name]
        for name, before in scope.items():                     # the scope closes
            if before is unbound:
                tensors.pop(name, None)
            else:
                tensors[name] = before
        return outputs

    import_nodes(g.node, None)
    nodes += [helper.make_node("Identity", [tensors[o.name]], [o.name]) for o in g.output]
    flat = helper.make_model(helper.make_graph(nodes, g.name, g.input, g.output, g.initializer),
                             opset_imports=[o for o in model.opset_import if o.domain in ("", "ai.onnx")],
                             ir_version=model.ir_version)
    return flat, warnings


def make_fake_trt(major: int, calls: list, *, refuse: tuple[str, ...] = (), fail_build: bool = False,
                  before_build=None):
    """``before_build()`` runs inside every build (tests use it to hold a build open at a known point)."""
    m = types.ModuleType("tensorrt")
    m.__version__ = "10.9.0.34" if major == 10 else "11.1.0.4"
    m.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major == 10 else
        {"STRONGLY_TYPED": 0})
    flags = {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6}
    if major == 10:  # removed in TensorRT 11
        flags.update({"FP16": 0, "INT8": 1, "OBEY_PRECISION_CONSTRAINTS": 9, "BF16": 17})
    m.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    m.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    m.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    m.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "INT64": 8})

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity

    class Network:
        def __init__(self, flags):
            self.flags, self.onnx = flags, None

    class ParserError:
        def __init__(self, text):
            self.text = text

        def desc(self):
            return self.text

        def node_name(self):
            return "blocks.0"

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []
            calls.append(("OnnxParser", type(logger).__mro__[1] is ILogger))

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path.rsplit("/", 1)[-1]))
            if path.rsplit("/", 1)[-1] in refuse:
                self.errors.append(ParserError("No importer registered for op: Block"))
                return False
            import onnx

            try:
                flat, warnings = import_like_onnx_tensorrt(onnx.load(path))
            except KeyError as exc:
                self.errors.append(ParserError(f"Node input was not registered: {exc.args[0]}"))
                return False
            for text in warnings:
                self.logger.log(Severity.WARNING, text)
            self.network.onnx = path
            self.network.flat = flat.SerializeToString()
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return HostMemory(b"timing-cache:" + self.data[-20:] + b"+")

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class Config:
        def __init__(self):
            self.cleared, self.set, self.profiles, self.cache = [], [], [], None
            self.builder_optimization_level = 3
            self.pools = {}

        def set_flag(self, flag):
            self.set.append(flag.name)

        def clear_flag(self, flag):
            self.cleared.append(flag.name)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            calls.append(("Builder",))

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build", {"flags": network.flags, "set": config.set, "cleared": config.cleared,
                                    "level": config.builder_optimization_level, "pools": config.pools,
                                    "profiles": [p.shapes for p in config.profiles]}))
            if before_build is not None:
                before_build()
            if fail_build:
                self.logger.log(Severity.ERROR, "out of memory while timing tactics\nmore detail")
                return None
            # Like TensorRT's, two builds of one network give different bytes (here: a build number).
            builds = sum(c[0] == "build" for c in calls)
            return HostMemory(json.dumps({"trt": m.__version__, "onnx": network.onnx, "build": builds,
                                          "network": base64.b64encode(network.flat).decode(),
                                          "profile": config.profiles[0].shapes}).encode())

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            try:  # like TensorRT: an unreadable plan logs an error and returns None
                plan = json.loads(bytes(data))
                assert isinstance(plan, dict) and {"trt", "onnx", "profile"} <= set(plan)
            except (ValueError, AssertionError):
                self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                                "(Serialization assertion magicTagRead == kMAGIC_TAG failed.)")
                return None
            if plan["trt"] != m.__version__:
                self.logger.log(Severity.ERROR, "The engine plan file is not compatible with this version")
                return None
            return Engine(plan, self.logger)

    class Engine:
        def __init__(self, plan, logger):
            import onnx
            import onnxruntime as ort

            self.plan, self.logger = plan, logger
            network = base64.b64decode(plan["network"])      # what the parser imported
            self.session = ort.InferenceSession(network, providers=["CPUExecutionProvider"])
            model = onnx.load_from_string(network)
            kinds = {onnx.TensorProto.INT64: m.DataType.INT64, onnx.TensorProto.FLOAT: m.DataType.FLOAT}

            def table(values, mode):
                return [(v.name, kinds[v.type.tensor_type.elem_type], mode,
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

            self.io = table(model.graph.input, m.TensorIOMode.INPUT) + table(model.graph.output,
                                                                              m.TensorIOMode.OUTPUT)

        @property
        def num_io_tensors(self):
            return len(self.io)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def _row(self, name):
            return next(r for r in self.io if r[0] == name)

        def get_tensor_dtype(self, name):
            return self._row(name)[1]

        def get_tensor_mode(self, name):
            return self._row(name)[2]

        def create_execution_context(self):
            return Context(self)

    class Context:
        """IExecutionContext: shapes and addresses set by the runner; execute_async_v3 computes with ONNX Runtime
        through those addresses. On a stream that is capturing (``CUDA_CAPTURE``, kept by the fake torch.cuda) it
        records the work with the shapes and addresses of that moment and runs nothing — as CUDA stream capture
        does — and, like TensorRT, it cannot capture the deferred work of input shapes changed since the last
        un-captured enqueue."""

        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}
            self.shapes_pending = False  # an input shape changed since the last un-captured execute_async_v3

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.plan["profile"][name]
            calls.append(("set_input_shape", name, tuple(shape)))
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            if self.shapes.get(name) != tuple(shape):
                self.shapes_pending = True
            self.shapes[name] = tuple(shape)
            return True

        def _symbols(self, shapes):
            sym = {}
            for name, _, mode, dims in self.engine.io:
                if mode == m.TensorIOMode.INPUT:
                    sym.update({d: s for d, s in zip(dims, shapes[name]) if isinstance(d, str)})
            return sym

        def _shape(self, name, shapes):
            sym = self._symbols(shapes)
            return [sym.get(d, d) if isinstance(d, str) else d for d in self.engine._row(name)[3]]

        def get_tensor_shape(self, name):
            return self._shape(name, self.shapes)

        def set_tensor_address(self, name, address):
            calls.append(("set_tensor_address", name, address))
            self.addresses[name] = address
            return True

        def _compute(self, shapes, addresses):
            np_types = {m.DataType.INT64: np.int64, m.DataType.FLOAT: np.float32}
            feeds = {}
            for name, kind, mode, _ in self.engine.io:
                if mode == m.TensorIOMode.INPUT:
                    shape, dtype = shapes[name], np.dtype(np_types[kind])
                    n = int(np.prod(shape)) * dtype.itemsize
                    raw = (ctypes.c_char * n).from_address(addresses[name])
                    feeds[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
            outs = self.engine.session.run(None, feeds)
            for (name, *_), value in zip([r for r in self.engine.io if r[2] == m.TensorIOMode.OUTPUT], outs):
                value = np.ascontiguousarray(value)
                assert list(value.shape) == self._shape(name, shapes)
                ctypes.memmove(addresses[name], value.ctypes.data, value.nbytes)

        def execute_async_v3(self, stream_handle):
            graph = CUDA_CAPTURE.get(stream_handle)
            if graph is not None:
                calls.append(("execute_async_v3", stream_handle, "captured"))
                if self.shapes_pending:
                    self.engine.logger.log(Severity.ERROR, "enqueueV3: deferred input-shape work cannot run while "
                                           "the stream is capturing; enqueue once before capturing")
                    graph.invalidated = True
                    return False
                shapes, addresses = dict(self.shapes), dict(self.addresses)
                graph.work.append(lambda: self._compute(shapes, addresses))
                return True
            calls.append(("execute_async_v3", stream_handle))
            self._compute(self.shapes, self.addresses)
            self.shapes_pending = False
            return True

    m.ILogger, m.OnnxParser, m.Builder, m.Runtime = ILogger, OnnxParser, Builder, Runtime
    m.Logger = ILogger
    return m


class HostDevice:
    """The runner's device layer on the CPU: NumPy buffers whose addresses the stand-in reads and writes."""

    stream_handle = 1234

    def __init__(self, index=0):
        self.log: list = []  # copies into device buffers, by destination address

    def activate(self):
        return contextlib.nullcontext()

    def upload(self, array):
        return np.array(array, copy=True, order="C")

    def empty(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def copy_in(self, buffer, array):
        assert buffer.shape == array.shape and buffer.dtype == array.dtype, "copy_in never reshapes or converts"
        self.log.append(("copy_in", buffer.ctypes.data))
        buffer[...] = array

    def copy(self, dst, src):
        self.log.append(("copy", dst.ctypes.data, src.ctypes.data))
        dst[...] = src

    @staticmethod
    def address(buffer):
        return buffer.ctypes.data

    def download(self, buffer):
        return buffer.copy()

    def synchronize(self):
        pass


@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def fake_trt(request, monkeypatch):
    """Install a stand-in tensorrt (10 or 11) and a CPU device; returns (module, calls, env)."""
    calls: list = []
    fake = make_fake_trt(request.param, calls)
    env = dict(ENV, tensorrt_version=fake.__version__)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "runtime_environment", lambda device=0: dict(env))
    monkeypatch.setattr(trt_mod, "TorchCudaDevice", HostDevice)
    monkeypatch.setattr(trt_mod, "_device_scope", lambda device=0: contextlib.nullcontext())
    return fake, calls, env


# ---- a fake torch.cuda for the real TorchCudaDevice: CPU tensors, a recording stream, CUDA graphs ----------------
class FakeStream:
    def __init__(self, cuda, handle):
        self.cuda, self.cuda_stream = cuda, handle

    def synchronize(self):
        self.cuda.calls.append(("stream.synchronize", self.cuda_stream))


class FakeGraph:
    """torch.cuda.CUDAGraph stand-in: what was enqueued on the capturing stream, run again on replay() with the
    shapes and addresses of capture time (a graph does not see later set_input_shape / set_tensor_address)."""

    def __init__(self, cuda):
        self.cuda, self.work, self.invalidated, self.captured_on = cuda, [], False, None

    def replay(self):
        assert self.captured_on is not None, "replay of a graph whose capture did not end cleanly"
        self.cuda.calls.append(("replay", self.cuda.current.cuda_stream))
        for work in self.work:
            work()


class FakeCuda:
    """``torch.cuda`` as TorchCudaDevice uses it. Calls are appended to the stand-in's call list, so one list holds
    TensorRT's and CUDA's calls in order. ``fail_capture``: capture ends with this RuntimeError, like torch's
    ``capture_end`` when the capture was invalidated."""

    def __init__(self, calls, fail_capture=None):
        self.calls, self.fail_capture = calls, fail_capture
        self.current = FakeStream(self, 0)  # the legacy default stream
        self.next_handle = 5678

    def is_available(self):
        return True

    def Stream(self, device=None):
        stream = FakeStream(self, self.next_handle)
        self.next_handle += 1
        return stream

    @contextlib.contextmanager
    def stream(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def device(self, device):
        return contextlib.nullcontext()

    def synchronize(self):
        self.calls.append(("synchronize",))

    def CUDAGraph(self):
        return FakeGraph(self)

    @contextlib.contextmanager
    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        assert stream is not None and stream.cuda_stream != 0, "capture on the runner's own non-default stream"
        handle = stream.cuda_stream
        self.calls.append(("capture_begin", handle, capture_error_mode))
        CUDA_CAPTURE[handle] = cuda_graph
        previous, self.current = self.current, stream
        try:
            yield cuda_graph
        finally:
            self.current = previous
            del CUDA_CAPTURE[handle]
            self.calls.append(("capture_end", handle))
        if self.fail_capture:
            raise RuntimeError(self.fail_capture)
        if cuda_graph.invalidated:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        cuda_graph.captured_on = handle


class FakeTorch:
    """torch with ``torch.cuda`` replaced and CUDA devices mapped to the CPU: buffers are real CPU tensors, whose
    data_ptr() the stand-in reads and writes like device memory."""

    def __init__(self, cuda):
        self.cuda = cuda

    def device(self, kind, index=None):
        assert kind == "cuda"
        import torch

        return torch.device("cpu")

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)


class RecordingDevice(trt_mod.TorchCudaDevice):
    """The real device layer, also recording the copies into device buffers (by destination address)."""

    def copy_in(self, buffer, array):
        self.torch.cuda.calls.append(("copy_in", self.address(buffer)))
        super().copy_in(buffer, array)

    def copy(self, dst, src):
        self.torch.cuda.calls.append(("copy", self.address(dst), self.address(src)))
        super().copy(dst, src)


@pytest.fixture
def fake_cuda(fake_trt, monkeypatch):
    """Install the real TorchCudaDevice over a FakeCuda; returns ``install(fail_capture=None) -> FakeCuda``."""
    _fake, calls, _env = fake_trt

    def install(fail_capture=None):
        cuda = FakeCuda(calls, fail_capture)
        monkeypatch.setattr(trt_mod, "_import_torch_cuda", lambda: FakeTorch(cuda))
        monkeypatch.setattr(trt_mod, "TorchCudaDevice", RecordingDevice)
        return cuda

    return install


def _build(build_dir, cfg, graph, out, **kw):
    onnx_name = "model.onnx" if graph == "prefill" else "step.onnx"
    return build_engine(build_dir / onnx_name, out, cfg, kw.pop("profile", None), **kw)


def test_build_uses_documented_api(fake_trt, tiny_build, tiny_cfg, tmp_path):
    fake, calls, env = fake_trt
    engine = tmp_path / "step.fp32.plan"
    meta = _build(tiny_build, tiny_cfg, "step", engine, profile={"max": "4x32"}, workspace_bytes=1 << 28)
    build = next(c[1] for c in calls if c[0] == "build")
    strongly = 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert build["flags"] == strongly == (2 if fake.__version__.startswith("10") else 1)
    assert build["cleared"] == ["TF32"] and build["set"] == [], "fp32: TF32 off, no precision flags"
    assert build["level"] == 3 and build["pools"] == {"WORKSPACE": 1 << 28}
    c = tiny_cfg
    state = [c.n_layers, c.kernel_size - 1, c.d_model]
    assert build["profiles"] == [{"input_ids": [[1, 1], [1, 1], [4, 32]],
                                  "position_ids": [[1, 1], [1, 1], [4, 1]],
                                  "conv_state": [[1, *state], [1, *state], [4, *state]]}]
    assert ("parse_from_file", "step.onnx") in calls and ("OnnxParser", True) in calls
    # the plan and its sidecar
    assert engine.is_file() and sidecar_path(engine) == tmp_path / "step.fp32.plan.json"
    side = json.loads(sidecar_path(engine).read_text())
    assert side == meta
    assert side["tensorrt_version"] == env["tensorrt_version"]
    assert side["gpu"] == {"name": env["gpu_name"], "compute_capability": "9.0"}
    assert side["profile"] == {"graph": "step", "axes": ["batch", "chunk"], "min": [1, 1], "opt": [1, 1],
                               "max": [4, 32]}
    from gamexport.fsutil import sha256_file
    assert side["onnx"] == {"file": "step.onnx", "sha256": sha256_file(tiny_build / "step.onnx")}
    assert side["engine"]["sha256"] == sha256_file(engine) and side["precision"] == "fp32"
    assert side["builder_settings"]["strongly_typed"] and not side["builder_settings"]["tf32"]


def test_timing_cache_and_engine_reuse(fake_trt, tiny_build, tiny_cfg, tmp_path):
    fake, calls, env = fake_trt
    engine = tmp_path / "model.fp32.plan"
    first = _build(tiny_build, tiny_cfg, "prefill", engine)
    cache_file = tmp_path / first["timing_cache"]["file"]
    assert first["timing_cache"]["status"] == "new" and cache_file.is_file()
    assert f"trt{env['tensorrt_version']}-sm90" in cache_file.name
    # same inputs: the plan is reused without building
    n_builds = sum(c[0] == "build" for c in calls)
    assert _build(tiny_build, tiny_cfg, "prefill", engine) == first
    assert sum(c[0] == "build" for c in calls) == n_builds
    # a new profile rebuilds, starting from the saved timing cache
    second = _build(tiny_build, tiny_cfg, "prefill", engine, profile={"opt": "1x16"})
    assert second["timing_cache"]["status"] == "reused" and second["key"] != first["key"]
    loaded = [c[1] for c in calls if c[0] == "create_timing_cache"]
    assert loaded[0] == b"" and loaded[-1].startswith(b"timing-cache:")


def test_precision_is_the_graphs(fake_trt, tiny_build, tiny_cfg, tmp_path):
    _fake, calls, _ = fake_trt
    with pytest.raises(ConfigError) as err:
        _build(tiny_build, tiny_cfg, "prefill", tmp_path / "m.plan", precision="fp16")
    assert "holds a fp32 graph, but a fp16 engine was asked for" in err.value.line()
    assert not any(c[0] == "build" for c in calls), "refused before building"
    with pytest.raises(GraphError, match="is a prefill graph, not a step graph"):
        build_engine(tiny_build / "model.onnx", tmp_path / "m.plan", tiny_cfg, graph="step")


def test_parser_fallback_and_errors(monkeypatch, tiny_build, tiny_cfg, tmp_path):
    calls: list = []
    fake = make_fake_trt(11, calls, refuse=("model.onnx",))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "runtime_environment",
                        lambda device=0: dict(ENV, tensorrt_version=fake.__version__))
    monkeypatch.setattr(trt_mod, "_device_scope", lambda device=0: contextlib.nullcontext())
    meta = _build(tiny_build, tiny_cfg, "prefill", tmp_path / "m.plan")
    assert meta["onnx"]["file"] == "model.onnx" and meta["onnx"]["parsed_file"] == "model.inlined.onnx"
    with pytest.raises(GraphError) as err:
        _build(tiny_build, tiny_cfg, "prefill", tmp_path / "m2.plan", inlined=False)
    line = err.value.line()
    assert "parser refused model.onnx: No importer registered for op: Block (node blocks.0)" in line
    assert "\n" not in line

    fake = make_fake_trt(10, calls, fail_build=True)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(TensorRTError) as err:
        _build(tiny_build, tiny_cfg, "prefill", tmp_path / "m3.plan")
    assert "could not build m3.plan: out of memory while timing tactics." in err.value.line()
    assert not (tmp_path / "m3.plan").exists()


@pytest.fixture
def fake_engines(fake_trt, tiny_build, tiny_cfg, tmp_path):
    from gamexport.engines.trt import build_engines

    folder = tmp_path / "build"
    folder.mkdir()
    for name in ("model.onnx", "step.onnx", "model.inlined.onnx", "step.inlined.onnx"):
        (folder / name).write_bytes((tiny_build / name).read_bytes())
    metas = build_engines(folder, tiny_cfg, profiles={"prefill": {"max": "2x64"}})
    return folder, metas


def test_runner_parity_through_the_stand_in(fake_engines, fake_trt, eager_tiny, tiny_cfg):
    from gamexport.engines.pipeline import run_chunks
    from gamexport.engines.trt import TrtRunner
    from gamexport.parity import chunk_plan, compare_logits, compare_state, parity_inputs, tolerance

    folder, _ = fake_engines
    _fake, calls, _ = fake_trt
    runner = TrtRunner.from_folder(folder)
    assert runner.runtime == "tensorrt" and runner.precision == "fp32" and runner.config == tiny_cfg
    ids = parity_inputs(tiny_cfg.vocab_size, tiny_cfg.max_positions)["random"]
    ref_logits, ref_state = eager_tiny.prefill(ids)
    logits, state = runner.prefill(ids)
    tol = tolerance("fp32")
    assert compare_logits(ref_logits, logits, tol)["passed"] and compare_state(ref_state, state, tol)[1]
    logits, state = run_chunks(runner, ids, chunk_plan(tiny_cfg.max_positions, tiny_cfg.kernel_size))
    assert compare_logits(ref_logits, logits, tol)["passed"] and compare_state(ref_state, state, tol)[1]
    assert ("execute_async_v3", HostDevice.stream_handle) in calls
    assert ("set_input_shape", "position_ids", (1, 1)) in calls
    assert runner.generate([1, 2, 3], 5) == eager_tiny.generate([1, 2, 3], 5)
    # outside the profile: refused in Python before TensorRT sees the shape (the message: test_bad_input.py)
    n = len(calls)
    with pytest.raises(ProfileError):
        runner.prefill(np.zeros((3, 4), np.int64))
    assert len(calls) == n


def test_stand_in_binds_function_inputs_by_name_like_onnx_tensorrt(fake_trt, tiny_build, tiny_cfg, eager_tiny,
                                                                    names_before_scoping, tmp_path):
    """Graphs whose function formals reuse a caller's name compute wrong numbers through the stand-in, as through
    onnx-tensorrt (ONNX Runtime alone scopes them correctly); the builder's graphs compute right ones."""
    import onnx

    from gamexport.engines.trt import TrtRunner, build_engines
    from gamexport.graph.checks import scope_problems
    from gamexport.parity import compare_logits, parity_inputs, tolerance

    _fake, calls, _ = fake_trt
    ids = parity_inputs(tiny_cfg.vocab_size, tiny_cfg.max_positions)["random"]
    ref_logits, _ = eager_tiny.prefill(ids)
    logger = trt_mod._logger(sys.modules["tensorrt"])
    folder = tmp_path / "old"
    folder.mkdir()
    for name in ("model.onnx", "step.onnx"):
        old = names_before_scoping(onnx.load(str(tiny_build / name)))
        assert any("formal input 'x'" in p for p in scope_problems(old))
        onnx.save(old, str(folder / name))
    mark = len(logger.records)
    build_engines(folder, tiny_cfg, profiles={"prefill": {"max": "2x64"}}, inlined=False)
    assert ("WARNING", "Found input: x that does not correspond to an outside scope name. Behavior may be "
            "incorrect.") in logger.records[mark:]
    wrong = compare_logits(ref_logits, TrtRunner.from_folder(folder).prefill(ids)[0], tolerance("fp32"))
    assert not wrong["passed"] and wrong["max_abs_diff"] > 0.1, wrong

    mark = len(logger.records)
    for name in ("model.onnx", "step.onnx"):
        (folder / name).write_bytes((tiny_build / name).read_bytes())
    build_engines(folder, tiny_cfg, profiles={"prefill": {"max": "2x64"}}, inlined=False)
    assert not [m for s, m in logger.records[mark:] if "Found input" in m]
    right = compare_logits(ref_logits, TrtRunner.from_folder(folder).prefill(ids)[0], tolerance("fp32"))
    assert right["passed"], right


# ---- the step engine: buffers reused, state kept on the device, CUDA graphs for decode --------------------------
BINDING = ("set_input_shape", "set_tensor_address")
STEP_IO = {"input_ids", "position_ids", "conv_state", "logits", "conv_state_out"}


def _of(calls, start, *kinds):
    return [c for c in calls[start:] if c[0] in kinds]


def test_step_reuses_its_buffers_and_keeps_the_state_on_the_device(fake_engines, fake_trt, eager_tiny, tiny_cfg):
    """Decode steps of one shape: set_input_shape / set_tensor_address once, then only copies into the same
    buffers; the state comes from the device (prefill's output, then the step's own) unless the caller passes
    a state that differs, bit for bit, from the last one returned (mutated in place, older, or another)."""
    from gamexport.engines.trt import TrtRunner
    from gamexport.parity import compare_logits, tolerance

    folder, _ = fake_engines
    _fake, calls, _ = fake_trt
    tol = tolerance("fp32")
    ids = np.random.default_rng(5).integers(0, tiny_cfg.vocab_size, size=(1, 20))
    runner = TrtRunner.from_folder(folder)
    dev = runner.device

    def check(pos, size, state, ref_state):
        logits, new_state = runner.step(ids[:, pos:pos + size], pos, state)
        ref_logits, new_ref = eager_tiny.step(ids[:, pos:pos + size], pos, ref_state)
        result = compare_logits(ref_logits, logits, tol, states=(new_ref, new_state))
        assert result["passed"], result
        return new_state, new_ref

    _, state = runner.prefill(ids[:, :4])
    _, ref = eager_tiny.prefill(ids[:, :4])
    addresses = {}
    for pos in range(4, 9):
        n, k = len(calls), len(dev.log)
        state, ref = check(pos, 1, state, ref)
        bound = {c[1]: c[2] for c in _of(calls, n, "set_tensor_address")}
        if pos == 4:
            assert {c[1] for c in _of(calls, n, "set_input_shape")} == {"input_ids", "position_ids", "conv_state"}
            assert set(bound) == STEP_IO
            addresses = bound
        else:
            assert _of(calls, n, *BINDING) == [], "same shape: no new shapes or addresses"
        assert _of(calls, n, "execute_async_v3") == [("execute_async_v3", HostDevice.stream_handle)]
        copies = dev.log[k:]
        assert ("copy_in", addresses["input_ids"]) in copies and ("copy_in", addresses["position_ids"]) in copies
        assert ("copy_in", addresses["conv_state"]) not in copies, "the state did not come from the host"
        state_copy = [c for c in copies if c[0] == "copy"]
        assert len(state_copy) == 1 and state_copy[0][1] == addresses["conv_state"]
        if pos > 4:  # from the previous step's output buffer; the first step from prefill's
            assert state_copy[0][2] == addresses["conv_state_out"]
        else:
            assert state_copy[0][2] != addresses["conv_state_out"]
    assert runner.cuda_graph_status["state_uploads"] == 0 and runner.cuda_graph_status["state_kept_on_device"] == 5

    def uploaded(pos, size, state, ref):
        k = len(dev.log)
        out = check(pos, size, state, ref)
        assert ("copy_in", addresses["conv_state"]) in dev.log[k:] and not [c for c in dev.log[k:] if c[0] == "copy"]
        return out

    older, older_ref = state.copy(), ref.copy()
    state, ref = check(9, 1, state, ref)
    state[0, 0, 0, :] += 0.5  # mutated in place: the very array the runner returned
    ref = ref.copy()
    ref[0, 0, 0, :] += 0.5
    state, ref = uploaded(10, 1, state, ref)
    uploaded(11, 1, older, older_ref)  # an older state
    # a chunk of 3 rebinds (new shapes and buffers) and still takes the state from the device
    n = len(calls)
    state, ref = check(11, 3, state, ref)
    assert ("set_input_shape", "input_ids", (1, 3)) in calls[n:]
    assert {c[1] for c in _of(calls, n, "set_tensor_address")} == STEP_IO
    assert [c for c in dev.log if c[0] == "copy"][-1][2] == addresses["conv_state_out"]
    assert runner.cuda_graph_status["requested"] is False and runner.cuda_graph_note() == \
        "CUDA graphs: off (not requested)"
    assert runner.generate([1, 2, 3], 6) == eager_tiny.generate([1, 2, 3], 6)


def _decode(runner, ids, start, steps, state):
    outs = []
    for pos in range(start, start + steps):
        logits, state = runner.step(ids[:, pos:pos + 1], np.full((ids.shape[0], 1), pos, np.int64), state)
        outs.append((logits, state))
    return outs


def test_cuda_graph_captures_decode_once_per_shape_and_replays(fake_engines, fake_trt, fake_cuda, tiny_cfg):
    """cuda_graph=True over the real TorchCudaDevice and a fake torch.cuda: the first decode step at a shape binds,
    runs execute_async_v3 un-captured, then captures it on the runner's stream; later steps only copy inputs and
    replay; a new shape binds and captures again; outputs are those of the same runner without graphs."""
    from gamexport.engines.trt import TrtRunner

    folder, _ = fake_engines
    _fake, calls, _ = fake_trt
    fake_cuda()
    ids = np.random.default_rng(6).integers(0, tiny_cfg.vocab_size, size=(2, 24))
    plain = TrtRunner.from_folder(folder)

    def expected(batch_ids, start, steps, state):
        return _decode(plain, batch_ids, start, steps, state)

    runner = TrtRunner.from_folder(folder, cuda_graph=True)
    h = runner.device.stream_handle
    assert h != 0 and h != plain.device.stream_handle

    def same(got, want):
        for (a, sa), (b, sb) in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(sa, sb)

    one = ids[:1]
    _, state = runner.prefill(one[:, :5])
    want = expected(one, 5, 4, plain.prefill(one[:, :5])[1])
    n = len(calls)
    got = _decode(runner, one, 5, 1, state)
    first = calls[n:]
    order = [c for c in first if c[0] in ("execute_async_v3", "capture_begin", "capture_end", "replay")]
    assert order == [("execute_async_v3", h), ("capture_begin", h, "thread_local"),
                     ("execute_async_v3", h, "captured"), ("capture_end", h)], order
    binding = [c for c in first[:first.index(("execute_async_v3", h))] if c[0] in BINDING]
    assert sorted(c[0] for c in binding) == ["set_input_shape"] * 3 + ["set_tensor_address"] * 5
    addresses = {c[1]: c[2] for c in binding if c[0] == "set_tensor_address"}
    for step in range(3):
        m = len(calls)
        got += _decode(runner, one, 6 + step, 1, got[-1][1])
        assert [c for c in calls[m:] if c[0] in (*BINDING, "execute_async_v3", "capture_begin", "replay")] == \
            [("replay", h)], "later steps: inputs copied into the same buffers, graph replayed"
        copies = [c for c in calls[m:] if c[0] in ("copy_in", "copy")]
        assert sorted(copies) == sorted([("copy_in", addresses["input_ids"]), ("copy_in", addresses["position_ids"]),
                                         ("copy", addresses["conv_state"], addresses["conv_state_out"])])
    same(got, want)
    status = runner.cuda_graph_status
    assert (status["captures"], status["replays"], status["captured_shapes"]) == (1, 3, [[1, 1]])
    assert status["used"] and status["fallback_reason"] is None

    # a new shape (batch 2): bind, warm up, capture again; then replay
    _, state2 = runner.prefill(ids[:, :5])
    want2 = expected(ids, 5, 3, plain.prefill(ids[:, :5])[1])
    m = len(calls)
    got2 = _decode(runner, ids, 5, 3, state2)
    same(got2, want2)
    assert ("set_input_shape", "input_ids", (2, 1)) in calls[m:]
    assert [c[0] for c in calls[m:] if c[0] in ("execute_async_v3", "capture_begin", "replay")] == \
        ["execute_async_v3", "capture_begin", "execute_async_v3", "replay", "replay"]
    # back to batch 1 with an older state (uploaded): the batch-2 binding replaced the batch-1 one, so capture again
    m = len(calls)
    same(_decode(runner, one, 9, 2, got[-1][1]), expected(one, 9, 2, want[-1][1]))
    assert [c[0] for c in calls[m:] if c[0] in ("capture_begin", "replay")] == ["capture_begin", "replay"]
    assert ("copy_in", [c for c in calls[m:] if c[0] == "set_tensor_address" and c[1] == "conv_state"][0][2]) \
        in calls[m:], "a state that is not the last one returned is uploaded"
    # a chunk of several tokens never captures
    chunk_state = _decode(plain, one, 9, 2, want[-1][1])[-1][1]
    m = len(calls)
    logits, _ = runner.step(one[:, 11:14], 11, chunk_state)
    assert [c for c in calls[m:] if c[0] in ("execute_async_v3", "capture_begin", "replay")] == \
        [("execute_async_v3", h)]
    np.testing.assert_array_equal(logits, plain.step(one[:, 11:14], 11, chunk_state)[0])
    status = runner.cuda_graph_status
    assert (status["captures"], status["replays"]) == (3, 6)
    assert status["captured_shapes"] == [[1, 1], [2, 1], [1, 1]]
    assert runner.cuda_graph_note().startswith("CUDA graphs: on for decode, 3 captures (1x1, 2x1), 6 replays")


def test_cuda_graph_capture_failure_falls_back_and_says_why(fake_engines, fake_trt, fake_cuda, tiny_cfg):
    from gamexport.engines.trt import TrtRunner

    folder, _ = fake_engines
    _fake, calls, _ = fake_trt
    fake_cuda(fail_capture="CUDA error: operation not permitted when stream is capturing")
    ids = np.random.default_rng(7).integers(0, tiny_cfg.vocab_size, size=(1, 16))
    plain = TrtRunner.from_folder(folder)
    want = _decode(plain, ids, 3, 4, plain.prefill(ids[:, :3])[1])
    runner = TrtRunner.from_folder(folder, cuda_graph=True)
    h = runner.device.stream_handle
    _, state = runner.prefill(ids[:, :3])
    n = len(calls)
    got = _decode(runner, ids, 3, 4, state)
    for (a, sa), (b, sb) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sa, sb)
    order = [c for c in calls[n:] if c[0] in ("execute_async_v3", "capture_begin", "capture_end", "replay")]
    assert order == [("execute_async_v3", h), ("capture_begin", h, "thread_local"),
                     ("execute_async_v3", h, "captured"), ("capture_end", h)] + [("execute_async_v3", h)] * 3
    status = runner.cuda_graph_status
    assert status["fallback_reason"] == "CUDA error: operation not permitted when stream is capturing"
    assert not status["used"] and status["captures"] == 0 and status["uncaptured_steps"] == 4
    assert "capture failed (CUDA error: operation not permitted" in runner.cuda_graph_note()


def test_the_stand_in_refuses_a_capture_without_the_warm_up(fake_engines, fake_trt, fake_cuda):
    """What makes the call-order test able to fail: like TensorRT, the stand-in cannot capture the deferred work of
    new input shapes, so a runner that captured without executing once first would record a fallback."""
    from gamexport.engines.trt import TrtRunner

    folder, _ = fake_engines
    fake_cuda()
    runner = TrtRunner.from_folder(folder, cuda_graph=True)
    eng = runner.engines["step"]
    c = runner.config
    shapes = {"input_ids": (1, 1), "position_ids": (1, 1), "conv_state": (1, c.n_layers, c.state_len, c.d_model)}
    binding = eng.bind(runner.device, shapes)
    for name, shape in shapes.items():
        runner.device.copy_in(binding.buffers[name], np.zeros(shape, eng.dtypes[name]))
    graph, why = eng.capture(runner.device)
    assert graph is None and "previous error during capture" in why
    eng.execute(runner.device)
    graph, why = eng.capture(runner.device)
    assert graph is not None and why is None


# ---- half-precision graphs against an emulation of the same precision plan ---------------------------------------
def _ckpt(cfg, weights):
    from gamexport.checkpoint import Checkpoint

    return Checkpoint(config=cfg, weights=weights, source="<test>", sha256="0" * 64)


def test_half_plan_gate_passes_half_arithmetic_and_fails_fp32_compute(tiny_build, tiny_cfg, tiny_weights):
    """The gate of the emulation-{p} rows, on the CPU: the real fp16/bf16 graph executed in half arithmetic by onnx's
    reference evaluator (rounding where it rounds, not where the emulation does) passes; the same fp16 graph on
    ONNX Runtime's CPU provider, which computes it in fp32, fails as "fp32-compute", and so does fp32 compute on
    bf16-rounded weights; a gap below the fp32 noise floor makes the row informational."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    from gamexport.engines.eager import EagerRunner
    from gamexport.engines.ort import OrtRunner
    from gamexport.graph import inline
    from gamexport.graph.emulate import half_plan_metrics, half_plan_references, round_weights

    ids = np.random.default_rng(4).integers(0, tiny_cfg.vocab_size, size=(1, 12))
    for p in ("fp16", "bf16"):
        plan, fp32_compute = half_plan_references(tiny_weights, tiny_cfg, ids, p, "cpu")
        model = onnx.shape_inference.infer_shapes(inline(onnx.load(str(tiny_build / f"model.{p}.onnx"))))
        half = ReferenceEvaluator(model).run(None, {"input_ids": ids})[0]
        m = half_plan_metrics(half, plan, fp32_compute, p)
        assert m["gated"] and m["passed"], m
        assert m["fp32_compute_rms_diff"] >= m["fp32_compute_rms_limit"] > 10 * m["plan_gap_floor"] / 4
        if p == "fp16":
            silent = OrtRunner(tiny_build / "model.fp16.onnx", tiny_build / "step.fp16.onnx", tiny_cfg, 1,
                               precision="fp16").prefill(ids)[0]
        else:
            silent = EagerRunner(tiny_cfg, round_weights(tiny_weights, p), threads=1).prefill(ids)[0]
        m = half_plan_metrics(silent, plan, fp32_compute, p)
        assert m["gated"] and not m["passed"] and m["failed_checks"] == ["fp32-compute"], m
        assert m["fp32_compute_rms_diff"] < 0.01 * m["plan_gap_rms"]
        assert "must compute in " + p in m["tolerances"]["reason"]
    # references closer than fp32 noise: nothing can discriminate, so the row says so instead of gating
    m = half_plan_metrics(plan, plan, plan + 1e-7, "bf16")
    assert not m["gated"] and m["passed"] and "no tolerance can tell" in m["tolerances"]["reason"]


class _HalfRunner:
    """A runner that says it multiplies in fp16 (like ONNX Runtime's CUDA provider) and does: its prefill is the fp16
    graph run by onnx's reference evaluator; ``step_fp32=True`` makes its step graph silently compute in fp32."""

    runtime, precision, compute_precision = "onnxruntime-cuda", "fp16", "fp16"

    def __init__(self, build, cfg, weights, step_fp32=False):
        import onnx
        from onnx.reference import ReferenceEvaluator

        from gamexport.engines.eager import EagerRunner
        from gamexport.graph import inline
        from gamexport.graph.emulate import round_weights

        self.model_path, self.step_path = build / "model.fp16.onnx", build / "step.fp16.onnx"
        self.evaluator = ReferenceEvaluator(onnx.shape_inference.infer_shapes(inline(onnx.load(str(self.model_path)))))
        self.eager = EagerRunner(cfg, round_weights(weights, "fp16"), threads=1)
        self.step_fp32, self.cache = step_fp32, {}

    def prefill(self, ids):
        key = np.asarray(ids).tobytes()
        if key not in self.cache:
            self.cache[key] = self.evaluator.run(None, {"input_ids": np.asarray(ids)})[0]
        return self.cache[key], None

    def empty_state(self, batch):
        return self.eager.empty_state(batch)

    def step(self, ids, position_ids, state):  # the prefix's prefill, sliced: a chunk step in fp16
        pos = int(np.asarray(position_ids).reshape(-1)[0])
        if self.step_fp32:
            return self.eager.step(ids, position_ids, state)
        full = self.prefill(np.concatenate([self.prefix[:, :pos], ids], axis=1))[0]
        return full[:, pos:], state


def test_half_compute_rows_against_the_plan_emulation(monkeypatch, tiny_build, tiny_cfg, tiny_weights):
    """variant_parity_checks for a runner computing in fp16: prefill and step rows against the plan emulation
    (here on the CPU: CUDA is stood in for), which pass for half arithmetic and fail the step graph that silently
    computes in fp32."""
    from gamexport.engines.eager import EagerRunner
    from gamexport.engines.pipeline import variant_parity_checks
    from gamexport.graph import emulate
    from gamexport.parity import parity_inputs

    import jsonschema

    from gamexport.report import schema

    row_schema = {"$defs": schema()["$defs"], "$ref": "#/$defs/parity_row"}
    monkeypatch.setattr(emulate, "emulation_device", lambda: ("cpu", "the CPU, standing in for CUDA"))
    ckpt, eager = _ckpt(tiny_cfg, tiny_weights), EagerRunner(tiny_cfg, tiny_weights, threads=1)
    said = []
    for step_fp32 in (False, True):
        runner = _HalfRunner(tiny_build, tiny_cfg, tiny_weights, step_fp32=step_fp32)
        runner.prefix = parity_inputs(tiny_cfg.vocab_size, tiny_cfg.max_positions)["random"]
        rows = variant_parity_checks(ckpt, eager, runner, said.append)
        plan_rows = {r["graph"]: r for r in rows if r["reference"] == "emulation-fp16"}
        assert set(plan_rows) == {"prefill", "step"}
        for r in rows:  # the rows a GPU build writes must fit the report's schema
            jsonschema.validate(r, row_schema)
        assert all(r["compute_precision"] == "fp16" and r["note"] == "fp16 weights and MatMuls" for r in rows)
        assert not any(r["reference"] == "emulation-fp16-weights" for r in rows), "that row is for fp32 compute"
        assert plan_rows["prefill"]["passed"] and plan_rows["prefill"]["gated"]
        assert plan_rows["prefill"]["artifact"] == "model.fp16.onnx" and plan_rows["step"]["chunks"]
        if step_fp32:
            assert not plan_rows["step"]["passed"] and plan_rows["step"]["failed_checks"] == ["fp32-compute"]
        else:
            assert plan_rows["step"]["passed"], plan_rows["step"]
    assert any("vs the fp16 plan emulated by eager PyTorch on the CPU, standing in for CUDA" in m for m in said)


def test_without_cuda_the_plan_rows_are_skipped_and_the_note_says_why(monkeypatch, tiny_build, tiny_cfg,
                                                                       tiny_weights):
    from gamexport.engines.eager import EagerRunner
    from gamexport.engines.pipeline import variant_parity_checks
    from gamexport.graph import emulate
    from gamexport.parity import parity_inputs

    monkeypatch.setattr(emulate, "emulation_device", lambda: (None, "torch 2.13.0+cpu sees no CUDA GPU"))
    runner = _HalfRunner(tiny_build, tiny_cfg, tiny_weights)
    runner.prefix = parity_inputs(tiny_cfg.vocab_size, tiny_cfg.max_positions)["random"]
    said = []
    rows = variant_parity_checks(_ckpt(tiny_cfg, tiny_weights), EagerRunner(tiny_cfg, tiny_weights, threads=1),
                                 runner, said.append)
    assert [r["reference"] for r in rows] == ["eager-fp32", "eager-fp32"]
    why = "fp16 plan emulation not run: torch 2.13.0+cpu sees no CUDA GPU (it runs eager PyTorch in fp16 on CUDA)"
    assert all(r["note"] == f"fp16 weights and MatMuls; {why}" for r in rows)
    assert f"parity: onnxruntime-cuda fp16: {why}" in said


def test_emulation_device_names_the_reason_without_a_gpu():
    import torch

    from gamexport.graph.emulate import emulation_device

    if torch.cuda.is_available():
        assert emulation_device()[0] == "cuda"
        return
    device, why = emulation_device()
    assert device is None and why == f"torch {torch.__version__} sees no CUDA GPU"


def test_tensorrt_fp16_rows_catch_an_engine_computing_in_fp32(monkeypatch, fake_trt, tiny_build, tiny_cfg,
                                                               tiny_weights, tmp_path):
    """The stand-in runs an fp16 'TensorRT engine' with ONNX Runtime's CPU provider, i.e. in fp32 — exactly the
    engine the plan rows exist to catch. Both plan rows fail as fp32-compute; every row says the runner is
    TensorRT and whether it replayed CUDA graphs."""
    from gamexport.engines.eager import EagerRunner
    from gamexport.engines.pipeline import variant_parity_checks
    from gamexport.engines.trt import TrtRunner, build_engines
    from gamexport.graph import emulate

    folder = tmp_path / "build"
    folder.mkdir()
    for name in ("model.fp16.onnx", "step.fp16.onnx"):
        (folder / name).write_bytes((tiny_build / name).read_bytes())
    build_engines(folder, tiny_cfg, precision="fp16")
    monkeypatch.setattr(emulate, "emulation_device", lambda: ("cpu", "the CPU"))
    runner = TrtRunner.from_folder(folder, precision="fp16")
    assert (runner.precision, runner.compute_precision) == ("fp16", "fp16")
    rows = variant_parity_checks(_ckpt(tiny_cfg, tiny_weights), EagerRunner(tiny_cfg, tiny_weights, threads=1),
                                 runner, lambda m: None)
    plan_rows = [r for r in rows if r["reference"] == "emulation-fp16"]
    assert [r["graph"] for r in plan_rows] == ["prefill", "step"]
    assert [r["artifact"] for r in plan_rows] == ["model.fp16.plan", "step.fp16.plan"]
    assert all(not r["passed"] and r["gated"] and "fp32-compute" in r["failed_checks"] for r in plan_rows)
    assert all(r["passed"] for r in rows if r["reference"] == "eager-fp32"), "fp32 compute passes the fp16 gate"
    for r in rows:  # step rows say whether decode replayed CUDA graphs; prefill never runs as one
        base = "fp16: TensorRT's strongly typed network computes in the graph's precision"
        assert r["runtime"] == "tensorrt"
        if r["graph"] == "step":
            assert r["cuda_graph"] is False and r["note"] == base + "; CUDA graphs: off (not requested)"
        else:
            assert "cuda_graph" not in r and r["note"] == base


# ---- the engine folder as a cache shared by processes -------------------------------------------------------------
CACHE_BUILDER = textwrap.dedent("""
    import contextlib, json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])  # tests/, for the stand-in
    import test_trt
    from gamexport.config import PRESETS
    from gamexport.engines import trt as trt_mod

    role, onnx_path, engine, marker = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
    lock = engine.parent / trt_mod.CACHE_LOCK

    def hold_until_the_other_is_blocked():
        # The first builder stays inside its build until the second one is blocked on the cache lock: a '->'
        # line for the lock file's inode in /proc/locks. Without the lock it would never block (timeout).
        marker.write_text("building")
        ino, deadline = (os.stat(lock).st_ino if lock.exists() else None), time.time() + 15
        while time.time() < deadline:
            if ino is not None and any(line.split()[1] == "->" and line.split()[-3].endswith(f":{ino}")
                                       for line in open("/proc/locks")):
                return
            time.sleep(0.02)

    calls = []
    fake = test_trt.make_fake_trt(10, calls, before_build=hold_until_the_other_is_blocked if role == "first"
                                  else None)
    sys.modules["tensorrt"] = fake
    trt_mod.runtime_environment = lambda device=0: dict(test_trt.ENV, tensorrt_version=fake.__version__)
    trt_mod._device_scope = lambda device=0: contextlib.nullcontext()
    said = []
    meta = trt_mod.build_engine(onnx_path, engine, PRESETS["tiny"], progress=said.append)
    print(json.dumps({"builds": sum(c[0] == "build" for c in calls), "sha": meta["engine"]["sha256"],
                      "progress": said}))
""")


def test_two_builds_into_one_engine_cache_at_once_build_once(tiny_build, tmp_path):
    """Two processes build the same engine into one folder at the same moment: the second waits on the cache lock
    while the first is inside its build, then reuses the first's plan; the folder ends with one plan, its
    sidecar and the timing cache, and no temporaries."""
    import os

    folder = tmp_path / "cache"
    engine = folder / "model.fp32.plan"
    marker = tmp_path / "first-is-building"
    tests = str(os.path.dirname(__file__))
    argv = [sys.executable, "-c", CACHE_BUILDER, tests, "ROLE", str(tiny_build / "model.onnx"), str(engine),
            str(marker)]
    first = subprocess.Popen([a if a != "ROLE" else "first" for a in argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run([a if a != "ROLE" else "second" for a in argv], capture_output=True, text=True,
                                timeout=120)
        out_first, err_first = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and second.returncode == 0, err_first[-2000:] + second.stderr[-2000:]
    a, b = json.loads(out_first), json.loads(second.stdout)
    assert (a["builds"], b["builds"]) == (1, 0), "the second builder reused the first's plan"
    assert any("waiting for another process writing TensorRT engines" in m for m in b["progress"]), b["progress"]
    assert any("is up to date" in m for m in b["progress"])
    assert a["sha"] == b["sha"]
    side = json.loads(sidecar_path(engine).read_text())
    from gamexport.fsutil import sha256_file
    assert side["engine"]["sha256"] == sha256_file(engine) == a["sha"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([".gamexport-engines.lock", "model.fp32.plan", "model.fp32.plan.json",
                            side["timing_cache"]["file"]]), names


def test_a_runner_never_reads_a_plan_while_it_is_written(fake_engines, fake_trt):
    """While a builder holds the cache lock, a runner opening the folder waits; then it loads a matching pair."""
    import threading

    from gamexport.engines.trt import TrtRunner, cache_lock

    folder, _ = fake_engines
    result = {}

    def open_runner():
        try:
            result["runner"] = TrtRunner.from_folder(folder)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    with cache_lock(folder / "tensorrt"):
        reader = threading.Thread(target=open_runner, daemon=True)
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not result, "the runner must wait for the writer"
    reader.join(60)
    assert "error" not in result, result.get("error")
    assert result["runner"].prefill(np.array([[1, 2, 3]]))[0].shape == (1, 3, 97)


def test_truncated_plan_in_the_cache_is_rebuilt_and_leftovers_removed(fake_trt, tiny_build, tiny_cfg, tmp_path):
    _fake, calls, _env = fake_trt
    engine = tmp_path / "model.fp32.plan"
    first = _build(tiny_build, tiny_cfg, "prefill", engine)
    engine.write_bytes(engine.read_bytes()[:20])  # truncated in the cache
    cache_name = first["timing_cache"]["file"]
    leftovers = [tmp_path / f".model.fp32.plan.{tag}.tmp" for tag in ("k2j4_x9q",)] + [
        tmp_path / ".model.fp32.plan.json.a1b2c3d4.tmp", tmp_path / f".{cache_name}.zz99yy88.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file from a killed builder")
    unrelated = tmp_path / ".notes.txt.abcd1234.tmp"
    unrelated.write_bytes(b"someone else's")
    said = []
    n = sum(c[0] == "build" for c in calls)
    meta = _build(tiny_build, tiny_cfg, "prefill", engine, progress=said.append)
    assert sum(c[0] == "build" for c in calls) == n + 1
    assert any("model.fp32.plan does not match its sidecar (truncated or replaced): rebuilding it" in m
               for m in said), said
    from gamexport.fsutil import sha256_file
    assert meta["engine"]["sha256"] == sha256_file(engine) and meta["key"] == first["key"]
    assert not any(p.exists() for p in leftovers) and unrelated.exists()


# ---- (d) a real GPU with TensorRT -----------------------------------------------------------------------------
def _gpu_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'gamexport[tensorrt]' on an NVIDIA machine)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


_GPU_SKIP = _gpu_reason()


@pytest.fixture(scope="module")
def real_engines(tiny_build, tiny_cfg, tmp_path_factory):
    from gamexport.engines.trt import build_engines

    folder = tmp_path_factory.mktemp("trt_build")
    for name in ("model.onnx", "step.onnx", "model.inlined.onnx", "step.inlined.onnx"):
        (folder / name).write_bytes((tiny_build / name).read_bytes())
    return folder, build_engines(folder, tiny_cfg, progress=print)  # TF32 off (the default)


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_gpu_engine_parity_prefill_and_step(real_engines, eager_tiny, tiny_cfg):
    """fp32 engine built with TF32 disabled vs eager fp32 on CPU: max abs ≤ 1e-3 (and state too)."""
    from gamexport.engines.pipeline import run_chunks
    from gamexport.engines.trt import TrtRunner
    from gamexport.parity import chunk_plan, parity_inputs

    folder, metas = real_engines
    assert all(not m["builder_settings"]["tf32"] for m in metas.values())
    with TrtRunner.from_folder(folder) as runner:
        inputs = parity_inputs(tiny_cfg.vocab_size, tiny_cfg.max_positions)
        batch = np.concatenate([inputs["random"], inputs["ngram"]], axis=0)
        for ids in (inputs["random"], inputs["repeat"], batch):
            ref_logits, ref_state = eager_tiny.prefill(ids)
            logits, state = runner.prefill(ids)
            assert np.abs(logits - ref_logits).max() <= 1e-3 and np.abs(state - ref_state).max() <= 1e-3
            logits, state = run_chunks(runner, ids, chunk_plan(tiny_cfg.max_positions, tiny_cfg.kernel_size))
            assert np.abs(logits - ref_logits).max() <= 1e-3 and np.abs(state - ref_state).max() <= 1e-3
        assert runner.generate([3, 1, 4], 20) == eager_tiny.generate([3, 1, 4], 20)
        with pytest.raises(ProfileError):
            runner.prefill(np.zeros((9, 4), np.int64))


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_gpu_sidecar_describes_this_machine(real_engines):
    from gamexport.engines.trt import runtime_environment

    _folder, metas = real_engines
    env = runtime_environment()
    for meta in metas.values():
        check_engine_compatible(meta, env)


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_gpu_cuda_graph_decode_matches_uncaptured_decode(real_engines, eager_tiny, tiny_cfg):
    """cuda_graph=True on a real engine: decode steps captured once and replayed give the un-captured outputs."""
    from gamexport.engines.trt import TrtRunner

    folder, _ = real_engines
    ids = np.random.default_rng(8).integers(0, tiny_cfg.vocab_size, size=(2, 24))
    with TrtRunner.from_folder(folder) as plain, TrtRunner.from_folder(folder, cuda_graph=True) as graphed:
        for batch in (ids[:1], ids):
            a, sa = plain.prefill(batch[:, :6])
            b, sb = graphed.prefill(batch[:, :6])
            for pos in range(6, 20):
                a, sa = plain.step(batch[:, pos:pos + 1], pos, sa)
                b, sb = graphed.step(batch[:, pos:pos + 1], pos, sb)
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
                np.testing.assert_allclose(sb, sa, rtol=0, atol=1e-5)
        status = graphed.cuda_graph_status
        assert status["fallback_reason"] is None, status
        assert status["used"] and status["captures"] == 2 and status["replays"] == 2 * 13
        assert graphed.generate([3, 1, 4], 20) == eager_tiny.generate([3, 1, 4], 20)


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_gpu_fp16_engine_against_the_plan_emulation(tiny_build, tiny_cfg, tiny_weights, eager_tiny,
                                                    tmp_path_factory):
    """A real fp16 engine computes in fp16: its prefill and step rows against the plan emulated on CUDA pass."""
    from gamexport.engines.pipeline import variant_parity_checks
    from gamexport.engines.trt import TrtRunner, build_engines

    folder = tmp_path_factory.mktemp("trt_fp16")
    for name in ("model.fp16.onnx", "step.fp16.onnx", "model.fp16.inlined.onnx", "step.fp16.inlined.onnx"):
        (folder / name).write_bytes((tiny_build / name).read_bytes())
    build_engines(folder, tiny_cfg, precision="fp16", progress=print)
    with TrtRunner.from_folder(folder, precision="fp16") as runner:
        rows = variant_parity_checks(_ckpt(tiny_cfg, tiny_weights), eager_tiny, runner, print)
    plan_rows = [r for r in rows if r["reference"] == "emulation-fp16"]
    assert [r["graph"] for r in plan_rows] == ["prefill", "step"]
    for row in rows:
        assert row["passed"], row


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU (torch.cuda.is_available() is False)"


_CUDA_SKIP = _cuda_reason()


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_gpu_half_plan_emulated_on_cuda(tiny_cfg, tiny_weights):
    """The plan emulated on CUDA: the CPU's half arithmetic passes its gate, fp32 compute fails it."""
    from gamexport.engines.eager import EagerRunner
    from gamexport.graph.emulate import emulate_logits, half_plan_metrics, half_plan_references, round_weights

    ids = np.random.default_rng(9).integers(0, tiny_cfg.vocab_size, size=(2, tiny_cfg.max_positions))
    for p in ("fp16", "bf16"):
        plan, fp32_compute = half_plan_references(tiny_weights, tiny_cfg, ids, p, "cuda")
        m = half_plan_metrics(emulate_logits(tiny_weights, tiny_cfg, ids, p, "cpu"), plan, fp32_compute, p)
        assert m["gated"] and m["passed"], m
        silent = EagerRunner(tiny_cfg, round_weights(tiny_weights, p), threads=1).prefill(ids)[0]
        m = half_plan_metrics(silent, plan, fp32_compute, p)
        assert not m["passed"] and m["failed_checks"] == ["fp32-compute"], m


def test_build_option_cuda_graph_reaches_the_tensorrt_runner(monkeypatch, tiny_cfg, tmp_path):
    """``gamexport build --cuda-graph`` opens its TensorRT runners with CUDA graphs; without it, they run
    un-captured."""
    from gamexport.engines import pipeline, trt

    opened = []
    monkeypatch.setattr(trt, "build_engines", lambda *a, **k: None)
    monkeypatch.setattr(trt.TrtRunner, "from_folder",
                        classmethod(lambda cls, folder, precision="fp32", device=0, cuda_graph=False:
                                    opened.append((precision, cuda_graph)) or "runner"))
    for flag in (True, False):
        assert pipeline.open_variant_runner(tmp_path, tiny_cfg, "tensorrt", "fp16", 1, None, lambda m: None,
                                            flag) == "runner"
    assert opened == [("fp16", True), ("fp16", False)]
