"""Quantization with ONNX Runtime's own tools: the ``int8-dyn`` variant (dynamic INT8, MatMulInteger)."""

from __future__ import annotations

from pathlib import Path

from .session import import_ort, session_options


def write_int8_dynamic(src: Path, dst: Path, threads: int | None = None) -> Path:
    """``*.int8-dyn.onnx``: ONNX Runtime's dynamic quantization (int8 weights per channel, MatMulInteger).

    ORT's quantizer skips local-function bodies and only quantizes a MatMul whose weight is an initializer, so
    the source must be the inlined graph, and its ``Transpose(weight)`` nodes are folded first by an offline
    basic-level optimization. CPU only.
    """
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from gamexport.fsutil import atomic_write_bytes

    ort = import_ort()
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        so = session_options(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
        quantized = Path(tmp) / "quantized.onnx"
        import logging
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint at WARNING
        quantize_dynamic(str(folded), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
        model = onnx.load(str(quantized))
    # Keep gamexport's metadata (config, source hash), relabelled with this precision.
    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    meta["gamexport.precision"] = "int8-dyn"
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    atomic_write_bytes(dst, model.SerializeToString(deterministic=True))
    return dst
