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
    step.prepacked.onnx, .data    ONNX Runtime's optimized step graph with weights packed for the build's CPU,
    step.prepacked.json           and the machine it is valid for: gamexport generate's fast start (PREPACKED_FILES)
    tensorrt/model.fp16.plan, …   TensorRT engines with a .json sidecar each (engine_file)
    parity/                       eager references and feeds, Polygraphy JSON (PARITY_DIR, reference_files)
    genai/, genai-int8-dyn/, …    onnxruntime-genai bundles, one per precision it runs (genai_dir)
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- precisions -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """What every room needs to know of one precision. The rooms read these facts; none of them tests a
    precision's name. Adding a precision is a record here plus the room that computes it (its graph writer, and
    its gate and emulation in ``gamexport.parity``)."""

    name: str
    #: bytes of one weight (the bench's weight-streaming arithmetic; block scales included)
    weight_bytes: float
    #: "builder": gamexport's own graph builder writes it; "ort-dynamic": ONNX Runtime's ``quantize_dynamic`` of the
    #: fp32 graph (engines.ort)
    writer: str = "builder"
    #: half precision: fp32 islands (LayerNorm, softmax, the state) inside half-precision weights and activations
    half: bool = False
    #: integer weights
    quantized: bool = False
    #: needs calibration text (static activation scales)
    calibrated: bool = False
    #: activation scales measured on each call's whole tensor: a chunked run computes other numbers than a prefill
    runtime_scales: bool = False
    #: also written in ONNX Runtime's .ort format: the CPU-provider precisions an edge box runs
    ort_format: bool = False
    #: the ONNX Runtime contrib operators (com.microsoft) the graphs use, which no other runtime parses; None: none
    contrib_ops: str | None = None


#: Every precision a build can produce, in the order the CLI, the report and the bench list them.
PRECISION_TABLE: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", 4, ort_format=True),
    Precision("fp16", 2, half=True),
    Precision("bf16", 2, half=True),
    Precision("int8", 1, quantized=True, calibrated=True, ort_format=True),
    Precision("int8-dyn", 1, writer="ort-dynamic", quantized=True, runtime_scales=True, ort_format=True),
    # 4-bit blocks of 32 with one fp32 scale each (0.5 + 4/32 bytes a weight); the head's 8-bit blocks are more
    Precision("int4", 0.625, quantized=True, ort_format=True, contrib_ops="MatMulNBits"),
)}
PRECISIONS = tuple(PRECISION_TABLE)
#: Written by gamexport's own graph builder (int8-dyn is ONNX Runtime's dynamic quantization of the fp32 graph).
GRAPH_PRECISIONS = tuple(p.name for p in PRECISION_TABLE.values() if p.writer == "builder")
HALF_PRECISIONS = tuple(p.name for p in PRECISION_TABLE.values() if p.half)
QUANTIZED_PRECISIONS = tuple(p.name for p in PRECISION_TABLE.values() if p.quantized)
CALIBRATED_PRECISIONS = tuple(p.name for p in PRECISION_TABLE.values() if p.calibrated)
#: Precisions whose activation scales are taken per call (chunked rows differ from the prefill's by design).
RUNTIME_SCALED_PRECISIONS = tuple(p.name for p in PRECISION_TABLE.values() if p.runtime_scales)
ORT_FORMAT_PRECISIONS = tuple(p.name for p in PRECISION_TABLE.values() if p.ort_format)
#: Bytes of one weight at each precision (the bench's weight-streaming arithmetic).
WEIGHT_BYTES = {p.name: p.weight_bytes for p in PRECISION_TABLE.values()}


def precision(name: str) -> Precision:
    """The record of ``name``; ValueError names the precisions there are."""
    try:
        return PRECISION_TABLE[name]
    except KeyError:
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}") from None


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
#: The fp32 step graph as ONNX Runtime's CPU provider optimized it, its weights packed for one CPU
#: (``engines.ort.write_prepacked``); the sidecar names the ONNX Runtime version and CPU it is valid for.
PREPACKED_STEP = "step.prepacked.onnx"
PREPACKED_DATA = "step.prepacked.data"
PREPACKED_MACHINE = "step.prepacked.json"
PREPACKED_FILES = (PREPACKED_STEP, PREPACKED_DATA, PREPACKED_MACHINE)


def is_prepacked(name: str) -> bool:
    """Whether a graph file name is the prepacked step graph (loaded with ONNX Runtime's optimizations off)."""
    return name == PREPACKED_STEP


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
    if precision not in PRECISIONS:
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
