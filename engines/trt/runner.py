"""TrtRunner: a prefill and a step engine on one CUDA GPU, behind the common Runner interface.

See the class notes for the step engine's reused buffers, its device-resident state and CUDA-graph decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gamexport.config import (INPUT_IDS, LOGITS, POSITION_IDS, GAMConfig, io_spec, past_state_name,
                              present_state_names, refuse_legacy)
from gamexport.errors import ConfigError, GraphError
from gamexport.runtime import Runner
from gamexport.state import packed_present, past_tensors

from .cuda import TorchCudaDevice
from .environment import (EngineMismatchError, TensorRTError, check_engine_compatible, first_line,
                          import_tensorrt, last_error, runtime_environment, trt_logger)
from .loader import engine_paths, read_engine
from .profile import ProfileError, TrtProfile

# ---- running --------------------------------------------------------------------------------------------------
_NP_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8",
              "UINT8": "uint8", "BOOL": "bool"}


def _dtype_name(dtype) -> str:
    return getattr(dtype, "name", str(dtype)).split(".")[-1]


@dataclass
class _Binding:
    """An execution context configured for one set of input shapes: a device buffer per I/O tensor, whose addresses
    were set once, and the CUDA graph captured over exactly these shapes and addresses (None: not captured)."""

    shapes: dict[str, tuple[int, ...]]
    buffers: dict[str, Any]
    graph: Any = None


class _Engine:
    """One deserialized engine, its execution context and I/O tensor table."""

    def __init__(self, trt, runtime, path: Path, meta: dict, records: list, plan: bytes):
        mark = len(records)
        engine = runtime.deserialize_cuda_engine(plan)  # the bytes whose sha256 matched the sidecar
        if engine is None:
            raise EngineMismatchError(f"TensorRT could not load {path.name}: {last_error(records[mark:])}",
                                      "rebuild the engine on this machine")
        context = engine.create_execution_context()
        if context is None:
            raise TensorRTError(f"TensorRT could not create an execution context for {path.name}: "
                                f"{last_error(records[mark:])}", "free GPU memory or rebuild with a smaller profile")
        self.trt, self.engine, self.context, self.path, self.records = trt, engine, context, path, records
        self.profile = TrtProfile.from_dict(meta["profile"])
        self.inputs, self.outputs = [], []
        self.dtypes: dict[str, str] = {}
        self.binding: _Binding | None = None
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            kind = _dtype_name(engine.get_tensor_dtype(name))
            if kind not in _NP_DTYPES:
                raise GraphError(f"{path.name} has I/O tensor {name} of type {kind}, which this runner cannot "
                                 "exchange as NumPy", "keep graph inputs and outputs int64/float32")
            self.dtypes[name] = _NP_DTYPES[kind]
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise ProfileError(f"TensorRT refused shape {shape} for {name} of {self.path.name}",
                               f"stay within the engine's profile ({self.profile.bounds()})")

    def _set_address(self, device, name: str, buffer) -> None:
        if self.context.set_tensor_address(name, device.address(buffer)) is False:
            raise TensorRTError(f"TensorRT refused the device buffer of {name} of {self.path.name}: "
                                f"{last_error(self.records)}", "report it: the buffer is a fresh torch CUDA tensor")

    def _output_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(s) for s in self.context.get_tensor_shape(name))
        if any(s < 0 for s in shape):
            raise TensorRTError(f"TensorRT could not infer the shape of {name} ({shape})",
                                "rebuild the engine; the graph's shapes do not resolve")
        return shape

    def execute(self, device) -> None:
        mark = len(self.records)
        if not self.context.execute_async_v3(device.stream_handle):
            raise TensorRTError(f"TensorRT failed to run {self.path.name}: {last_error(self.records[mark:])}",
                                "rebuild the engine on this machine; if it persists, check GPU memory")

    def run(self, device, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One call with fresh buffers (prefill: its shapes vary call to call): host outputs and the device
        output buffers (nothing else holds them; the caller may keep one)."""
        self.binding = None  # shapes and addresses below replace any earlier configuration
        keep = []
        for name in self.inputs:
            array = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            self._set_shape(name, tuple(int(s) for s in array.shape))
            buf = device.upload(array)
            keep.append(buf)
            self._set_address(device, name, buf)
        outs = {}
        for name in self.outputs:
            outs[name] = device.empty(self._output_shape(name), self.dtypes[name])
            self._set_address(device, name, outs[name])
        self.execute(device)
        result = {name: device.download(buf) for name, buf in outs.items()}
        device.synchronize()
        del keep
        return result, outs

    def bind(self, device, shapes: dict[str, tuple[int, ...]]) -> _Binding:
        """The context configured for ``shapes`` with a buffer per I/O tensor: the current binding when the shapes
        are unchanged (no TensorRT call at all), else a new one (set_input_shape and set_tensor_address for every
        tensor). A new binding drops the old one and its CUDA graph, which captured the old shapes and addresses."""
        if self.binding is not None and self.binding.shapes == shapes:
            return self.binding
        self.binding = None
        buffers = {}
        for name in self.inputs:
            self._set_shape(name, shapes[name])
            buffers[name] = device.empty(shapes[name], self.dtypes[name])
            self._set_address(device, name, buffers[name])
        for name in self.outputs:
            buffers[name] = device.empty(self._output_shape(name), self.dtypes[name])
            self._set_address(device, name, buffers[name])
        self.binding = _Binding(dict(shapes), buffers)
        return self.binding

    def capture(self, device) -> tuple[Any, str | None]:
        """A CUDA graph of one execute_async_v3 over the current binding, or (None, why it failed).

        Call it only after an un-captured execute_async_v3 with the same shapes: TensorRT defers work after input
        shape changes to the next enqueue, and that work cannot be captured."""
        graph = device.new_graph()
        mark = len(self.records)
        try:
            with device.capture(graph):
                ok = self.context.execute_async_v3(device.stream_handle)
        except Exception as exc:  # torch's capture_end, or TensorRT raising inside the capture
            return None, first_line(exc)
        if not ok:
            return None, f"execute_async_v3 failed while capturing: {last_error(self.records[mark:])}"
        return graph, None


class TrtRunner(Runner):
    """Runs a prefill and a step engine (TensorRT plans with gamexport sidecars) on one CUDA GPU.

    The step engine keeps device buffers for its current (batch, chunk) shape and reuses them while the shape
    stays the same: no set_input_shape / set_tensor_address, no allocation per call. The streaming state stays on
    the GPU between calls: the Runner API hands it out as one packed NumPy array, and when the same values come
    back (bit for bit, as from ``generate`` and any decode loop) the step copies its own device copies of the
    per-layer outputs (``present.{i}.conv_state``) into the per-layer inputs (``past_key_values.{i}.conv_state``)
    instead of uploading them; any other state is uploaded, layer by layer.

    ``cuda_graph=True`` (opt-in): a decode step (a chunk of 1 token, any batch) runs execute_async_v3 once
    un-captured at a new shape — which flushes TensorRT's deferred shape work, as TensorRT requires before a
    capture, and gives that step's output — then captures execute_async_v3 into a CUDA graph on the runner's
    stream (``torch.cuda.graph``) and replays the graph for every later decode step of that shape. A step of
    another shape (a new batch, or a chunk of several tokens, which always runs un-captured) rebinds the context
    and drops the graph; the next decode step captures again. If a capture fails, the runner falls back to
    un-captured execution for the rest of its life and records why: ``cuda_graph_status["fallback_reason"]``.
    ``cuda_graph_status`` counts captures, replays and uploads; ``cuda_graph_note()`` says it in one line.
    """

    runtime = "tensorrt"

    def __init__(self, prefill_engine: str | Path, step_engine: str | Path, config: GAMConfig | None = None,
                 device: int = 0, cuda_graph: bool = False):
        trt = import_tensorrt()
        paths = {"prefill": Path(prefill_engine), "step": Path(step_engine)}
        metas, plans = {}, {}
        for graph, path in paths.items():
            metas[graph], plans[graph] = read_engine(path, graph)
        cfgs = {g: GAMConfig.from_dict(m.get("config") or {}) for g, m in metas.items()}
        if cfgs["prefill"] != cfgs["step"]:
            raise ConfigError("the prefill and step engines were built from different models",
                              "build both engines from the same build folder")
        if config is not None and config != cfgs["prefill"]:
            raise ConfigError("the TensorRT engines were built for another model config than the one passed",
                              "pass the config of the build the engines came from (or none)")
        super().__init__(cfgs["prefill"])
        precisions = {m.get("precision", "fp32") for m in metas.values()}
        if len(precisions) != 1:
            raise ConfigError(f"the engines have different precisions {sorted(precisions)}",
                              "build both engines at one precision")
        self.precision = precisions.pop()
        #: strongly typed networks compute in the graph's precision (TF32 off for fp32)
        self.compute_precision = self.precision
        self.matmul_ops: dict[str, int] = {}  # ONNX Runtime's optimized-graph census; TensorRT has none to read
        env = runtime_environment(device)
        for graph, path in paths.items():
            check_engine_compatible(metas[graph], env, path)
        self.device = TorchCudaDevice(device)
        self._logger = trt_logger(trt)
        with self.device.activate():
            self._runtime = trt.Runtime(self._logger)
            self.engines = {g: _Engine(trt, self._runtime, p, metas[g], self._logger.records, plans[g])
                            for g, p in paths.items()}
        for graph, eng in self.engines.items():
            refuse_legacy(eng.inputs + eng.outputs, str(eng.path))
            want = {n for n, _, _ in io_spec(self.config, graph)["inputs"]}
            got = set(eng.inputs)
            if want != got:
                raise GraphError(f"{eng.path.name} has inputs {sorted(got)}, expected {sorted(want)}",
                                 "rebuild the engine from a gamexport graph")
        self.meta = metas
        self.paths = paths
        self.cuda_graph = bool(cuda_graph)
        self._stats: dict[str, Any] = {"captures": 0, "replays": 0, "uncaptured_steps": 0, "state_uploads": 0,
                                       "state_kept_on_device": 0, "captured_shapes": [], "fallback_reason": None}
        self._state_device = None  # the device tensors (one per layer) holding the last state this runner returned
        self._state_host = None    # a private host copy of it, to recognise that state when it comes back

    @property
    def profiles(self) -> dict[str, TrtProfile]:
        return {g: e.profile for g, e in self.engines.items()}

    @property
    def model_path(self) -> Path:
        return self.paths["prefill"]

    @property
    def step_path(self) -> Path:
        return self.paths["step"]

    @classmethod
    def from_folder(cls, folder: str | Path, precision: str = "fp32", device: int = 0,
                    cuda_graph: bool = False) -> "TrtRunner":
        """The runner over ``<folder>/tensorrt/{model,step}.<precision>.plan`` (what build_engines writes);
        ``cuda_graph=True``: replay decode steps from CUDA graphs (see the class notes)."""
        paths = engine_paths(folder, precision)
        return cls(paths["prefill"], paths["step"], device=device, cuda_graph=cuda_graph)

    # ---- CUDA graph bookkeeping --------------------------------------------------------------------------
    @property
    def cuda_graph_status(self) -> dict[str, Any]:
        """requested, used (a decode output came from a replayed graph), captures, replays, uncaptured_steps,
        captured_shapes ([batch, chunk] per capture), state_uploads / state_kept_on_device, fallback_reason."""
        stats = {k: (list(v) if isinstance(v, list) else v) for k, v in self._stats.items()}
        return {"requested": self.cuda_graph, "used": stats["replays"] > 0, **stats}

    def cuda_graph_note(self) -> str:
        s = self._stats
        if not self.cuda_graph:
            return "CUDA graphs: off (not requested)"
        if s["fallback_reason"]:
            return (f"CUDA graphs: requested, capture failed ({s['fallback_reason']}); steps ran un-captured "
                    f"after {s['replays']} replays")
        shapes = sorted({f"{b}x{t}" for b, t in s["captured_shapes"]})
        return (f"CUDA graphs: on for decode, {s['captures']} captures ({', '.join(shapes) or 'none yet'}), "
                f"{s['replays']} replays, {s['uncaptured_steps']} un-captured steps")

    def cuda_graph_state(self) -> tuple[dict[str, Any], str]:
        return self.cuda_graph_status, self.cuda_graph_note()

    def precision_note(self) -> str:
        return f"{self.precision}: TensorRT's strongly typed network computes in the graph's precision"

    # ---- the state kept on the device --------------------------------------------------------------------
    def _forget_state(self) -> None:
        self._state_device = self._state_host = None

    def _remember_state(self, buffers: dict[str, Any], host: np.ndarray) -> None:
        """Keep the per-layer output buffers (``present.{i}.conv_state``, in layer order) of ``host``."""
        self._state_device = [buffers[name] for name in present_state_names(self.config)]
        self._state_host = host.copy()

    def _state_is_current(self, state: np.ndarray) -> bool:
        """Is ``state`` bit for bit the last state this runner returned (whose device copy it still holds)?"""
        snap = self._state_host
        if snap is None or self._state_device is None or state.shape != snap.shape or state.dtype != snap.dtype:
            return False
        return bool(np.array_equal(np.ascontiguousarray(state).view(np.uint8), snap.view(np.uint8)))

    # ---- runner hooks --------------------------------------------------------------------------------------
    def _prefill(self, ids):
        eng = self.engines["prefill"]
        eng.profile.check(ids.shape[0], ids.shape[1], eng.path.name)
        self._forget_state()
        with self.device.activate():
            out, buffers = eng.run(self.device, {INPUT_IDS: ids})
        logits = out[LOGITS].astype(np.float32, copy=False)
        state = packed_present(out, self.config.n_layers).astype(np.float32, copy=False)
        self._remember_state(buffers, state)
        return logits, state

    def _step(self, ids, position_ids, state):
        eng = self.engines["step"]
        eng.profile.check(ids.shape[0], ids.shape[1], eng.path.name)
        dev = self.device
        kept = self._state_device if self._state_is_current(state) else None
        self._forget_state()  # until this step has succeeded
        pasts = past_tensors(state)
        feeds = {INPUT_IDS: ids, POSITION_IDS: position_ids, **pasts}
        with dev.activate():
            binding = eng.bind(dev, {name: tuple(int(s) for s in np.shape(feeds[name])) for name in eng.inputs})
            bufs = binding.buffers
            dev.copy_in(bufs[INPUT_IDS], np.ascontiguousarray(ids, dtype=eng.dtypes[INPUT_IDS]))
            dev.copy_in(bufs[POSITION_IDS], np.ascontiguousarray(position_ids, dtype=eng.dtypes[POSITION_IDS]))
            if kept is not None:  # this binding's own outputs, or the prefill's / an earlier binding's
                for i, buffer in enumerate(kept):
                    dev.copy(bufs[past_state_name(i)], buffer)
                self._stats["state_kept_on_device"] += 1
            else:
                for name, layer in pasts.items():
                    dev.copy_in(bufs[name], np.ascontiguousarray(layer, dtype=eng.dtypes[name]))
                self._stats["state_uploads"] += 1
            self._execute_step(eng, binding, decode=ids.shape[1] == 1)
            logits = dev.download(bufs[LOGITS])
            presents = {name: dev.download(bufs[name]) for name in present_state_names(self.config)}
            dev.synchronize()
        logits = logits.astype(np.float32, copy=False)
        new_state = packed_present(presents, self.config.n_layers).astype(np.float32, copy=False)
        self._remember_state(bufs, new_state)
        return logits, new_state

    def _execute_step(self, eng: _Engine, binding: _Binding, decode: bool) -> None:
        if binding.graph is not None:
            try:
                self.device.replay(binding.graph)
            except Exception as exc:
                raise TensorRTError(f"replaying the CUDA graph of {eng.path.name} failed: {first_line(exc)}",
                                    "open the runner without cuda_graph=True, and report it") from exc
            self._stats["replays"] += 1
            return
        eng.execute(self.device)  # the step's output; before a capture, also TensorRT's required warm-up
        self._stats["uncaptured_steps"] += 1
        if not (self.cuda_graph and decode) or self._stats["fallback_reason"]:
            return
        graph, why = eng.capture(self.device)
        if graph is None:
            self._stats["fallback_reason"] = why
            return
        binding.graph = graph
        self._stats["captures"] += 1
        self._stats["captured_shapes"].append(list(binding.shapes[INPUT_IDS]))

    def close(self) -> None:
        for eng in self.engines.values():
            eng.binding = None  # graphs before the contexts they captured
        self.engines = {}
        self._forget_state()
        self._runtime = None
