"""Export GAM and the issue-5 baselines through ``torch.onnx.export`` and time them in ONNX Runtime and eager.

This is the like-for-like latency comparison of issue 5: all three architectures go through the same generic
exporter (not gamexport's hand-built GAM graph, ``gamexport.graph.builder``), so their ONNX Runtime timings
differ by architecture, not by how much care went into each graph. The graph is a prefill: ``input_ids`` int64
(batch, sequence) → ``logits`` float32 (batch, sequence, V), with dynamic batch and sequence axes.

Exporter choice. torch 2.13's ``torch.onnx.export`` defaults to the dynamo (``torch.export``) exporter. Tried on
these models offline, it worked for GAM and the Transformer but specialised Mamba's sequence axis to the
example length (the scan's padding to a multiple of its chunk, ``(-T) % 8``, and the reshape that follows
become shape guards), so the graph refused any other length; it was also 5-20× slower (6-60 s per tiny model,
against 0.5-3 s). The TorchScript exporter (``dynamo=False``) exports all three with truly dynamic axes in
about a second and matches eager to ~1e-7 (``tests/test_baselines.py`` checks this at several shapes), so it
is used here; its deprecation warning is silenced.

Heavy imports (onnx, onnxruntime) happen inside the functions.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from gamexport.config import INPUT_IDS, LOGITS
from gamexport.errors import InputError
from gamexport.fsutil import atomic_write_bytes

DEFAULT_OPSET = 18

#: Metadata keys written into the exported file.
META_ARCHITECTURE = "gamexport.architecture"
META_MODEL_CONFIG = "gamexport.model_config"


class _LogitsOnly(nn.Module):
    """``model(idx) -> (logits, loss)`` as a graph with one output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


def _max_positions(model: nn.Module) -> int | None:
    """Longest sequence the model accepts: its position table's size, or None (Mamba) when it has none."""
    pos = getattr(model, "pos_embedding", None)
    return pos.num_embeddings if isinstance(pos, nn.Embedding) else None


def _example_ids(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Random token ids from a private generator (the global RNG is left alone)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen, dtype=torch.long)


def _check_seq_len(model: nn.Module, seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise InputError(f"seq_len must be a positive integer, got {seq_len!r}", "pass a length of 1 or more")
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        raise InputError(f"seq_len {seq_len} exceeds the model's {limit} learned positions",
                         f"use a length of at most {limit}")


def export_onnx(model: nn.Module, path: str | Path, seq_len: int, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model``'s prefill graph (GAM, TransformerLM or MambaLM) to ``path`` atomically; return the path.

    The model is traced in eval mode (dropout off) on a (2, seq_len) example and its training flag restored
    afterwards. The example batch is 2, not 1, so that nothing in the trace can treat the batch axis as a
    broadcastable 1. ``seq_len`` only shapes the example: the exported sequence axis is dynamic (up to the
    model's positions for GAM and the Transformer; unbounded for Mamba). The file is serialised in memory and
    written with ``gamexport.fsutil.atomic_write_bytes``, so a reader never sees a partial graph (in-memory
    serialisation limits the graph to protobuf's 2 GB, far above these models).
    """
    import onnx

    _check_seq_len(model, seq_len)
    config = model.config
    ids = _example_ids(config.vocab_size, 2, seq_len)
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*feature will be removed.*")
            torch.onnx.export(
                _LogitsOnly(model), (ids,), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_IDS], output_names=[LOGITS],
                dynamic_axes={INPUT_IDS: {0: "batch", 1: "sequence"}, LOGITS: {0: "batch", 1: "sequence"}})
    finally:
        model.train(was_training)

    proto = onnx.load_from_string(buffer.getvalue())
    architecture = getattr(config, "architecture", "gam")
    for key, value in ((META_ARCHITECTURE, architecture),
                       (META_MODEL_CONFIG, json.dumps(config.to_dict(), sort_keys=True))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return atomic_write_bytes(path, proto.SerializeToString())


def _timing_dict(timing, batch: int, seq_len: int, threads: int, backend: str) -> dict:
    out = timing.as_dict()
    out.update(median_ms=out["p50_ms"], batch=batch, seq_len=seq_len, threads=threads, backend=backend,
               tokens_per_s=batch * seq_len / (out["p50_ms"] / 1e3) if out["p50_ms"] > 0 else float("inf"))
    return out


def ort_latency(path: str | Path, batch: int, seq_len: int, threads: int = 2, repeats: int = 20,
                warmup: int = 3) -> dict:
    """Prefill latency of an exported graph in ONNX Runtime (CPU, ``threads`` intra-op threads, all graph
    optimisations) on random ids: ``gamexport.bench.timing`` fields (p50_ms, min_ms, ...) plus ``median_ms``,
    ``tokens_per_s`` and the shape. The vocabulary for the random ids is read from the logits' static last axis.
    """
    import numpy as np
    import onnxruntime as ort

    from gamexport.bench.timing import measure

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    vocab = session.get_outputs()[0].shape[-1]
    if not isinstance(vocab, int):
        raise InputError(f"{path}: the logits' vocabulary axis is not static ({vocab!r})",
                         "export the graph with export_onnx")
    ids = np.random.default_rng(0).integers(0, vocab, size=(batch, seq_len), dtype=np.int64)
    feed = {session.get_inputs()[0].name: ids}
    timing = measure(lambda: session.run(None, feed), warmup=warmup, runs=repeats)
    return _timing_dict(timing, batch, seq_len, threads, "onnxruntime")


def torch_latency(model: nn.Module, batch: int, seq_len: int, threads: int = 2, repeats: int = 20,
                  warmup: int = 3) -> dict:
    """Eager prefill latency under ``torch.inference_mode`` with ``threads`` intra-op threads (restored after),
    model in eval mode (its flag restored after); same dict as ``ort_latency``."""
    from gamexport.bench.timing import measure

    _check_seq_len(model, seq_len)
    ids = _example_ids(model.config.vocab_size, batch, seq_len)
    old_threads, was_training = torch.get_num_threads(), model.training
    torch.set_num_threads(threads)
    model.eval()
    try:
        with torch.inference_mode():
            timing = measure(lambda: model(ids), warmup=warmup, runs=repeats)
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
    return _timing_dict(timing, batch, seq_len, threads, "torch")
