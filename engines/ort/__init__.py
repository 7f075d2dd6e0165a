"""ONNX Runtime for a build folder's ``model.onnx`` (prefill) and ``step.onnx`` (streaming chunks).

Rooms: ``session`` (session options, loading on one provider, the optimized graph's compute label, the ORT
format, per-block outputs), ``quantize`` (the dynamic INT8 variant), ``runner`` (``OrtRunner``, and runners over rewritten graphs) and
``transforms`` (graph rewrites for parity references: exact integer MatMuls, bf16 made computable on the CPU). Import the
names from here. Imports numpy and onnxruntime only — never torch — so a build folder runs on a small box.
"""

from __future__ import annotations

from .quantize import write_int8_dynamic
from .runner import BF16_STRUCTURAL, OrtRunner, bf16_structural_runner, exact_int8_dynamic_runner
from .transforms import exact_integer_matmuls, upcast_bf16
from .session import (INT8_COMPUTE, INT8_MATMULS, QDQ_REFERENCE, RUNTIMES, block_outputs, compute_label, import_ort,
                      load_session, optimized_matmul_ops, prepacked_for_this_machine, prepacked_fingerprint,
                      session_options, write_ort_format, write_prepacked)


__all__ = ["OrtRunner", "BF16_STRUCTURAL", "bf16_structural_runner", "exact_int8_dynamic_runner",
           "exact_integer_matmuls", "upcast_bf16", "INT8_COMPUTE", "INT8_MATMULS", "QDQ_REFERENCE", "RUNTIMES", "block_outputs", "compute_label",
           "import_ort", "load_session", "optimized_matmul_ops", "session_options", "write_int8_dynamic",
           "write_ort_format", "write_prepacked", "prepacked_for_this_machine", "prepacked_fingerprint"]
