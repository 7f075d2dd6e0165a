"""TensorRT engines for a build folder's graphs: build (ONNX → serialized plan + JSON sidecar) and run.

Written against TensorRT's Python API for 10.x and 11.x:

- networks are always **strongly typed** (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` where the flag exists;
  TensorRT 11 ignores it because every network is strongly typed there). The precision is therefore whatever the
  ONNX graph says; gamexport never sets the FP16/INT8/BF16 builder flags (removed in TensorRT 11, and ignored
  under strong typing in 10). ``EXPLICIT_BATCH`` is never used (ignored since 10.0, gone in 11). A requested
  precision that differs from the graph's is refused rather than silently built at another one.
- TF32 is switched off for fp32 graphs unless asked for (``BuilderFlag.TF32`` exists in 10 and 11), so an fp32
  engine computes fp32 matmuls.
- one optimization profile over batch × sequence (prefill) or batch × chunk (step); the runner checks every call
  against it in Python, before TensorRT sees the shapes.
- every engine gets a JSON sidecar (``<engine>.json``): TensorRT version, GPU name and compute capability, the
  profile, the builder settings and the sha256 of the ONNX file and of the engine. The runner refuses, in one
  line, an engine from another TensorRT version or for another GPU — a plan is only valid for both.
- a timing cache file beside the engines is loaded before and saved after every build, so a second build on the
  same GPU and TensorRT skips most tactic timing.
- a folder of engines is a cache that several processes may share: a builder holds an exclusive ``flock`` on
  ``<folder>/.gamexport-engines.lock`` from its reuse check to its last write, so two builds of one engine at
  once build it once (the second waits and reuses the first's plan) and never pair one's plan with the other's
  sidecar; a runner holds the lock shared while it reads a plan and its sidecar, so it never sees one without
  the other. Plans, sidecars and timing caches are written atomically; a writer's leftover temporaries are
  removed by the next builder. A plan that no longer matches its sidecar (truncated, replaced) is rebuilt by
  ``build_engine`` and refused in one line by the runner.

TensorRT and torch are imported inside functions only: this module imports on machines without them.
Device buffers are torch CUDA tensors (torch is on every GPU machine gamexport targets); inputs and outputs cross
as NumPy arrays, like every other runner. The step engine reuses its buffers while the (batch, chunk) shape stays
the same, keeps the streaming state on the GPU between steps, and can capture decode steps into CUDA graphs
(``TrtRunner(..., cuda_graph=True)``; see :class:`TrtRunner`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from gamexport import __version__
from gamexport.config import (CONV_STATE, CONV_STATE_OUT, INPUT_IDS, LOGITS, POSITION_IDS, GAMConfig, io_spec)
from gamexport.errors import ConfigError, GamexportError, GraphError, InputError
from gamexport.fsutil import atomic_write_bytes, atomic_write_json, file_lock, remove_temporaries, sha256_file
from gamexport.jsonfile import MIB, Int, Obj, Str, read_json
from gamexport.runtime import Runner

SIDECAR_SCHEMA = 1
ENGINE_DIR = "tensorrt"
CACHE_LOCK = ".gamexport-engines.lock"  # in every folder gamexport writes engines into
GRAPH_STEMS = {"prefill": "model", "step": "step"}
TOKEN_AXIS = {"prefill": "sequence", "step": "chunk"}
DEFAULT_MAX_BATCH = 8
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder optimization level
INSTALL_FIX = ("on a machine with an NVIDIA GPU, pip install 'gamexport[tensorrt]' "
               "(TensorRT's wheels come from NVIDIA's own package index)")


# ---- errors -------------------------------------------------------------------------------------------------
class TensorRTError(GamexportError):
    """TensorRT is missing, broken, or refused to build or load an engine."""


class TensorRTMissingError(TensorRTError):
    """The ``tensorrt`` Python package (or a CUDA GPU) is not available."""


class EngineMismatchError(TensorRTError):
    """An engine built by another TensorRT version, for another GPU, or not matching its sidecar."""


class ProfileError(InputError):
    """A batch/sequence outside an engine's optimization profile, or an invalid profile request."""


# ---- lazy imports -------------------------------------------------------------------------------------------
def import_tensorrt():
    """The ``tensorrt`` module, or a one-line error that says how to get it."""
    try:
        import tensorrt
    except ModuleNotFoundError as exc:
        if (exc.name or "tensorrt").split(".")[0] == "tensorrt":
            raise TensorRTMissingError("TensorRT is not installed (Python package 'tensorrt' not found)",
                                       INSTALL_FIX) from exc
        raise TensorRTMissingError(f"TensorRT is installed but incomplete: {_first_line(exc)}",
                                   f"reinstall it: {INSTALL_FIX}") from exc
    except (ImportError, OSError) as exc:  # e.g. libnvinfer.so missing or built for another CUDA
        raise TensorRTMissingError(f"TensorRT cannot be loaded: {_first_line(exc)}",
                                   f"install a TensorRT that matches this machine's CUDA driver: {INSTALL_FIX}"
                                   ) from exc
    return tensorrt


def _import_torch_cuda():
    try:
        import torch
    except ImportError as exc:
        raise TensorRTMissingError("the TensorRT runner needs torch for CUDA device buffers, and torch is not "
                                   "installed", "pip install a CUDA build of torch") from exc
    if not torch.cuda.is_available():
        raise TensorRTMissingError("no CUDA GPU is visible (torch.cuda.is_available() is False)",
                                   "run on a machine with an NVIDIA GPU, its driver and a CUDA build of torch")
    return torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:300] if text else type(exc).__name__)


# ---- the environment an engine belongs to -----------------------------------------------------------------
def runtime_environment(device: int = 0) -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of this machine (what a plan is tied to)."""
    trt = import_tensorrt()
    torch = _import_torch_cuda()
    if not 0 <= device < torch.cuda.device_count():
        raise TensorRTMissingError(f"CUDA device {device} does not exist "
                                   f"({torch.cuda.device_count()} visible)", "pass a valid device index")
    props = torch.cuda.get_device_properties(device)
    return {"tensorrt_version": str(trt.__version__), "gpu_name": str(props.name),
            "compute_capability": f"{props.major}.{props.minor}"}


def check_engine_compatible(meta: Mapping[str, Any], env: Mapping[str, str], engine: str | Path = "engine") -> None:
    """Refuse (one line) a plan built by another TensorRT version or for another GPU than ``env`` describes.

    Pure Python: ``meta`` is the engine's sidecar, ``env`` what :func:`runtime_environment` returns.
    """
    name = Path(engine).name
    built_trt = meta.get("tensorrt_version")
    if built_trt != env.get("tensorrt_version"):
        raise EngineMismatchError(
            f"{name} was built by TensorRT {built_trt}, but this machine has TensorRT {env.get('tensorrt_version')} "
            "(a TensorRT plan only loads in the version that built it)",
            f"rebuild the engine here, or install tensorrt=={built_trt}")
    gpu = meta.get("gpu") or {}
    built_cc, here_cc = gpu.get("compute_capability"), env.get("compute_capability")
    built_name, here_name = gpu.get("name"), env.get("gpu_name")
    if built_cc != here_cc or built_name != here_name:
        raise EngineMismatchError(
            f"{name} was built for {built_name} (compute capability {built_cc}), but this GPU is {here_name} "
            f"(compute capability {here_cc}); a TensorRT plan is tuned for one GPU model",
            "rebuild the engine on this GPU")


# ---- optimization profiles ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrtProfile:
    """One optimization profile: (batch, tokens) at min / opt / max; tokens = sequence (prefill) or chunk (step)."""

    graph: str
    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    @property
    def token_axis(self) -> str:
        return TOKEN_AXIS[self.graph]

    def bounds(self) -> str:
        return (f"batch {self.min[0]}..{self.max[0]}, "
                f"{self.token_axis} {self.min[1]}..{self.max[1]}")

    def check(self, batch: int, tokens: int, engine: str = "the TensorRT engine") -> None:
        """Refuse (one line, naming the bounds) a call shape outside this profile."""
        if self.min[0] <= batch <= self.max[0] and self.min[1] <= tokens <= self.max[1]:
            return
        raise ProfileError(
            f"batch {batch} × {self.token_axis} {tokens} is outside the optimization profile of {engine} "
            f"({self.bounds()})",
            f"split the input to fit, or rebuild the engine with a profile max of at least "
            f"{max(batch, self.max[0])}x{max(tokens, self.max[1])}")

    def input_shapes(self, cfg: GAMConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max shape of every graph input, derived from the I/O spec (symbolic axes filled in)."""
        out = {}
        for name, _dtype, dims in io_spec(cfg, self.graph)["inputs"]:
            triple = []
            for point in (self.min, self.opt, self.max):
                axes = {"batch": point[0], TOKEN_AXIS[self.graph]: point[1]}
                triple.append(tuple(axes[d] if isinstance(d, str) else int(d) for d in dims))
            out[name] = (triple[0], triple[1], triple[2])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "axes": ["batch", self.token_axis],
                "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrtProfile":
        try:
            return cls(str(data["graph"]), _pair(data["min"]), _pair(data["opt"]), _pair(data["max"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise GraphError(f"engine sidecar has no valid profile ({exc})", "rebuild the engine") from exc


def _pair(value) -> tuple[int, int]:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
        if not match:
            raise ValueError(f"{value!r} is not BATCHxTOKENS")
        return int(match.group(1)), int(match.group(2))
    b, t = value
    if isinstance(b, bool) or isinstance(t, bool) or int(b) != b or int(t) != t:
        raise ValueError(f"{value!r} is not a pair of integers")
    return int(b), int(t)


def default_profile(cfg: GAMConfig, graph: str) -> TrtProfile:
    """batch 1..8 (opt 1); prefill sequence 1..P (opt min(256, P)); step chunk 1..P (opt 1, i.e. decode)."""
    if graph not in TOKEN_AXIS:
        raise ValueError(f"graph must be 'prefill' or 'step', not {graph!r}")
    P = cfg.max_positions
    opt_tokens = min(256, P) if graph == "prefill" else 1
    return TrtProfile(graph, (1, 1), (1, opt_tokens), (DEFAULT_MAX_BATCH, P))


def make_profile(cfg: GAMConfig, graph: str, profile: Mapping[str, Any] | TrtProfile | None = None) -> TrtProfile:
    """A checked profile from ``{"min": "1x1", "opt": "1x64", "max": "8x256"}`` (or (batch, tokens) pairs).

    Missing keys take the defaults of :func:`default_profile`; tokens are sequence (prefill) or chunk (step).
    """
    base = default_profile(cfg, graph)
    if isinstance(profile, TrtProfile):
        spec: dict[str, Any] = {"min": profile.min, "opt": profile.opt, "max": profile.max}
    else:
        spec = dict(profile or {})
    unknown = sorted(set(spec) - {"min", "opt", "max"})
    if unknown:
        raise ProfileError(f"unknown profile keys {unknown}", "use min, opt and max, each BATCHxTOKENS")
    points = {}
    for key in ("min", "opt", "max"):
        try:
            points[key] = _pair(spec[key]) if key in spec else getattr(base, key)
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"profile {key} {spec[key]!r} is not BATCHxTOKENS ({exc})",
                               "write it like 1x64 (batch 1, 64 tokens)") from None
    lo, mid, hi = points["min"], points["opt"], points["max"]
    axis = TOKEN_AXIS[graph]
    for i, label in ((0, "batch"), (1, axis)):
        if not 1 <= lo[i] <= mid[i] <= hi[i]:
            raise ProfileError(f"profile {label} must satisfy 1 <= min <= opt <= max, got "
                               f"{lo[i]} / {mid[i]} / {hi[i]}", "fix --min/--opt/--max")
    from gamexport.limits import MAX_PROFILE_BATCH

    if hi[0] > MAX_PROFILE_BATCH:
        raise ProfileError(f"profile max batch {hi[0]} exceeds {MAX_PROFILE_BATCH}",
                           f"use a max batch of at most {MAX_PROFILE_BATCH} (the engine allocates for it)")
    P = cfg.max_positions
    if hi[1] > P:
        raise ProfileError(f"profile max {axis} {hi[1]} exceeds the model's {P} learned positions",
                           f"use a max {axis} of at most {P}")
    return TrtProfile(graph, lo, mid, hi)


# ---- precision in the graph -----------------------------------------------------------------------------------
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_ORT_DYNAMIC = {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "ConvInteger"}


def graph_precision(model) -> str:
    """fp32, fp16, bf16, int8 (static Q/DQ) or int8-dyn (ONNX Runtime's dynamic quantization): what a strongly
    typed TensorRT network built from this ONNX graph computes in."""
    from onnx import TensorProto

    nodes = list(model.graph.node)
    for fn in model.functions:
        nodes.extend(fn.node)
    ops = {n.op_type for n in nodes}
    if ops & _ORT_DYNAMIC:
        return "int8-dyn"
    if ops & _QDQ:
        return "int8"
    types = {init.data_type for init in model.graph.initializer}
    if TensorProto.BFLOAT16 in types:
        return "bf16"
    if TensorProto.FLOAT16 in types:
        return "fp16"
    return "fp32"


def _graph_kind(model, fallback: str | None) -> str:
    from gamexport.graph.builder import META_GRAPH

    meta = {p.key: p.value for p in model.metadata_props}
    kind = meta.get(META_GRAPH) or fallback
    if fallback is not None and kind != fallback:
        raise GraphError(f"the ONNX file is a {kind} graph, not a {fallback} graph",
                         "pass model.onnx for prefill and step.onnx for step")
    if kind not in TOKEN_AXIS:
        raise GraphError("ONNX file does not say whether it is a prefill or step graph",
                         "pass a model.onnx / step.onnx written by gamexport build")
    return kind


def inlined_twin(onnx_path: Path) -> Path:
    """``model.onnx`` → ``model.inlined.onnx`` (written beside every graph by the build)."""
    name = onnx_path.name
    stem = name[:-len(".onnx")] if name.endswith(".onnx") else name
    return onnx_path.with_name(stem + ".inlined.onnx")


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def cache_lock(folder: str | Path, *, shared: bool = False, progress: Callable[[str], None] | None = None):
    """The engine-cache lock of ``folder`` (see the module notes): exclusive for a builder, shared for a reader."""
    lock = Path(folder) / CACHE_LOCK
    waiting = (lambda: progress(f"waiting for another process writing TensorRT engines in {Path(folder)}")
               ) if progress else None
    return file_lock(lock, shared=shared, waiting=waiting)


def engine_paths(folder: str | Path, precision: str = "fp32") -> dict[str, Path]:
    """Where :func:`build_engines` puts the prefill and step plans of a build folder."""
    folder = Path(folder) / ENGINE_DIR
    return {graph: folder / f"{stem}.{precision}.plan" for graph, stem in GRAPH_STEMS.items()}


# ---- building -------------------------------------------------------------------------------------------------
_LOGGER: dict[str, Any] = {}


def _logger(trt):
    """The process's one TensorRT logger; it keeps warnings and errors for our one-line messages.

    TensorRT holds a single logger pointer while any builder, runtime or refitter exists and ignores a different
    one passed later, so every builder and runtime here shares this object, which lives as long as the process.
    Callers read the messages logged after ``len(logger.records)``.
    """
    if _LOGGER.get("module") is not trt:

        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.records: list[tuple[str, str]] = []

            def log(self, severity, msg):
                name = getattr(severity, "name", str(severity)).split(".")[-1]
                if name in ("INTERNAL_ERROR", "ERROR", "WARNING"):
                    if len(self.records) > 2000:
                        del self.records[:1000]
                    self.records.append((name, str(msg)))

        _LOGGER.update(module=trt, logger=_Logger())
    return _LOGGER["logger"]


def _device_scope(device: int):
    """Make ``device`` the current CUDA device while TensorRT builds or loads (it uses the current device)."""
    torch = _import_torch_cuda()
    return torch.cuda.device(device)


def _last_error(records: list[tuple[str, str]]) -> str:
    errors = [m for s, m in records if s in ("INTERNAL_ERROR", "ERROR")]
    text = (errors or [m for _, m in records] or ["no message from TensorRT"])[-1]
    return text.strip().splitlines()[0][:300] if text.strip() else "no message from TensorRT"


def _network_flags(trt) -> int:
    """Creation flags for a strongly typed network, looked up by name: STRONGLY_TYPED is bit 1 in TensorRT 10
    (bit 0 is the ignored EXPLICIT_BATCH) and bit 0 in 11, where it is accepted but ignored (always strong)."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _parser_errors(parser) -> str:
    msgs = []
    for i in range(int(getattr(parser, "num_errors", 0))):
        err = parser.get_error(i)
        try:
            desc = err.desc()
            node = err.node_name() if hasattr(err, "node_name") else ""
            msgs.append(f"{desc} (node {node})" if node else str(desc))
        except Exception:  # older bindings: the error's str() is the message
            msgs.append(str(err))
    return "; ".join(m.strip().splitlines()[0] for m in msgs if m and m.strip())[:400] or "unknown parser error"


def _parse(trt, builder, logger, path: Path, flags: int):
    network = builder.create_network(flags)
    if network is None:
        raise TensorRTError("TensorRT could not create a network", "check the TensorRT install and GPU driver")
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    if not ok:
        return None, _parser_errors(parser)
    return (network, parser), ""


def _load_timing_cache(config, path: Path | None) -> tuple[Any, str]:
    data = b""
    status = "disabled" if path is None else "new"
    if path is not None and path.is_file():
        data = path.read_bytes()
        status = "reused"
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a corrupt file: start empty rather than fail the build
        cache, status = config.create_timing_cache(b""), "reset (unreadable)"
    if cache is None:
        cache, status = config.create_timing_cache(b""), "reset (unreadable)"
    if not config.set_timing_cache(cache, False):  # from another TensorRT/GPU: start empty
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
        status = "reset (other TensorRT or GPU)"
    return cache, status


def _heartbeat(progress: Callable[[str], None] | None, label: str, interval: float = 5.0):
    """A spinner line every ``interval`` seconds while TensorRT builds; returns a stop function."""
    if progress is None:
        return lambda: None
    done = threading.Event()
    start = time.perf_counter()
    marks = "|/-\\"

    def run():
        i = 0
        while not done.wait(interval):
            progress(f"{marks[i % 4]} {label}: {time.perf_counter() - start:.0f}s")
            i += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def stop():
        done.set()
        thread.join(timeout=1)

    return stop


def _key(meta: Mapping[str, Any]) -> str:
    """Engine cache key: what must match for an existing plan to be reused."""
    fields = {k: meta.get(k) for k in ("tensorrt_version", "gpu", "precision", "profile", "builder_settings")}
    fields["onnx_sha256"] = (meta.get("onnx") or {}).get("sha256")
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def build_engine(onnx_path: str | Path, engine_path: str | Path, cfg: GAMConfig,
                 profile: Mapping[str, Any] | TrtProfile | None = None, *, graph: str | None = None,
                 precision: str | None = None, tf32: bool = False, optimization_level: int = DEFAULT_OPT_LEVEL,
                 workspace_bytes: int | None = None, timing_cache: str | Path | None = "auto",
                 inlined: bool | None = None, device: int = 0, reuse: bool = True,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build a TensorRT plan from a gamexport graph; write it and its JSON sidecar atomically; return the sidecar.

    ``profile``: ``{"min": "BxT", "opt": "BxT", "max": "BxT"}`` over batch × sequence (prefill) or batch × chunk
    (step); missing points take :func:`default_profile`. ``graph`` is read from the file's metadata when None.
    ``precision``: what the caller expects; refused when the graph holds another (strongly typed: the graph
    decides). ``tf32``: allow TF32 for fp32 math (off: fp32 parity). ``timing_cache``: a file reused across builds
    ("auto": beside the engine, None: no cache). ``inlined``: parse the ``.inlined.onnx`` twin (True), the function
    graph (False), or the function graph with the twin as fallback if the parser refuses it (None).
    ``reuse``: keep an existing plan whose sidecar has the same cache key (ONNX sha256, TensorRT, GPU, precision,
    profile, builder settings).
    """
    import onnx

    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise GraphError(f"{onnx_path} does not exist", "run gamexport build first, or pass the build folder")
    if optimization_level not in range(6):
        raise ConfigError(f"builder optimization level must be 0..5, got {optimization_level}",
                          "use 3 (TensorRT's default) or higher for faster engines and slower builds")
    if workspace_bytes is not None and workspace_bytes <= 0:
        raise ConfigError(f"workspace limit must be positive, got {workspace_bytes}", "pass a size in bytes")
    env = runtime_environment(device)

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise GraphError(f"cannot read ONNX file {onnx_path}: {type(exc).__name__}",
                         "the file is truncated or corrupt; rebuild it with gamexport build") from exc
    graph = _graph_kind(model, graph)
    found = graph_precision(model)
    if found == "int8-dyn":
        raise ConfigError(f"{onnx_path.name} uses ONNX Runtime's dynamic quantization (MatMulInteger), "
                          "which TensorRT does not build", "build the TensorRT engine from the int8 (Q/DQ) graph")
    if precision is not None and precision != found:
        raise ConfigError(f"{onnx_path.name} holds a {found} graph, but a {precision} engine was asked for "
                          "(TensorRT networks are strongly typed: the graph decides the precision)",
                          f"build the {precision} engine from the {precision} variant of the graph")
    del model
    prof = make_profile(cfg, graph, profile)
    onnx_sha = sha256_file(onnx_path)
    settings = {"strongly_typed": True, "tf32": bool(tf32 and found == "fp32"),
                "optimization_level": optimization_level, "workspace_bytes": workspace_bytes,
                "compatibility": "none"}
    meta: dict[str, Any] = {
        "schema_version": SIDECAR_SCHEMA, "gamexport_version": __version__, "graph": graph,
        "tensorrt_version": env["tensorrt_version"],
        "gpu": {"name": env["gpu_name"], "compute_capability": env["compute_capability"]},
        "precision": found, "profile": prof.to_dict(), "builder_settings": settings,
        "onnx": {"file": onnx_path.name, "sha256": onnx_sha}, "config": cfg.to_dict(),
    }
    meta["key"] = _key(meta)
    if timing_cache == "auto":
        cc = env["compute_capability"].replace(".", "")
        cache_path = engine_path.parent / f"timing-trt{env['tensorrt_version']}-sm{cc}.cache"
    else:
        cache_path = Path(timing_cache) if timing_cache is not None else None
    # From the reuse check to the last write: one builder at a time per engine folder (module notes).
    with cache_lock(engine_path.parent, progress=progress):
        for path in (engine_path, sidecar_path(engine_path), cache_path):
            if path is not None and path.parent == engine_path.parent:
                remove_temporaries(path)  # what a killed builder left; no live writer, we hold the lock
        if reuse:
            old = _reusable(engine_path, meta["key"], progress)
            if old is not None:
                return old
        with _device_scope(device):
            return _build_plan(trt, onnx_path, engine_path, cfg, prof, meta, inlined, cache_path, progress)


def _reusable(engine_path: Path, key: str, progress) -> dict | None:
    """The sidecar of an existing plan built with the same cache key and still matching it, else None."""
    side = sidecar_path(engine_path)
    if not (engine_path.is_file() and side.is_file()):
        return None
    try:
        old = read_json(side, schema=SIDECAR_SHAPE, error=GraphError, max_bytes=MIB)
    except (OSError, GraphError):
        old = None
    if not isinstance(old, dict) or old.get("key") != key:
        return None
    if (old.get("engine") or {}).get("sha256") != sha256_file(engine_path):
        if progress:
            progress(f"TensorRT engine {engine_path.name} does not match its sidecar (truncated or replaced): "
                     "rebuilding it")
        return None
    if progress:
        progress(f"TensorRT engine {engine_path.name} is up to date (same ONNX, TensorRT, GPU, profile)")
    return old


def _build_plan(trt, onnx_path: Path, engine_path: Path, cfg: GAMConfig, prof: TrtProfile, meta: dict,
                inlined: bool | None, cache_path: Path | None, progress) -> dict:
    """Parse, configure, build and write; ``meta`` (the sidecar so far) carries the settings."""
    settings = meta["builder_settings"]
    logger = _logger(trt)
    mark = len(logger.records)
    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTError("TensorRT could not create a builder (no usable GPU or driver?)",
                            "check nvidia-smi and that the driver supports this TensorRT")
    flags = _network_flags(trt)
    twin = inlined_twin(onnx_path)
    candidates = [twin] if inlined else [onnx_path] + ([twin] if inlined is None and twin.is_file() else [])
    parsed, errors, parsed_path = None, [], None
    for path in candidates:
        if not path.is_file():
            raise GraphError(f"{path} does not exist", "rebuild the folder with gamexport build")
        parsed, err = _parse(trt, builder, logger, path, flags)
        if parsed is not None:
            parsed_path = path
            break
        errors.append(f"{path.name}: {err}")
    if parsed is None:
        raise GraphError(f"TensorRT's ONNX parser refused {' and '.join(errors)}",
                         "check that this TensorRT supports every op in the graph (opset 20), or report it")
    network, _parser = parsed
    if parsed_path != onnx_path:
        meta["onnx"].update({"parsed_file": parsed_path.name, "parsed_sha256": sha256_file(parsed_path)})
        if progress and inlined is None:
            progress(f"TensorRT parsed {parsed_path.name} ({onnx_path.name} was refused: {errors[0]})")

    config = builder.create_builder_config()
    tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
    if tf32_flag is not None:
        if settings["tf32"]:
            config.set_flag(tf32_flag)
        else:
            config.clear_flag(tf32_flag)
    config.builder_optimization_level = settings["optimization_level"]
    if settings["workspace_bytes"] is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings["workspace_bytes"]))
    trt_profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in prof.input_shapes(cfg).items():
        trt_profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(trt_profile)

    cache, cache_status = _load_timing_cache(config, cache_path)  # "disabled": in memory for this build only

    label = f"building TensorRT engine {engine_path.name} from {parsed_path.name}"
    if progress:
        progress(f"{label} ({prof.bounds()}, {meta['precision']}, "
                 f"optimization level {settings['optimization_level']})")
    stop = _heartbeat(progress, label)
    start = time.perf_counter()
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        stop()
    seconds = time.perf_counter() - start
    if plan is None:
        raise TensorRTError(f"TensorRT could not build {engine_path.name}: "
                            f"{_last_error(logger.records[mark:])}",
                            "try a smaller profile max or a larger workspace, or check the GPU's free memory")
    data = bytes(memoryview(plan))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    meta.update({
        "engine": {"file": engine_path.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)},
        "timing_cache": {"file": cache_path.name if cache_path else None, "status": cache_status},
        "build_seconds": round(seconds, 3),
        "warnings": [m for s, m in logger.records[mark:] if s == "WARNING"][:20],
    })
    atomic_write_bytes(engine_path, data)
    atomic_write_json(sidecar_path(engine_path), meta)
    if progress:
        progress(f"TensorRT engine {engine_path.name}: {len(data) / 1e6:.1f} MB in {seconds:.1f}s")
    del cache
    return meta


def build_engines(build_dir: str | Path, cfg: GAMConfig | None = None,
                  profiles: Mapping[str, Mapping[str, Any] | TrtProfile | None] | None = None,
                  precision: str = "fp32", **kwargs) -> dict[str, dict[str, Any]]:
    """Prefill and step engines for a build folder, into ``<build_dir>/tensorrt/``; returns {graph: sidecar}."""
    from gamexport.graph import read_graph_config

    build_dir = Path(build_dir)
    suffix = "" if precision == "fp32" else f".{precision}"
    paths = engine_paths(build_dir, precision)
    out = {}
    for graph, stem in GRAPH_STEMS.items():
        onnx_path = build_dir / f"{stem}{suffix}.onnx"
        if cfg is None:
            cfg, _ = read_graph_config(onnx_path)
        out[graph] = build_engine(onnx_path, paths[graph], cfg, (profiles or {}).get(graph), graph=graph,
                                  precision=precision, **kwargs)
    return out


#: The types of the sidecar keys gamexport reads (their values are then compared with this machine's).
SIDECAR_SHAPE = Obj(optional={"schema_version": Int(), "graph": Str(max_len=20), "tensorrt_version": Str(max_len=40),
                              "gpu": Obj(), "profile": Obj(), "engine": Obj(), "onnx": Obj(),
                              "key": Str(max_len=64)})


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    side = sidecar_path(engine_path)
    try:
        meta = read_json(side, schema=SIDECAR_SHAPE, error=GraphError, max_bytes=MIB, fix="rebuild the engine")
    except FileNotFoundError:
        raise GraphError(f"{Path(engine_path).name} has no sidecar {side.name} (TensorRT version, GPU, profile)",
                         "rebuild the engine with gamexport, which writes both") from None
    if not isinstance(meta, dict) or meta.get("schema_version") != SIDECAR_SCHEMA:
        raise GraphError(f"{side.name} is not a gamexport engine sidecar (schema {SIDECAR_SCHEMA})",
                         "rebuild the engine with this gamexport")
    return meta


def read_engine(path: str | Path, graph: str | None = None) -> tuple[dict[str, Any], bytes]:
    """(sidecar, plan bytes) of one engine, read together under the cache lock and checked against each other.

    Refuses in one line a missing plan or sidecar, an engine of the other graph, and a plan whose sha256 is not
    its sidecar's (truncated, replaced or corrupt). The bytes returned are the ones checked: load those, not
    the file again.
    """
    path = Path(path)
    with cache_lock(path.parent, shared=True):
        if not path.is_file():
            raise GraphError(f"{path} does not exist", "build the TensorRT engines first")
        meta = read_sidecar(path)
        try:
            plan = path.read_bytes()
        except OSError as exc:
            raise GraphError(f"cannot read {path}: {exc.strerror or exc}", "check the file's permissions") from exc
    if graph is not None and meta.get("graph") != graph:
        raise GraphError(f"{path.name} is a {meta.get('graph')} engine, not a {graph} engine",
                         "pass the prefill engine first and the step engine second")
    if (meta.get("engine") or {}).get("sha256") != hashlib.sha256(plan).hexdigest():
        raise EngineMismatchError(f"{path.name} does not match its sidecar {sidecar_path(path).name} "
                                  "(the plan was replaced or is corrupt)", "rebuild the engine")
    return meta, plan


# ---- running --------------------------------------------------------------------------------------------------
_NP_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8",
              "UINT8": "uint8", "BOOL": "bool"}


def _dtype_name(dtype) -> str:
    return getattr(dtype, "name", str(dtype)).split(".")[-1]


def _host_array(array: np.ndarray, dtype: str | None = None) -> np.ndarray:
    """A C-contiguous, writeable host array (torch.from_numpy warns on read-only ones)."""
    array = np.ascontiguousarray(array, dtype=dtype)
    return array if array.flags.writeable else array.copy()


class TorchCudaDevice:
    """Device buffers as torch CUDA tensors, one CUDA stream, and CUDA graphs captured on that stream with torch's
    ``torch.cuda.graph``; host arrays cross as NumPy. Everything is enqueued on the runner's own (non-default)
    stream, which is also the stream TensorRT executes on."""

    def __init__(self, index: int = 0):
        torch = _import_torch_cuda()
        self.torch = torch
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(device=self.device)

    def activate(self):
        """Context in which this device is CUDA's current device (TensorRT uses the current device)."""
        return self.torch.cuda.device(self.device)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def upload(self, array: np.ndarray):
        """A new device buffer holding ``array``."""
        array = _host_array(array)
        with self.torch.cuda.stream(self.stream):
            return self.torch.from_numpy(array).to(self.device, non_blocking=False)

    def empty(self, shape: tuple[int, ...], dtype: str):
        with self.torch.cuda.stream(self.stream):
            return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def copy_in(self, buffer, array: np.ndarray) -> None:
        """``array`` into an existing device buffer of its shape and dtype (the buffer keeps its address)."""
        source = self.torch.from_numpy(_host_array(array))
        with self.torch.cuda.stream(self.stream):
            buffer.copy_(source)

    def copy(self, dst, src) -> None:
        """Device to device on the stream; no host round trip."""
        with self.torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    @staticmethod
    def address(buffer) -> int:
        return int(buffer.data_ptr())

    def download(self, buffer) -> np.ndarray:
        """A host copy, never a view: reused buffers are overwritten by the next call."""
        with self.torch.cuda.stream(self.stream):
            return buffer.to("cpu", copy=True).numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()

    # CUDA graphs (torch's: the runner already works over torch CUDA tensors)
    def new_graph(self):
        return self.torch.cuda.CUDAGraph()

    def capture(self, graph):
        """Context that captures what is enqueued on the runner's stream into ``graph`` instead of running it.

        ``thread_local``: only this thread's CUDA calls may not be capture-unsafe while it captures."""
        return self.torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local")

    def replay(self, graph) -> None:
        with self.torch.cuda.stream(self.stream):  # CUDAGraph.replay launches on the current stream
            graph.replay()


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
            raise EngineMismatchError(f"TensorRT could not load {path.name}: {_last_error(records[mark:])}",
                                      "rebuild the engine on this machine")
        context = engine.create_execution_context()
        if context is None:
            raise TensorRTError(f"TensorRT could not create an execution context for {path.name}: "
                                f"{_last_error(records[mark:])}", "free GPU memory or rebuild with a smaller profile")
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
                                f"{_last_error(self.records)}", "report it: the buffer is a fresh torch CUDA tensor")

    def _output_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(s) for s in self.context.get_tensor_shape(name))
        if any(s < 0 for s in shape):
            raise TensorRTError(f"TensorRT could not infer the shape of {name} ({shape})",
                                "rebuild the engine; the graph's shapes do not resolve")
        return shape

    def execute(self, device) -> None:
        mark = len(self.records)
        if not self.context.execute_async_v3(device.stream_handle):
            raise TensorRTError(f"TensorRT failed to run {self.path.name}: {_last_error(self.records[mark:])}",
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
            return None, _first_line(exc)
        if not ok:
            return None, f"execute_async_v3 failed while capturing: {_last_error(self.records[mark:])}"
        return graph, None


class TrtRunner(Runner):
    """Runs a prefill and a step engine (TensorRT plans with gamexport sidecars) on one CUDA GPU.

    The step engine keeps device buffers for its current (batch, chunk) shape and reuses them while the shape
    stays the same: no set_input_shape / set_tensor_address, no allocation per call. The streaming state stays on
    the GPU between calls: the Runner API hands it out as a NumPy array, and when the same values come back
    (bit for bit, as from ``generate`` and any decode loop) the step copies its own device copy instead of
    uploading it; any other state is uploaded.

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
        self._logger = _logger(trt)
        with self.device.activate():
            self._runtime = trt.Runtime(self._logger)
            self.engines = {g: _Engine(trt, self._runtime, p, metas[g], self._logger.records, plans[g])
                            for g, p in paths.items()}
        for graph, eng in self.engines.items():
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
        self._state_device = None  # the device tensor holding the last state this runner returned
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

    # ---- the state kept on the device --------------------------------------------------------------------
    def _forget_state(self) -> None:
        self._state_device = self._state_host = None

    def _remember_state(self, device_buffer, host: np.ndarray) -> None:
        self._state_device, self._state_host = device_buffer, host.copy()

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
        logits, state = out[LOGITS].astype(np.float32, copy=False), out[CONV_STATE].astype(np.float32, copy=False)
        self._remember_state(buffers[CONV_STATE], state)
        return logits, state

    def _step(self, ids, position_ids, state):
        eng = self.engines["step"]
        eng.profile.check(ids.shape[0], ids.shape[1], eng.path.name)
        dev = self.device
        kept = self._state_device if self._state_is_current(state) else None
        self._forget_state()  # until this step has succeeded
        feeds = {INPUT_IDS: ids, POSITION_IDS: position_ids, CONV_STATE: state}
        with dev.activate():
            binding = eng.bind(dev, {name: tuple(int(s) for s in np.shape(feeds[name])) for name in eng.inputs})
            bufs = binding.buffers
            dev.copy_in(bufs[INPUT_IDS], np.ascontiguousarray(ids, dtype=eng.dtypes[INPUT_IDS]))
            dev.copy_in(bufs[POSITION_IDS], np.ascontiguousarray(position_ids, dtype=eng.dtypes[POSITION_IDS]))
            if kept is not None:  # this binding's own output, or the prefill's / an earlier binding's
                dev.copy(bufs[CONV_STATE], kept)
                self._stats["state_kept_on_device"] += 1
            else:
                dev.copy_in(bufs[CONV_STATE], np.ascontiguousarray(state, dtype=eng.dtypes[CONV_STATE]))
                self._stats["state_uploads"] += 1
            self._execute_step(eng, binding, decode=ids.shape[1] == 1)
            logits = dev.download(bufs[LOGITS])
            new_state = dev.download(bufs[CONV_STATE_OUT])
            dev.synchronize()
        logits, new_state = logits.astype(np.float32, copy=False), new_state.astype(np.float32, copy=False)
        self._remember_state(bufs[CONV_STATE_OUT], new_state)
        return logits, new_state

    def _execute_step(self, eng: _Engine, binding: _Binding, decode: bool) -> None:
        if binding.graph is not None:
            try:
                self.device.replay(binding.graph)
            except Exception as exc:
                raise TensorRTError(f"replaying the CUDA graph of {eng.path.name} failed: {_first_line(exc)}",
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


__all__ = ["TrtRunner", "TrtProfile", "build_engine", "build_engines", "check_engine_compatible",
           "cache_lock", "default_profile", "engine_paths", "graph_precision", "import_tensorrt", "make_profile",
           "read_engine", "read_sidecar", "runtime_environment", "sidecar_path", "EngineMismatchError", "ProfileError",
           "TensorRTError", "TensorRTMissingError"]
