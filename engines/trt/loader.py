"""Building TensorRT plans and keeping them: ONNX → serialized plan + JSON sidecar, the engine folder as a cache
shared by processes (its lock, the reuse key, the timing cache), and reading a plan back with its sidecar.

See the package notes for the rules (strongly typed networks, TF32 off for fp32, one profile, sidecars, the lock).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from gamexport import __version__
from gamexport.config import LEGACY_REFUSAL, GAMConfig
from gamexport.errors import ConfigError, GraphError
from gamexport.fsutil import atomic_write_bytes, atomic_write_json, file_lock, remove_temporaries, sha256_file
from gamexport import layout
from gamexport.jsonfile import MIB, Int, Obj, Str, read_json
from gamexport.layout import ENGINE_DIR, GRAPH_STEMS  # noqa: F401  (ENGINE_DIR: re-exported by the package)

from .cuda import device_scope
from .environment import (EngineMismatchError, TensorRTError, import_tensorrt, last_error, runtime_environment,
                          trt_logger)
from .profile import TOKEN_AXIS, TrtProfile, make_profile

#: 2: engines of per-layer state graphs (``past_key_values.{i}.conv_state``); 1 was the packed state.
SIDECAR_SCHEMA = 2
CACHE_LOCK = ".gamexport-engines.lock"  # in every folder gamexport writes engines into
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder optimization level


# ---- precision in the graph -----------------------------------------------------------------------------------
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_ORT_DYNAMIC = {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "ConvInteger"}


def graph_precision(model) -> str:
    """fp32, fp16, bf16, int8 (static Q/DQ), int8-dyn (ONNX Runtime's dynamic quantization) or int4 (MatMulNBits):
    what a strongly typed TensorRT network built from this ONNX graph computes in."""
    from onnx import TensorProto

    nodes = list(model.graph.node)
    for fn in model.functions:
        nodes.extend(fn.node)
    ops = {n.op_type for n in nodes}
    if "MatMulNBits" in ops:
        return "int4"
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
    return onnx_path.with_name(layout.inlined_twin(onnx_path.name))


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
    return {graph: Path(folder) / layout.engine_file(graph, precision) for graph in layout.GRAPHS}


# ---- building -------------------------------------------------------------------------------------------------
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
    if layout.precision(found).writer == "ort-dynamic":
        raise ConfigError(f"{onnx_path.name} uses ONNX Runtime's dynamic quantization (MatMulInteger), "
                          "which TensorRT does not build", "build the TensorRT engine from the int8 (Q/DQ) graph")
    if layout.precision(found).contrib_ops:
        raise ConfigError(f"{onnx_path.name} uses {layout.precision(found).contrib_ops}, an ONNX Runtime contrib "
                          "operator TensorRT does not parse",
                          "build the TensorRT engine from the int8 or a float graph")
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
        with device_scope(device):
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
    logger = trt_logger(trt)
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
                            f"{last_error(logger.records[mark:])}",
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
    if isinstance(meta, dict) and meta.get("schema_version") == 1:
        raise GraphError(f"{Path(engine_path).name} was {LEGACY_REFUSAL}")
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
