"""A Triton Inference Server model repository for a build folder (plain text writer, no Triton import).

Layout written under ``repo_dir`` (names default to ``gam_prefill`` and ``gam_step``)::

    gam_prefill/config.pbtxt      dynamic batcher; input_ids -> logits, present.{i}.conv_state per layer
    gam_prefill/1/model.onnx      the build's model[.<precision>].onnx   (model.plan for the TensorRT backend)
    gam_step/config.pbtxt         sequence batcher, one implicit state per layer:
                                  past_key_values.{i}.conv_state <- present.{i}.conv_state
    gam_step/1/model.onnx         the build's step[.<precision>].onnx    (model.plan for the TensorRT backend)

What the configs say, and why (Triton's docs: ``docs/user_guide/model_configuration.md``, ``architecture.md``
"Implicit State Management", ``common/protobuf/model_config.proto``):

- ``max_batch_size > 0`` on both models: the graphs' first axis is the batch, so every ``dims`` omits it (Triton
  forms the full shape as ``[-1] + dims``); the dynamic and sequence batchers need a batching model.
- **prefill** (``gam_prefill``): ``dynamic_batching``. The sequence axis is ``-1`` and not ragged, so Triton only
  batches requests of equal length (``ModelInput.allow_ragged_batch`` is false; ragged batching would need a
  graph that takes a flattened ``[-1]`` input, which gamexport does not write). GAM is causal, so a client may
  right-pad to a common length: the logits of the real positions are unchanged, the returned states are those of
  the padded sequence. That is why this model keeps every position's logits (scoring, padded batches: a
  last-position-only graph would return a pad's); a client that generates sends its prompt to ``gam_step``.
- **step** (``gam_step``): ``sequence_batching`` with one implicit ``state`` per layer: input
  ``past_key_values.{i}.conv_state``, output ``present.{i}.conv_state``, dims ``[k-1, d_model]``,
  ``initial_state { zero_data: true }``. Triton feeds each request of a sequence the states the previous request
  produced and starts every sequence from zeros, which is exactly "prefill is a chunk from the zero state". The
  state tensors are therefore not in ``input``/``output`` (a client never sends or receives them;
  ``expose_state=True`` lists the ``present.{i}.conv_state`` outputs for debugging). No ``control_input``: the
  graph takes no START/END/READY/CORRID tensor and needs none (zero
  initial state replaces START); the ONNX Runtime backend counts every configured control input as a required
  model input, so listing one would fail the load. ``position_ids`` stays a request input: the client sends the
  position of every token of the chunk (the graph has no position output Triton could carry as a state).
  A request returns the logits of its chunk's last position only (``logits`` dims ``[1, vocab]``): the prompt
  sent as the first request runs the tied head once, which is all generation samples from.
  The scheduling strategy is ``oldest`` (sequences batched by the dynamic batcher, more live sequences than
  batch slots) or ``direct``; either way only requests with equal chunk lengths share a batch.

The TensorRT backend (``platform: "tensorrt_plan"``) serves the plans of :func:`gamexport.engines.trt.build_engines`
(``<build>/tensorrt/{model,step}.<precision>.plan`` with their JSON sidecars); the I/O is read from the ONNX graph
each plan was built from, checked by its sha256 in the sidecar. Without plans, write the ONNX Runtime backend
(:func:`choose_backend` says which one a build folder supports).

Each model folder is assembled in a staging folder (beside the repository where its parent is writable) and
swapped into place atomically, so a Triton server polling the repository never sees a half-written model. The two
models are swapped one after the other, not together.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from gamexport.config import (INPUT_IDS, LEGACY_REFUSAL, LEGACY_STATE, POSITION_IDS, past_state_name,
                              present_state_name, state_layer)
from gamexport.errors import ConfigError, GamexportError, GraphError, OutputError
from gamexport.fsutil import atomic_write_bytes, atomic_write_text, replace_dir, sha256_file
from gamexport.layout import ENGINE_DIR, PRECISIONS, engine_file, graph_file, is_prepacked
from gamexport.layout import GRAPH_STEMS as GRAPHS  # graph kind -> file stem in the build folder
from gamexport.targets import UNSUPPORTED

VERSION = "1"
BACKENDS = ("onnxruntime", "tensorrt")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO")
STRATEGIES = ("oldest", "direct")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# ONNX TensorProto element type -> Triton DataType (model_config.proto).
_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
                 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}


# ---- errors (one line each, with the fix) ---------------------------------------------------------------------
class TritonConfigError(ConfigError):
    """An argument that cannot make a valid Triton model configuration."""


class BuildFolderError(GraphError):
    """The build folder, or the graph a model needs from it, is missing or not a gamexport graph."""


class MissingPlanError(GraphError):
    """The TensorRT backend was asked for, but the build folder has no usable plans for that precision."""


# ---- reading the graphs -----------------------------------------------------------------------------------------
Tensor = tuple[str, str, list[int]]  # name, Triton data type, dims WITHOUT the batch axis (-1 = dynamic)
State = tuple[str, str, str, list[int]]  # input name, output name, Triton data type, dims without the batch axis


def _io(path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of an ONNX graph, the leading batch axis checked and removed."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for corrupt files
        raise BuildFolderError(f"cannot read ONNX file {path}: {type(exc).__name__}",
                               "the file is truncated or corrupt; rebuild it with gamexport build") from exc

    def table(values) -> list[Tensor]:
        rows = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in _TRITON_TYPES:
                raise BuildFolderError(f"{path.name} tensor {v.name} has ONNX type {t.elem_type}, which Triton "
                                       "cannot exchange", "keep graph inputs and outputs int64/float32")
            dims = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in t.shape.dim]
            if not dims or dims[0] != -1:
                raise BuildFolderError(f"{path.name} tensor {v.name} has no dynamic batch axis first "
                                       f"(shape {dims})", "rebuild the graphs with gamexport build")
            rows.append((v.name, _TRITON_TYPES[t.elem_type], dims[1:]))
        return rows

    inits = {i.name for i in model.graph.initializer}
    return table(v for v in model.graph.input if v.name not in inits), table(model.graph.output)


def _graph_file(build_dir: Path, graph: str, precision: str, inlined: bool) -> Path:
    return build_dir / graph_file(graph, precision, inlined)


def engine_paths(build_dir: str | Path, precision: str = "fp32") -> dict[str, Path]:
    """Where :func:`gamexport.engines.trt.build_engines` puts a build folder's plans (``gamexport.layout``)."""
    return {graph: Path(build_dir) / engine_file(graph, precision) for graph in GRAPHS}


def _plan_sources(build_dir: Path, precision: str, max_batch_size: int) -> dict[str, tuple[Path, Path, dict]]:
    """{graph: (plan, ONNX it was built from, sidecar)} for the TensorRT backend, checked in one line each."""
    out = {}
    paths = engine_paths(build_dir, precision)
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise MissingPlanError(f"{build_dir / ENGINE_DIR} has no {precision} TensorRT plan {', '.join(missing)}",
                               "build the engines on the serving GPU (gamexport.engines.trt.build_engines), "
                               "or write the onnxruntime backend")
    from gamexport.engines.trt import read_sidecar, sidecar_path

    for graph, plan in paths.items():
        side = sidecar_path(plan)
        try:
            meta = read_sidecar(plan)  # the one reader of engine sidecars (pure Python, no TensorRT import)
        except GamexportError as exc:
            raise MissingPlanError(exc.message, exc.fix) from exc
        onnx_meta = meta.get("onnx") if isinstance(meta, dict) else None
        if not isinstance(onnx_meta, dict) or not onnx_meta.get("file") or meta.get("graph") != graph:
            raise MissingPlanError(f"{side.name} is not a gamexport {graph} engine sidecar",
                                   "rebuild the engines with gamexport")
        if meta.get("precision") != precision:
            raise MissingPlanError(f"{plan.name} holds a {meta.get('precision')} engine, not {precision}",
                                   "rebuild the engines")
        source = build_dir / Path(str(onnx_meta["file"])).name
        if not source.is_file() or sha256_file(source) != onnx_meta.get("sha256"):
            raise MissingPlanError(f"{plan.name} was not built from this build folder's {source.name}",
                                   "rebuild the engines after the last gamexport build")
        profile = meta.get("profile") or {}
        try:
            lo, hi = int(profile["min"][0]), int(profile["max"][0])
        except (KeyError, TypeError, ValueError, IndexError):
            raise MissingPlanError(f"{side.name} has no valid optimization profile", "rebuild the engines") from None
        if lo != 1 or max_batch_size > hi:
            raise TritonConfigError(f"max batch size {max_batch_size} does not fit {plan.name}'s profile "
                                    f"(batch {lo}..{hi}; Triton sends batches of 1..max_batch_size)",
                                    f"pass max_batch_size <= {hi}, or rebuild the engine with a min batch of 1 "
                                    f"and a max of at least {max_batch_size}")
        out[graph] = (plan, source, meta)
    return out


def choose_backend(build_dir: str | Path, precision: str = "fp32") -> tuple[str, str]:
    """("tensorrt", why) when the build folder holds both plans of ``precision``, else ("onnxruntime", why)."""
    paths = engine_paths(build_dir, precision)
    if all(p.is_file() for p in paths.values()):
        return "tensorrt", f"TensorRT {precision} plans found in {Path(build_dir) / ENGINE_DIR}"
    return "onnxruntime", (f"no TensorRT {precision} plans in {Path(build_dir) / ENGINE_DIR}: writing the ONNX "
                           "Runtime backend only")


# ---- config.pbtxt text ------------------------------------------------------------------------------------------
def _dims(dims: Iterable[int]) -> str:
    return f"[ {', '.join(str(int(d)) for d in dims)} ]"


def _tensors(key: str, rows: list[Tensor]) -> list[str]:
    lines = [f"{key} ["]
    for i, (name, dtype, dims) in enumerate(rows):
        lines += ["  {", f'    name: "{name}"', f"    data_type: {dtype}", f"    dims: {_dims(dims)}",
                  "  }" + ("," if i < len(rows) - 1 else "")]
    return lines + ["]"]


def _instance_group(kind: str, count: int, gpus: list[int]) -> list[str]:
    group = ["instance_group [", "  {", f"    count: {count}", f"    kind: {kind}"]
    if gpus:
        group.append(f"    gpus: {_dims(gpus)}")
    return group + ["  }", "]"]


def _header(name: str, backend: str, max_batch_size: int, notes: list[str]) -> list[str]:
    lines = [f"# Written by gamexport ({backend} backend)."] + [f"# {n}" for n in notes]
    lines += ["# max_batch_size > 0: every dims below omits the batch axis (full shape [-1] + dims).",
              f'name: "{name}"', f'platform: "{PLATFORMS[backend]}"', f"max_batch_size: {max_batch_size}"]
    return lines


def prefill_config(name: str, backend: str, inputs: list[Tensor], outputs: list[Tensor], *, max_batch_size: int,
                   queue_delay_us: int, instance_kind: str, instance_count: int, gpus: list[int],
                   notes: list[str] = ()) -> str:
    """``config.pbtxt`` of the prefill model: dynamic batching, stateless."""
    lines = _header(name, backend, max_batch_size, [
        "GAM prefill. input_ids [sequence] from position 0 -> logits [sequence, vocab] and the streaming",
        "state present.{i}.conv_state [k-1, d_model] of each layer i after the last token (per batch row).",
        "Dynamic batching joins only requests of EQUAL sequence length (input_ids is not ragged). GAM is",
        "causal: right-padding to a common length leaves the real positions' logits unchanged (not the state).",
        *notes])
    lines += _tensors("input", inputs) + _tensors("output", outputs)
    lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {queue_delay_us}", "}"]
    lines += _instance_group(instance_kind, instance_count, gpus)
    return "\n".join(lines) + "\n"


def step_config(name: str, backend: str, inputs: list[Tensor], outputs: list[Tensor], states: list[State], *,
                max_batch_size: int, strategy: str, max_sequences: int, sequence_idle_us: int,
                queue_delay_us: int, instance_kind: str, instance_count: int, gpus: list[int],
                notes: list[str] = ()) -> str:
    """``config.pbtxt`` of the streaming chunk model: sequence batcher with one implicit, zero-initialised state
    per layer (``states``: (input name, output name, data type, dims) each)."""
    lines = _header(name, backend, max_batch_size, [
        "GAM streaming chunk under the sequence batcher. The server keeps the state: each layer's",
        "past_key_values.{i}.conv_state is fed from the previous request's present.{i}.conv_state of the same",
        "sequence (correlation id), and zeros at the sequence start (= prefill from position 0). Each request:",
        "one sequence (batch 1), input_ids [chunk >= 1], position_ids [chunk] = the position of every token;",
        "it returns the logits of the chunk's last position only, logits [1, vocab].",
        "Only equal chunk lengths share a batch.",
        *notes])
    lines += _tensors("input", inputs) + _tensors("output", outputs)
    lines += ["sequence_batching {", f"  max_sequence_idle_microseconds: {sequence_idle_us}"]
    if strategy == "oldest":
        lines += ["  oldest {", f"    max_candidate_sequences: {max_sequences}",
                  f"    max_queue_delay_microseconds: {queue_delay_us}", "  }"]
    else:
        lines += ["  direct { }"]
    lines += ["  state ["]
    for i, (input_name, output_name, dtype, dims) in enumerate(states):
        lines += ["    {", f'      input_name: "{input_name}"', f'      output_name: "{output_name}"',
                  f"      data_type: {dtype}", f"      dims: {_dims(dims)}", "      initial_state [", "        {",
                  f"          data_type: {dtype}", f"          dims: {_dims(dims)}", "          zero_data: true",
                  '          name: "zeros"', "        }", "      ]", "    }" + ("," if i < len(states) - 1 else "")]
    lines += ["  ]", "}"]
    lines += _instance_group(instance_kind, instance_count, gpus)
    return "\n".join(lines) + "\n"


# ---- the repository ---------------------------------------------------------------------------------------------
def _check_args(backend, precision, name_prefix, instance_kind, instance_count, gpus, max_batch_size, strategy,
                max_sequences, sequence_idle_s, queue_delay_us) -> str:
    if backend not in BACKENDS:
        raise TritonConfigError(f"Triton backend {backend!r} is not one of {', '.join(BACKENDS)}",
                                "use onnxruntime (CPU or GPU) or tensorrt (GPU, needs built plans)")
    if precision not in PRECISIONS:
        raise TritonConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                                "pass a precision the build wrote")
    if not isinstance(name_prefix, str) or not _NAME.match(name_prefix):
        raise TritonConfigError(f"model name prefix {name_prefix!r} is not a valid folder name",
                                "use letters, digits, '_', '-' or '.', starting with a letter or digit")
    if instance_kind is None:
        instance_kind = "KIND_GPU" if backend == "tensorrt" else "KIND_CPU"
    if instance_kind not in INSTANCE_KINDS:
        raise TritonConfigError(f"instance kind {instance_kind!r} is not one of {', '.join(INSTANCE_KINDS)}",
                                "use KIND_CPU or KIND_GPU")
    if backend == "tensorrt" and instance_kind == "KIND_CPU":
        raise TritonConfigError("the TensorRT backend runs on GPUs only, not KIND_CPU", "use KIND_GPU")
    # What each backend cannot run, as the target registry says it (bf16 on the CPU provider, MatMulInteger on a
    # GPU, contrib operators and MatMulInteger in TensorRT); KIND_AUTO may land on a GPU.
    target = ("tensorrt" if backend == "tensorrt" else "onnxruntime-cpu" if instance_kind == "KIND_CPU"
              else "onnxruntime-cuda")
    why = UNSUPPORTED.get((target, precision))
    if why:
        fix = ("use KIND_CPU, or serve the int8 (Q/DQ) graph on a GPU" if target == "onnxruntime-cuda"
               else "use KIND_GPU, or serve fp16/fp32 on CPU" if target == "onnxruntime-cpu"
               else "serve int8 or a float precision with the tensorrt backend")
        raise TritonConfigError(f"{precision} with Triton's {backend} backend on {instance_kind}: {why}", fix)
    if gpus and instance_kind == "KIND_CPU":
        raise TritonConfigError("gpus can only be listed for KIND_GPU or KIND_AUTO instance groups",
                                "drop gpus or use KIND_GPU")
    if any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in gpus):
        raise TritonConfigError(f"gpus must be device indices >= 0, got {gpus}", "pass e.g. gpus=[0]")
    for label, value, low in (("instance count", instance_count, 1), ("max batch size", max_batch_size, 1),
                              ("max sequences", max_sequences, 1), ("queue delay", queue_delay_us, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TritonConfigError(f"{label} must be an integer >= {low}, got {value!r}",
                                    "the sequence and dynamic batchers need max_batch_size >= 1"
                                    if label == "max batch size" else f"pass an integer >= {low}")
    if strategy not in STRATEGIES:
        raise TritonConfigError(f"sequence strategy {strategy!r} is not one of {', '.join(STRATEGIES)}",
                                "use oldest (default) or direct")
    if not isinstance(sequence_idle_s, (int, float)) or isinstance(sequence_idle_s, bool) or sequence_idle_s <= 0:
        raise TritonConfigError(f"sequence idle time must be > 0 seconds, got {sequence_idle_s!r}",
                                "pass e.g. 60 (a sequence idle longer than this is ended and its state freed)")
    return instance_kind


def _check_step_io(path: Path, inputs: list[Tensor], outputs: list[Tensor]) -> list[State]:
    """The step graph's implicit states, one per layer: past_key_values.{i}.conv_state <- present.{i}.conv_state."""
    names_in, names_out = [t[0] for t in inputs], [t[0] for t in outputs]
    if LEGACY_STATE in names_in:
        raise BuildFolderError(f"{path.name} was {LEGACY_REFUSAL}")
    pasts = {state_layer(t[0]): t for t in inputs if state_layer(t[0]) is not None}
    presents = {state_layer(t[0]): t for t in outputs if state_layer(t[0]) is not None}
    layers = list(range(len(pasts)))
    if (not {INPUT_IDS, POSITION_IDS} <= set(names_in) or not pasts or sorted(pasts) != layers
            or sorted(presents) != layers or any(pasts[i][0] != past_state_name(i) for i in layers)):
        raise BuildFolderError(f"{path.name} is not a gamexport step graph (inputs {names_in}, outputs {names_out})",
                               "pass a folder written by gamexport build")
    states = []
    for i in layers:
        state_in, state_out = pasts[i], presents[i]
        if state_out[0] != present_state_name(i) or state_in[1:] != state_out[1:] or -1 in state_in[2]:
            raise BuildFolderError(f"{path.name}: {state_in[0]} {state_in[1:]} and {state_out[0]} {state_out[1:]} "
                                   "must have one fixed shape and type to be carried as implicit state",
                                   "rebuild the graphs with gamexport build")
        states.append((state_in[0], state_out[0], state_in[1], state_in[2]))
    return states


def check_repository(repo_dir: str | Path, names: Iterable[str], guards: dict | None = None) -> Path:
    """Refuse ``repo_dir`` (in one line, before anything is written) unless it is a new or empty folder or a
    model repository, overlaps none of ``guards`` (label → path, see ``gamexport.destinations``), and each of
    the model folders ``names`` is absent or one gamexport wrote; returns the resolved repository path."""
    from gamexport.destinations import TRITON, check_folder, is_triton_model

    repo = check_folder(repo_dir, TRITON, option="--triton", guards=guards)
    existing = next(p for p in (repo, *repo.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the model repository {repo}: {existing} is not writable",
                          "pass --triton a folder you can write to")
    for name in names:
        target = repo / name
        if target.is_symlink() or (target.exists() and not is_triton_model(target)):
            raise OutputError(f"{target} is not a model folder gamexport wrote, and would be replaced",
                              "move it away, or pass --triton another folder")
    return repo


def write_model_repository(build_dir: str | Path, repo_dir: str | Path, *, backend: str = "onnxruntime",
                           precision: str = "fp32", name_prefix: str = "gam", instance_kind: str | None = None,
                           instance_count: int = 1, gpus: Iterable[int] = (), max_batch_size: int = 8,
                           strategy: str = "oldest", max_sequences: int = 32, sequence_idle_s: float = 60.0,
                           queue_delay_us: int = 0, expose_state: bool = False,
                           inlined: bool = False) -> dict[str, Path]:
    """Write a Triton model repository for a build folder's prefill and step graphs; returns {model name: folder}.

    ``backend``: ``onnxruntime`` (``model[.<precision>].onnx``) or ``tensorrt`` (the build folder's
    ``tensorrt/{model,step}.<precision>.plan``; refused in one line when missing — see :func:`choose_backend`).
    ``instance_kind``: KIND_CPU (ONNX Runtime default), KIND_GPU (TensorRT default; ONNX Runtime on CUDA) or
    KIND_AUTO. ``max_batch_size``: largest batch either batcher forms (>= 1; at most the TensorRT profile's max).
    ``strategy``: sequence batcher strategy, ``oldest`` (up to ``max_sequences`` live sequences per instance,
    batched oldest-first) or ``direct`` (one batch slot per live sequence: ``max_batch_size`` per instance).
    ``sequence_idle_s``: a sequence with no request for this long is ended by Triton and its state dropped.
    ``queue_delay_us``: how long a batcher may hold a request to grow a batch (0: never wait).
    ``expose_state``: also list the ``present.{i}.conv_state`` step outputs (debugging; the client can then request
    them).
    ``inlined``: serve the ``.inlined.onnx`` twins (ONNX Runtime builds that predate local functions).
    Other models already in ``repo_dir`` are left alone; ours are replaced atomically, one folder at a time.
    """
    build_dir, repo_dir = Path(build_dir), Path(repo_dir)
    gpus = list(gpus)
    instance_kind = _check_args(backend, precision, name_prefix, instance_kind, instance_count, gpus,
                                max_batch_size, strategy, max_sequences, sequence_idle_s, queue_delay_us)
    if backend == "tensorrt" and inlined:
        raise TritonConfigError("inlined applies to ONNX graphs, not TensorRT plans", "drop inlined")
    if not build_dir.is_dir():
        raise BuildFolderError(f"build folder {build_dir} does not exist", "pass a folder written by gamexport build")
    check_repository(repo_dir, [f"{name_prefix}_{graph}" for graph in GRAPHS], {"the build folder": build_dir})

    # Everything is read and checked before anything is written.
    models: dict[str, tuple[Path, str]] = {}  # name -> (file to serve, config text)
    plans = _plan_sources(build_dir, precision, max_batch_size) if backend == "tensorrt" else {}
    for graph in GRAPHS:
        name = f"{name_prefix}_{graph}"
        if backend == "tensorrt":
            served, source, meta = plans[graph]
            gpu = meta.get("gpu") or {}
            notes = [f"TensorRT {meta.get('tensorrt_version')} plan for {gpu.get('name')} (compute capability "
                     f"{gpu.get('compute_capability')}), built from {source.name}: serve it with a tritonserver",
                     "image of the same TensorRT version on the same GPU model. Profile: "
                     f"{json.dumps((meta.get('profile') or {}).get('max'))} max (batch, tokens)."]
        else:
            served = source = _graph_file(build_dir, graph, precision, inlined)
            notes = []
        if not source.is_file():
            made = sorted(p.name for p in build_dir.glob(f"{GRAPHS[graph]}*.onnx") if not is_prepacked(p.name))
            raise BuildFolderError(f"{source} does not exist (the build holds {', '.join(made) or 'no graphs'})",
                                   f"pass a precision the build wrote, or rebuild with --precision {precision}")
        inputs, outputs = _io(source)
        common = dict(max_batch_size=max_batch_size, queue_delay_us=queue_delay_us, instance_kind=instance_kind,
                      instance_count=instance_count, gpus=gpus, notes=notes)
        if graph == "prefill":
            text = prefill_config(name, backend, inputs, outputs, **common)
        else:
            states = _check_step_io(source, inputs, outputs)
            kept_in, kept_out = {s[0] for s in states}, {s[1] for s in states}
            text = step_config(name, backend, [t for t in inputs if t[0] not in kept_in],
                               [t for t in outputs if expose_state or t[0] not in kept_out], states,
                               strategy=strategy, max_sequences=max_sequences,
                               sequence_idle_us=max(1, round(sequence_idle_s * 1e6)), **common)
        models[name] = (served, text)

    try:
        repo_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {repo_dir}: {exc.strerror or exc}",
                          "choose a folder you can write to") from exc
    # Stage beside the repository where possible, so a polling server never sees a foreign folder inside it.
    stage_in = repo_dir.parent if os.access(repo_dir.parent, os.W_OK) else repo_dir
    written: dict[str, Path] = {}
    for name, (served, text) in models.items():
        target = repo_dir / name
        staging = stage_in / f".{repo_dir.name}.{name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            atomic_write_bytes(staging / VERSION / MODEL_FILES[backend], served.read_bytes())
            atomic_write_text(staging / "config.pbtxt", text)
            replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written[name] = target
    return written


__all__ = ["BACKENDS", "BuildFolderError", "MissingPlanError", "PLATFORMS", "TritonConfigError", "check_repository",
           "choose_backend", "engine_paths", "prefill_config", "step_config", "write_model_repository"]
