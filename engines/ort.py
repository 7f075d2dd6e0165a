"""ONNX Runtime runner for a build folder's ``model.onnx`` (prefill) and ``step.onnx`` (streaming chunks).

Imports numpy and onnxruntime only — never torch — so a build folder runs on a small box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gamexport.config import CONV_STATE, INPUT_IDS, POSITION_IDS, GAMConfig
from gamexport.errors import GamexportError, GraphError
from gamexport.runtime import Runner

PROVIDERS = {"onnxruntime-cpu": "CPUExecutionProvider"}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise GamexportError("onnxruntime is not installed",
                             "pip install 'gamexport[cpu]' (or [gpu] on an NVIDIA machine, never both)") from exc
    return onnxruntime


def session_options(threads: int | None):
    ort = _import_ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def load_session(path: Path, threads: int | None, provider: str = "CPUExecutionProvider"):
    ort = _import_ort()
    if not Path(path).is_file():
        raise GraphError(f"{path} does not exist", "run gamexport build first, or pass the build folder")
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=[provider])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, …)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise GraphError(f"ONNX Runtime cannot load {path}: {first}",
                         "the file is corrupt or from an incompatible gamexport; rebuild it") from exc


class OrtRunner(Runner):
    """Runs the prefill and step graphs with ONNX Runtime's CPU provider."""

    runtime = "onnxruntime-cpu"

    def __init__(self, model_path: str | Path, step_path: str | Path, config: GAMConfig,
                 threads: int | None = None):
        super().__init__(config)
        self.model_path, self.step_path = Path(model_path), Path(step_path)
        self.prefill_session = load_session(self.model_path, threads)
        self.step_session = load_session(self.step_path, threads)

    @classmethod
    def from_folder(cls, folder: str | Path, threads: int | None = None, inlined: bool = False) -> "OrtRunner":
        """A runner over a build folder; the config is read from the graph's metadata."""
        from gamexport.graph import read_graph_config

        folder = Path(folder)
        suffix = ".inlined" if inlined else ""
        model_path = folder / f"model{suffix}.onnx"
        cfg, _ = read_graph_config(model_path)
        return cls(model_path, folder / f"step{suffix}.onnx", cfg, threads)

    def _prefill(self, ids):
        logits, state = self.prefill_session.run(None, {INPUT_IDS: ids})
        return logits, state

    def _step(self, ids, position_ids, state):
        logits, new_state = self.step_session.run(None, {INPUT_IDS: ids, POSITION_IDS: position_ids,
                                                         CONV_STATE: state})
        return logits, new_state

    def close(self) -> None:
        self.prefill_session = self.step_session = None
