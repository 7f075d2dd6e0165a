"""The targets a build, a re-check or a bench runs on: one registry, one planner, one opener.

A target is one runtime on one device: eager PyTorch (the reference), ONNX Runtime on the CPU or on CUDA, or
TensorRT. Each says which ``--engines`` value asks for it, which precisions it cannot run (and why, in the words
a skipped report row gives), which of those it still checks by a structural run, and how to open a runner over a
build folder. :func:`plan` turns what a command asked for into the (runtime, precision) pairs to run plus the
skipped rows; :func:`open_runner` opens the runner of one pair. The build (``gamexport.pipeline``), the re-check
(``gamexport parity``) and the bench (``gamexport.bench.runtimes``) all ask here: a new runtime is one more
:class:`Target` and its opener, nowhere else.

This module imports only the vocabulary at import time; each opener imports its engine when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from gamexport.layout import DEVICES, ENGINES, PRECISION_TABLE, graph_file

Progress = Callable[[str], None]


@dataclass(frozen=True)
class OpenOptions:
    """What a command passes to every opener: intra-op threads, the TensorRT prefill profile (--min/--opt/--max,
    None: the defaults), CUDA-graph decode steps (TensorRT) and where progress lines go."""

    threads: int | None = None
    trt_profile: dict | None = None
    cuda_graph: bool = False
    say: Progress = field(default=lambda msg: None)


#: ``opener(target, precision, folder, cfg, options, checkpoint)`` → a Runner.
Opener = Callable[["Target", str, Path, object, OpenOptions, object], object]


@dataclass(frozen=True)
class Target:
    """One runtime on one device, and what it can run.

    ``engine``: the ``--engines`` value that asks for it (None: never asked for by the build — eager PyTorch is the
    reference, ONNX Runtime's TensorRT provider is listed but not run); ``unsupported``: precision → why this
    target cannot run it; ``structural``: unsupported precisions whose graphs are still checked on this target by
    a structural run (never timed); ``opener`` opens a Runner (:data:`Opener`), ``files_opener`` one over two named
    graph files;
    ``missing()``: why it is not installed here (None: it is); ``cuda_graph``: it can replay decode steps from
    CUDA graphs; ``opening``: what a progress line says while it opens, when that is slow; ``may_fail``: a
    failure to run it is a skipped row starting with this text, not a bug (torch.compile needs a C++ toolchain).
    """

    runtime: str
    device: str
    engine: str | None = None
    unsupported: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    structural: tuple[str, ...] = ()
    opener: Opener | None = None
    structural_opener: Opener | None = None
    files_opener: Callable | None = None
    missing: Callable[[], str | None] = lambda: None
    check: Callable[[object, OpenOptions], None] = lambda cfg, options: None
    cuda_graph: bool = False
    opening: str | None = None
    may_fail: str | None = None

    def why_not(self, precision: str) -> str | None:
        """Why this target cannot run ``precision`` (None: it can)."""
        return self.unsupported.get(precision)


# ---- openers (each imports its engine when it runs) -----------------------------------------------------------
def _graphs(folder: Path, precision: str) -> tuple[Path, Path]:
    return folder / graph_file("prefill", precision), folder / graph_file("step", precision)


def _open_eager(target: Target, precision: str, folder: Path, cfg, options: OpenOptions, ckpt):
    """Eager PyTorch (compiled for ``eager-compile``) on a checkpoint's weights; ``folder`` is not read."""
    from gamexport.engines.eager import EagerRunner

    return EagerRunner(ckpt.config, ckpt.weights, threads=options.threads,
                       compile=target.runtime == "eager-compile")


def _ort_opener(provider: str) -> Opener:
    def open_ort(target: Target, precision: str, folder: Path, cfg, options: OpenOptions, ckpt=None):
        """ONNX Runtime on ``provider`` over the folder's graphs of ``precision``."""
        return _ort_files(provider)(*_graphs(folder, precision), cfg, options, precision)

    return open_ort


def _ort_files(provider: str):
    def open_files(model_path: Path, step_path: Path, cfg, options: OpenOptions, precision: str):
        """ONNX Runtime on ``provider`` over two named graph files (.onnx or .ort)."""
        from gamexport.engines.ort import OrtRunner

        return OrtRunner(model_path, step_path, cfg, options.threads, precision=precision, provider=provider)

    return open_files


def _open_bf16_structural(target: Target, precision: str, folder: Path, cfg, options: OpenOptions, ckpt=None):
    """The bf16 graphs with bf16 weights upcast to fp32 and bf16 casts made fp32 (engines.ort.upcast_bf16)."""
    from gamexport.engines.ort import bf16_structural_runner

    return bf16_structural_runner(*_graphs(folder, precision), cfg, options.threads)


def trt_profiles(cfg, given: dict | None) -> dict | None:
    """--min/--opt/--max BATCHxSEQ shape the prefill profile; the step profile keeps its chunk range (1..P,
    opt 1 = decode) and takes the same batch bounds."""
    if not given:
        return None
    from gamexport.engines.trt import default_profile, make_profile

    prefill = make_profile(cfg, "prefill", given)
    step = default_profile(cfg, "step")
    return {"prefill": prefill, "step": {"min": f"{prefill.min[0]}x{step.min[1]}",
                                         "opt": f"{prefill.opt[0]}x{step.opt[1]}",
                                         "max": f"{prefill.max[0]}x{step.max[1]}"}}


def _open_trt(target: Target, precision: str, folder: Path, cfg, options: OpenOptions, ckpt=None):
    """TensorRT: builds the prefill and step engines of ``precision`` into ``folder/tensorrt/``, then runs them."""
    from gamexport.engines.trt import TrtRunner, build_engines

    say = options.say
    say(f"      tensorrt: building {precision} engines (prefill and step)")
    build_engines(folder, cfg, profiles=trt_profiles(cfg, options.trt_profile), precision=precision,
                  progress=lambda m: say("      " + m))
    return TrtRunner.from_folder(folder, precision=precision, cuda_graph=options.cuda_graph)


def _check_trt(cfg, options: OpenOptions) -> None:
    trt_profiles(cfg, options.trt_profile)  # a malformed profile fails before any work


# ---- what is installed ----------------------------------------------------------------------------------------
_ORT_CPU_BUILD = "onnxruntime-gpu is not installed (this onnxruntime is the CPU build)"


def _provider_missing(provider: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        try:
            import onnxruntime as ort
            providers = ort.get_available_providers()
        except ImportError:
            providers = []
        return None if provider in providers else _ORT_CPU_BUILD

    return missing


def _tensorrt_missing() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("tensorrt") is not None else "tensorrt is not installed"


# ---- the registry ---------------------------------------------------------------------------------------------
_CPU_BF16 = ("ONNX Runtime's CPU provider has no bf16 kernels (MatMul, Add, Sigmoid); the bf16 graphs are for CUDA "
             "and TensorRT and are checked here structurally")


def _refused(why: Callable) -> Mapping[str, str]:
    """{precision: reason} for every precision of the vocabulary that ``why(record)`` gives a reason for."""
    return MappingProxyType({p.name: r for p in PRECISION_TABLE.values() if (r := why(p))})


def _cuda_ort_refuses(p) -> str | None:
    if p.writer == "ort-dynamic":
        return "dynamic quantization (MatMulInteger) is a CPU-provider format"
    return None


def _tensorrt_refuses(p) -> str | None:
    if p.writer == "ort-dynamic":
        return f"TensorRT takes explicit Q/DQ (int8), not MatMulInteger ({p.name})"
    if p.contrib_ops:
        return f"TensorRT's ONNX parser has no {p.contrib_ops} (an ONNX Runtime contrib operator)"
    return None


#: Every target, in the order a plan runs and a report lists them.
TARGETS: dict[str, Target] = {t.runtime: t for t in (
    Target("eager", "cpu", opener=_open_eager),
    Target("eager-compile", "cpu", opener=_open_eager,
           opening="compile: torch.compile of prefill and step (slow on CPU; compiled on the first calls)",
           may_fail="torch.compile failed"),
    Target("onnxruntime-cpu", "cpu", "onnxruntime", MappingProxyType({"bf16": _CPU_BF16}), structural=("bf16",),
           opener=_ort_opener("CPUExecutionProvider"), structural_opener=_open_bf16_structural,
           files_opener=_ort_files("CPUExecutionProvider")),
    Target("onnxruntime-cuda", "cuda", "onnxruntime", _refused(_cuda_ort_refuses),
           opener=_ort_opener("CUDAExecutionProvider"), files_opener=_ort_files("CUDAExecutionProvider"),
           missing=_provider_missing("CUDAExecutionProvider")),
    Target("onnxruntime-trt", "cuda", missing=_provider_missing("TensorrtExecutionProvider")),
    Target("tensorrt", "cuda", "tensorrt", _refused(_tensorrt_refuses), opener=_open_trt, missing=_tensorrt_missing,
           check=_check_trt, cuda_graph=True),
)}

#: The reference every parity row is measured against, and the pair the build checks in full detail (each fp32
#: artifact: with functions, inlined, .ort) and times from that same runner.
REFERENCE = "eager"
BASELINE = ("onnxruntime-cpu", "fp32")

#: (runtime, precision) pairs that cannot run, and why (derived from :data:`TARGETS`).
UNSUPPORTED = {(t.runtime, p): why for t in TARGETS.values() for p, why in t.unsupported.items()}
#: The precisions ONNX Runtime's CPU provider computes (what the bench times by default).
CPU_PRECISIONS = tuple(p for p in PRECISION_TABLE if ("onnxruntime-cpu", p) not in UNSUPPORTED)


# ---- the plan -------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a command runs: ``pairs`` (runtime, precision) in order; ``skipped`` report rows for the asked-for
    runtimes' precisions that are not run; ``elsewhere`` rows for the targets of another device; ``structural``
    the skipped pairs still checked by a structural run."""

    pairs: list[tuple[str, str]]
    skipped: list[dict]
    elsewhere: list[dict]
    structural: list[tuple[str, str]]

    @property
    def targets(self) -> list[Target]:
        """The targets of ``pairs``, each once, in order."""
        return [TARGETS[r] for r in dict.fromkeys(runtime for runtime, _ in self.pairs)]


def _not_asked(target: Target) -> str:
    return "not requested: pass --device cuda (and --engines tensorrt) on an NVIDIA GPU"


def choose(engines: tuple[str, ...], device: str, cuda_graph: bool = False) -> list[Target]:
    """The targets ``--engines`` and ``--device`` ask for. Asking for what this machine cannot have at all — a GPU
    that is not there, TensorRT that is not installed, TensorRT on the CPU — is an error in one line, raised
    before any work."""
    from gamexport.errors import InputError

    for engine in engines:
        if engine not in ENGINES:
            raise InputError(f"unknown engine {engine!r}", f"choose from {', '.join(ENGINES)}")
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}", f"choose from {', '.join(DEVICES)}")
    if not engines:
        raise InputError("no engine given", "pass --engines onnxruntime (or tensorrt on an NVIDIA GPU)")
    if "tensorrt" in engines and device != "cuda":
        raise InputError("TensorRT runs on NVIDIA GPUs only", "add --device cuda (on a machine with a GPU)")
    chosen = [t for t in TARGETS.values() if t.engine in engines and t.device == device]
    if cuda_graph and not any(t.cuda_graph for t in chosen):
        raise InputError("--cuda-graph applies to TensorRT's decode steps, and no TensorRT engine was asked for",
                         "add --engines tensorrt --device cuda, or drop --cuda-graph")
    if device == "cuda":
        from gamexport.device import cuda_status

        usable, why = cuda_status()
        if not usable:
            raise InputError(f"--device cuda needs an NVIDIA GPU, but {why}",
                             "run on a machine with a GPU, or use --device cpu")
    if "tensorrt" in engines:
        from gamexport.engines.trt import import_tensorrt

        import_tensorrt()  # one line with the install command when missing
    return chosen


def plan(precisions: tuple[str, ...], engines: tuple[str, ...] = ("onnxruntime",), device: str = "cpu", *,
         cuda_graph: bool = False, listed: tuple[str, ...] | None = None,
         elsewhere: Callable[[Target], str] = _not_asked) -> Plan:
    """The pairs to run and the rows of what is not run, for ``precisions`` on the targets :func:`choose` picks.

    ``listed``: the precisions to account for (default ``precisions``); a listed precision that was not asked
    for gets a "not requested" row. ``elsewhere(target)``: the reason a target of another device is not run —
    those rows are only written on a CPU run (a GPU run does not list the CPU targets).
    """
    chosen = choose(tuple(engines), device, cuda_graph)
    pairs, skipped, structural = [], [], []
    for target in chosen:
        for precision in (precisions if listed is None else listed):
            reason = target.why_not(precision)
            if reason is None and precision not in precisions:
                reason = "not requested (--precision)"
            if reason is not None:
                skipped.append({"runtime": target.runtime, "precision": precision, "reason": reason})
            else:
                pairs.append((target.runtime, precision))
            if reason is not None and precision in target.structural and precision in precisions:
                structural.append((target.runtime, precision))
    others = [] if device != "cpu" else [t for t in TARGETS.values() if t.device != device]
    return Plan(pairs, skipped, [{"runtime": t.runtime, "reason": elsewhere(t)} for t in others], structural)


def check_options(targets: list[Target], cfg, options: OpenOptions) -> None:
    """Refuse options the planned targets would refuse when opened (a malformed TensorRT profile), before any
    work."""
    for target in targets:
        target.check(cfg, options)


# ---- the opener -----------------------------------------------------------------------------------------------
def open_runner(runtime: str, precision: str, folder: Path | None, cfg, options: OpenOptions = OpenOptions(),
                structural: bool = False, checkpoint=None):
    """The runner of one (runtime, precision) of a plan over the graphs in ``folder`` (model config ``cfg``);
    eager PyTorch runs the ``checkpoint``'s weights instead. ``structural``: the structural run of a skipped pair
    (``Plan.structural``). TensorRT builds its engines into ``folder`` first."""
    target = TARGETS[runtime]
    opener = target.structural_opener if structural else target.opener
    if opener is None:
        raise ValueError(f"gamexport does not open {runtime!r} runners" + (" structurally" if structural else ""))
    return opener(target, precision, Path(folder) if folder is not None else None, cfg, options, checkpoint)


def open_files(runtime: str, model_path: Path, step_path: Path, cfg, options: OpenOptions = OpenOptions(),
               precision: str = "fp32"):
    """A graph runtime's runner over two named files: the build's fp32 artifacts (``model.onnx``,
    ``model.inlined.onnx``, ``model.ort`` and their step graphs)."""
    target = TARGETS[runtime]
    if target.files_opener is None:
        raise ValueError(f"{runtime!r} does not run named graph files")
    return target.files_opener(model_path, step_path, cfg, options, precision)
