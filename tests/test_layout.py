"""The build folder's vocabulary (gamexport/layout.py) spells every file the way the build writes it."""

from __future__ import annotations

import pytest

from gamexport import layout


@pytest.mark.parametrize("kind, precision, inlined, name", [
    ("prefill", "fp32", False, "model.onnx"),
    ("step", "fp32", False, "step.onnx"),
    ("prefill", "fp16", False, "model.fp16.onnx"),
    ("step", "bf16", True, "step.bf16.inlined.onnx"),
    ("prefill", "int8-dyn", False, "model.int8-dyn.onnx"),
])
def test_graph_file(kind, precision, inlined, name):
    assert layout.graph_file(kind, precision, inlined) == name
    if not inlined:
        assert layout.inlined_twin(name) == layout.graph_file(kind, precision, True)


def test_other_paths():
    assert layout.ort_file("step", "int8") == "step.int8.ort"
    assert layout.ort_file("prefill") == "model.ort"
    assert layout.engine_file("prefill", "fp16") == "tensorrt/model.fp16.plan"
    assert layout.engine_file("step") == "tensorrt/step.fp32.plan"
    assert layout.reference_files() == {"prefill": "parity/prefill_outputs.json", "step": "parity/step_outputs.json"}
    assert layout.reference_files("emulation-int8")["step"] == "parity/step_outputs.emulation-int8.json"
    assert layout.feeds_file("step") == "parity/step_inputs.json"


@pytest.mark.parametrize("kind, precision", [("decode", "fp32"), ("prefill", "fp8"), ("step", "")])
def test_unknown_words_are_refused(kind, precision):
    with pytest.raises(ValueError):
        layout.graph_file(kind, precision)


def test_precision_sets_are_consistent():
    assert set(layout.GRAPH_PRECISIONS) < set(layout.PRECISIONS)
    for group in (layout.HALF_PRECISIONS, layout.QUANTIZED_PRECISIONS, layout.CALIBRATED_PRECISIONS):
        assert set(group) <= set(layout.PRECISIONS)
    assert set(layout.WEIGHT_BYTES) == set(layout.PRECISIONS)
    assert set(layout.ORT_PROVIDERS.values()) <= set(layout.RUNTIMES)
    for record in layout.PRECISION_TABLE.values():
        assert record.writer in ("builder", "ort-dynamic") and record.weight_bytes > 0
        assert not record.calibrated or record.quantized
        assert not (record.half and record.quantized)
    with pytest.raises(ValueError, match="not one of"):
        layout.precision("int3")


def test_the_report_schema_speaks_the_vocabulary():
    """report.schema.json (the published contract of report.json) names exactly the vocabulary's precisions and
    runtimes, and every emulation reference parity writes: a precision added to one and not the other fails here."""
    from gamexport.parity.emulation import REFERENCES
    from gamexport.report import schema

    defs = schema()["$defs"]
    assert defs["precision"]["enum"] == list(layout.PRECISIONS)
    assert defs["runtime"]["enum"] == list(layout.RUNTIMES)
    assert set(REFERENCES) <= set(defs["parity_row"]["properties"]["reference"]["enum"])


def test_parse_list():
    assert layout.parse_list(" fp32, int8,, ") == ("fp32", "int8")
    assert layout.parse_list("") == ()


def test_layout_is_dependency_free():
    """The edge-box path imports it: nothing beyond the standard library (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, gamexport.layout; bad = [m for m in ('numpy', 'onnx', 'torch', 'onnxruntime') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
