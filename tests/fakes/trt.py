"""Stand-ins for TensorRT and CUDA, so the builder and the runner run end to end on a CPU.

The builder and runner are driven end to end through a small stand-in
``tensorrt`` module that mirrors the documented Python API of TensorRT 10 and 11 (11 lacks the removed
FP16/INT8/BF16 builder flags and EXPLICIT_BATCH; STRONGLY_TYPED is bit 1 in 10 and bit 0 in 11), records every
call, and computes with ONNX Runtime on CPU through the device addresses the runner hands it — on the network its
parser imports the way onnx-tensorrt does, binding a local function's formal inputs by name (so a graph whose
function names collide with a caller's computes wrong numbers here, as it would on a GPU). The step engine's
reused buffers, its device-resident state and CUDA-graph capture run the real ``TorchCudaDevice`` over a fake
``torch.cuda`` (CPU tensors; a capture records the stand-in's work instead of running it, and replay runs it with
the shapes and addresses of capture time; like TensorRT, the stand-in cannot capture un-flushed shape changes).

Import the fixtures (``fake_trt``, ``fake_cuda``, ``fake_engines``) into a test module to use them; outside pytest
(a child process) call :func:`install_fake_trt` with a ``pytest.MonkeyPatch()``.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import enum
import json
import sys
import types

import numpy as np
import pytest

from gamexport.engines.trt import cuda as cuda_mod, loader as loader_mod, runner as runner_mod

ENV = {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


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


def install_fake_trt(monkeypatch, fake, env: dict | None = None, device=HostDevice) -> dict:
    """Install the stand-in ``fake`` as ``tensorrt``, this machine as ``env`` (default: ENV with the stand-in's
    version), ``device`` as the runner's device layer, and no CUDA device scope; returns the env. Patches each
    room of gamexport.engines.trt where it looks the name up."""
    env = dict(ENV, tensorrt_version=fake.__version__) if env is None else env
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    for room in (loader_mod, runner_mod):
        monkeypatch.setattr(room, "runtime_environment", lambda device=0: dict(env))
    monkeypatch.setattr(runner_mod, "TorchCudaDevice", device)
    monkeypatch.setattr(loader_mod, "device_scope", lambda device=0: contextlib.nullcontext())
    return env


@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def fake_trt(request, monkeypatch):
    """Install a stand-in tensorrt (10 or 11) and a CPU device; returns (module, calls, env)."""
    calls: list = []
    fake = make_fake_trt(request.param, calls)
    env = install_fake_trt(monkeypatch, fake)
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


class RecordingDevice(cuda_mod.TorchCudaDevice):
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
        monkeypatch.setattr(cuda_mod, "import_torch_cuda", lambda: FakeTorch(cuda))
        monkeypatch.setattr(runner_mod, "TorchCudaDevice", RecordingDevice)
        return cuda

    return install


@pytest.fixture
def fake_engines(fake_trt, tiny_build, tiny_cfg, tmp_path):
    from gamexport.engines.trt import build_engines

    folder = tmp_path / "build"
    folder.mkdir()
    for name in ("model.onnx", "step.onnx", "model.inlined.onnx", "step.inlined.onnx"):
        (folder / name).write_bytes((tiny_build / name).read_bytes())
    metas = build_engines(folder, tiny_cfg, profiles={"prefill": {"max": "2x64"}})
    return folder, metas


# ---- half-precision graphs against an emulation of the same precision plan ---------------------------------------
def fake_checkpoint(cfg, weights):
    from gamexport.checkpoint import Checkpoint

    return Checkpoint(config=cfg, weights=weights, source="<test>", sha256="0" * 64)
