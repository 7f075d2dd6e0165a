"""ONNX Runtime for a build folder's ``model.onnx`` (prefill) and ``step.onnx`` (streaming chunks).

Rooms: ``session`` (session options, loading on one provider, the optimized graph's compute label, the ORT
format, per-block outputs), ``quantize`` (the dynamic INT8 variant) and ``runner`` (``OrtRunner``). Import the
names from here. Imports numpy and onnxruntime only — never torch — so a build folder runs on a small box.
"""

from __future__ import annotations

from .quantize import write_int8_dynamic
from .runner import OrtRunner
from .session import (INT8_COMPUTE, INT8_MATMULS, QDQ_REFERENCE, RUNTIMES, block_outputs, compute_label, import_ort,
                      load_session, optimized_matmul_ops, session_options, write_ort_format)


__all__ = ["OrtRunner", "INT8_COMPUTE", "INT8_MATMULS", "QDQ_REFERENCE", "RUNTIMES", "block_outputs", "compute_label",
           "import_ort", "load_session", "optimized_matmul_ops", "session_options", "write_int8_dynamic",
           "write_ort_format"]
