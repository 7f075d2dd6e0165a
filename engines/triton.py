"""A Triton Inference Server model repository for a build folder (ONNX Runtime backend, plain text, no Triton import).

Layout written under ``repo_dir`` (names default to ``gam_prefill`` and ``gam_step``)::

    gam_prefill/config.pbtxt      platform "onnxruntime_onnx", max_batch_size 0, inputs/outputs with dims
    gam_prefill/1/model.onnx      the build's model.onnx
    gam_step/config.pbtxt
    gam_step/1/model.onnx         the build's step.onnx

``max_batch_size: 0`` because the graphs carry the batch as an explicit first dimension (-1 in ``dims``, like
every dynamic axis); Triton's dynamic batcher needs ``max_batch_size > 0`` and is therefore not configured.

**Stateless serving of the step model**: the client keeps the streaming state. It calls ``gam_prefill`` with the
prompt, keeps its ``conv_state`` output, and sends that back as the ``conv_state`` input of every ``gam_step``
request together with the new token(s) and the position of the first one; ``conv_state_out`` replaces the state
for the next call. The state is small (L·(k−1)·d floats, 24 KB for the paper config), so the round trip is cheap.
A follow-up can keep the state on the server with Triton's sequence batcher and implicit state
(``conv_state`` ← ``conv_state_out``, zero initial state); that needs ``max_batch_size > 0`` and graphs whose
state carries no explicit batch axis, which this repository does not yet write.

Each model folder is assembled in a staging folder and swapped into place atomically, so a Triton server polling
the repository never sees a half-written model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from gamexport.errors import GraphError, OutputError
from gamexport.fsutil import atomic_write_bytes, atomic_write_text, replace_dir

PLATFORM = "onnxruntime_onnx"
VERSION = "1"
MODEL_FILE = "model.onnx"
GRAPHS = {"prefill": "model", "step": "step"}
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO")

# ONNX TensorProto element type → Triton DataType (model_config.proto).
_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
                 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}

_NOTES = {
    "prefill": [
        "Prefill: input_ids [batch, sequence] from position 0 -> logits [batch, sequence, vocab] and the",
        "streaming state conv_state [batch, layers, k-1, d_model] after the last token.",
    ],
    "step": [
        "Streaming chunk, served statelessly: the CLIENT carries the state. Send the conv_state returned by",
        "the prefill model (or by the previous step call as conv_state_out) with the next chunk of input_ids",
        "and position_ids = position of the chunk's first token, one per row. A zero conv_state at position 0",
        "equals prefill. Follow-up: Triton's sequence batcher with implicit state could keep it server-side.",
    ],
}


def _io(path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]], dict]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for corrupt files
        raise GraphError(f"cannot read ONNX file {path}: {type(exc).__name__}",
                         "the file is truncated or corrupt; rebuild it with gamexport build") from exc

    def table(values) -> list[tuple[str, str, list[int]]]:
        rows = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in _TRITON_TYPES:
                raise GraphError(f"{path.name} tensor {v.name} has ONNX type {t.elem_type}, which Triton cannot "
                                 "exchange", "keep graph inputs and outputs int64/float32")
            dims = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in t.shape.dim]
            rows.append((v.name, _TRITON_TYPES[t.elem_type], dims))
        return rows

    inits = {i.name for i in model.graph.initializer}
    meta = {p.key: p.value for p in model.metadata_props}
    return table(v for v in model.graph.input if v.name not in inits), table(model.graph.output), meta


def _tensor_block(key: str, rows: list[tuple[str, str, list[int]]]) -> list[str]:
    lines = [f"{key} ["]
    for i, (name, dtype, dims) in enumerate(rows):
        lines += ["  {",
                  f'    name: "{name}"',
                  f"    data_type: {dtype}",
                  f"    dims: [ {', '.join(str(d) for d in dims)} ]",
                  "  }" + ("," if i < len(rows) - 1 else "")]
    return lines + ["]"]


def model_config(name: str, graph: str, inputs, outputs, instance_kind: str = "KIND_CPU",
                 instance_count: int = 1, gpus: Iterable[int] = ()) -> str:
    """The ``config.pbtxt`` text of one model (protobuf text format of Triton's ModelConfig)."""
    lines = [f"# Written by gamexport: the GAM {graph} graph on Triton's ONNX Runtime backend."]
    lines += [f"# {line}" for line in _NOTES[graph]]
    lines += ["# Batch is an explicit dimension of every tensor (-1 = dynamic), hence max_batch_size 0.",
              f'name: "{name}"',
              f'platform: "{PLATFORM}"',
              "max_batch_size: 0"]
    lines += _tensor_block("input", inputs)
    lines += _tensor_block("output", outputs)
    group = ["instance_group [", "  {", f"    count: {instance_count}", f"    kind: {instance_kind}"]
    gpus = list(gpus)
    if gpus:
        group.append(f"    gpus: [ {', '.join(str(g) for g in gpus)} ]")
    lines += group + ["  }", "]"]
    return "\n".join(lines) + "\n"


def write_model_repository(build_dir: str | Path, repo_dir: str | Path, *, name_prefix: str = "gam",
                           instance_kind: str = "KIND_CPU", instance_count: int = 1, gpus: Iterable[int] = (),
                           inlined: bool = False) -> dict[str, Path]:
    """Write a Triton model repository for a build folder's prefill and step graphs; returns {model name: folder}.

    ``instance_kind``: KIND_CPU (default), KIND_GPU (needs Triton's GPU build of the ONNX Runtime backend) or
    KIND_AUTO. ``inlined``: serve the ``.inlined.onnx`` twins (for ONNX Runtime builds that predate local
    functions). Other models already in ``repo_dir`` are left alone; ours are replaced atomically.
    """
    build_dir, repo_dir = Path(build_dir), Path(repo_dir)
    if instance_kind not in INSTANCE_KINDS:
        raise GraphError(f"instance kind {instance_kind!r} is not one of {', '.join(INSTANCE_KINDS)}",
                         "use KIND_CPU or KIND_GPU")
    if instance_count < 1:
        raise GraphError(f"instance count must be at least 1, got {instance_count}", "pass a positive count")
    gpus = list(gpus)
    if gpus and instance_kind == "KIND_CPU":
        raise GraphError("gpus can only be listed for KIND_GPU or KIND_AUTO instance groups",
                         "drop gpus or use KIND_GPU")
    if repo_dir.exists() and not repo_dir.is_dir():
        raise OutputError(f"{repo_dir} is a file, not a folder", "pass a folder for the model repository")
    suffix = ".inlined" if inlined else ""
    sources = {graph: build_dir / f"{stem}{suffix}.onnx" for graph, stem in GRAPHS.items()}
    for path in sources.values():
        if not path.is_file():
            raise GraphError(f"{path} does not exist", "pass a folder written by gamexport build")
    written: dict[str, Path] = {}
    try:
        repo_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {repo_dir}: {exc.strerror or exc}",
                          "choose a folder you can write to") from exc
    for graph, source in sources.items():
        name = f"{name_prefix}_{graph}"
        inputs, outputs, _meta = _io(source)
        target = repo_dir / name
        staging = repo_dir / f".{name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            atomic_write_bytes(staging / VERSION / MODEL_FILE, source.read_bytes())
            atomic_write_text(staging / "config.pbtxt",
                              model_config(name, graph, inputs, outputs, instance_kind, instance_count, gpus))
            replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written[name] = target
    return written


__all__ = ["PLATFORM", "model_config", "write_model_repository"]
