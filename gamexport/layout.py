"""The vocabulary of a build folder: precisions, runtimes, graph kinds, and the path of every file in it.

One owner for each of these words, so that every room of gamexport (the builder, the pipeline, the engines,
parity, the bench, the Triton bundle, the CLI) spells them the same way. Adding a precision is a change here
(its name, what writes it, its weight bytes) plus the room that computes it. No imports beyond the standard
library: the torch-free re-check and the edge-box runner read this module too.

A build folder (``gamexport build --out DIR``)::

    manifest.json                 every file below with its size and sha256 (MANIFEST)
    report.json, report.md        parity and latency (REPORT_JSON, REPORT_MD), latency.png (LATENCY_PLOT)
    config.json, tokenizer.json   the model's configuration and tokenizer, heldout.txt (HELD_OUT)
    model.onnx, step.onnx         prefill and step graphs, fp32, with local functions (graph_file)
    model.fp16.onnx, …            the same at each other precision
    model.inlined.onnx, …         each graph's inlined twin (no local functions)
    model.ort, step.ort, …        ONNX Runtime's pre-optimized format for edge boxes (ort_file)
    tensorrt/model.fp16.plan, …   TensorRT engines with a .json sidecar each (engine_file)
    parity/                       eager references and feeds, Polygraphy JSON (PARITY_DIR, reference_files)
    genai/, genai-int8-dyn/, …    onnxruntime-genai bundles, one per precision it runs (genai_dir)
"""

from __future__ import annotations

# ---- precisions -------------------------------------------------------------------------------------------------
#: Every precision a build can produce, in the order the CLI, the report and the bench list them.
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-dyn")
#: Written by gamexport's own graph builder (int8-dyn is ONNX Runtime's dynamic quantization of the fp32 graph).
GRAPH_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: Half precisions: fp32 islands (LayerNorm, softmax, the state) inside half-precision weights and activations.
HALF_PRECISIONS = ("fp16", "bf16")
#: Integer precisions, and the one of them that needs calibration text.
QUANTIZED_PRECISIONS = ("int8", "int8-dyn")
CALIBRATED_PRECISIONS = ("int8",)
#: Written by the graph builder but not offered by the build yet: INT4 (ONNX Runtime's MatMulNBits, 4-bit weight
#: blocks; gamexport/graph/int4.py, docs/int4.md). Not in PRECISIONS, so no command accepts it today.
EXPERIMENTAL_PRECISIONS = ("int4",)
#: The precisions whose step graph an onnxruntime-genai bundle is written for: those ONNX Runtime's CPU provider runs
#: (bf16 has no CPU MatMul kernel, so onnxruntime-genai's CPU package cannot open it).
GENAI_PRECISIONS = ("fp32", "fp16", "int8", "int8-dyn")
#: Bytes of one weight at each precision (the bench's weight-streaming arithmetic).
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int8-dyn": 1}

# ---- runtimes, engines, devices ---------------------------------------------------------------------------------
#: What ``--engines`` accepts, and ``--device``.
ENGINES = ("onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")
#: The runtimes a report row names (eager PyTorch is the reference; the others are what gamexport exports to).
RUNTIMES = ("eager", "eager-compile", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt")
#: ONNX Runtime execution provider → report runtime name.
ORT_PROVIDERS = {"CPUExecutionProvider": "onnxruntime-cpu", "CUDAExecutionProvider": "onnxruntime-cuda",
                 "TensorrtExecutionProvider": "onnxruntime-trt"}

# ---- graphs -----------------------------------------------------------------------------------------------------
#: The two graphs of every precision: the prefill graph (a whole prompt) and the streaming step graph.
GRAPHS = ("prefill", "step")
#: File stem of each graph kind.
GRAPH_STEMS = {"prefill": "model", "step": "step"}

# ---- files and folders ------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LATENCY_PLOT = "latency.png"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
HELD_OUT = "heldout.txt"
PARITY_DIR = "parity"
ENGINE_DIR = "tensorrt"
GENAI_DIR = "genai"


def _check(kind: str, precision: str) -> None:
    if kind not in GRAPH_STEMS:
        raise ValueError(f"graph kind {kind!r} is not one of {', '.join(GRAPHS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def _stem(kind: str, precision: str) -> str:
    _check(kind, precision)
    return GRAPH_STEMS[kind] + ("" if precision == "fp32" else f".{precision}")


def graph_file(kind: str, precision: str = "fp32", inlined: bool = False) -> str:
    """``model.onnx``, ``step.fp16.onnx``, ``model.bf16.inlined.onnx``, … (relative to the build folder)."""
    return _stem(kind, precision) + (".inlined" if inlined else "") + ".onnx"


def inlined_twin(name: str) -> str:
    """``model.onnx`` → ``model.inlined.onnx``: the twin the build writes beside every graph."""
    stem = name[:-len(".onnx")] if name.endswith(".onnx") else name
    return stem + ".inlined.onnx"


def ort_file(kind: str, precision: str = "fp32") -> str:
    """``model.ort``, ``step.int8.ort``: ONNX Runtime's pre-optimized format of a graph."""
    return _stem(kind, precision) + ".ort"


def engine_file(kind: str, precision: str = "fp32") -> str:
    """``tensorrt/model.fp16.plan``: a TensorRT engine (its sidecar is the same name + ``.json``)."""
    _check(kind, precision)
    return f"{ENGINE_DIR}/{GRAPH_STEMS[kind]}.{precision}.plan"


def genai_dir(precision: str = "fp32") -> str:
    """``genai`` (fp32) or ``genai-<precision>``: the onnxruntime-genai bundle of one precision's step graph."""
    if precision not in PRECISIONS + EXPERIMENTAL_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return GENAI_DIR if precision == "fp32" else f"{GENAI_DIR}-{precision}"


def reference_files(name: str | None = None) -> dict[str, str]:
    """The Polygraphy JSON files of one reference in ``parity/``: ``{graph kind: path}``. ``None`` is the eager
    fp32 reference (``parity/prefill_outputs.json``); a name is an emulation reference
    (``parity/prefill_outputs.emulation-int8.json``)."""
    infix = "" if name is None else f".{name}"
    return {kind: f"{PARITY_DIR}/{kind}_outputs{infix}.json" for kind in GRAPHS}


def feeds_file(kind: str) -> str:
    """``parity/prefill_inputs.json``: the inputs the references were computed on."""
    _check(kind, "fp32")
    return f"{PARITY_DIR}/{kind}_inputs.json"


#: Which reference rows the saved feeds are (names per graph kind, token count): ``parity/feeds.json``.
FEEDS_INDEX = f"{PARITY_DIR}/feeds.json"


def parse_list(text: str) -> tuple[str, ...]:
    """``"fp32, int8,"`` → ``("fp32", "int8")``: a comma-separated CLI value, empty parts dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())
