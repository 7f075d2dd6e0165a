"""``gamexport build``: checkpoint → ONNX graphs → parity → latency → report, into a folder, atomically.

The build works in a staging folder beside the output and moves it into place only when it is complete and
every parity check passed, so the output folder holds the previous good build or the new one, never a mix.
A failed build keeps its staging folder as ``<out>.failed`` for diagnosis and says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gamexport.bench.limits import BUILD_LIMITS, annotate_latency, limits_summary, measure_limits
from gamexport.checkpoint import CONFIG_NAME, TOKENIZER_NAME, Checkpoint
from gamexport.config import GAMConfig
from gamexport.errors import GamexportError, NothingCheckedError, OutputError, ParityError
from gamexport.fsutil import atomic_write_json, atomic_write_text, dumps_json, removable_lock, replace_dir
from gamexport.manifest import write_manifest
# localise_divergence and run_chunks are re-exported for tests that import them from here (test_build, test_trt).
from gamexport.parity.engine import localise_divergence  # noqa: F401
from gamexport.parity.metrics import run_chunks  # noqa: F401
from gamexport.parity.references import held_out, held_out_ids, split_calibration, write_parity_references
from gamexport.sources import demo_folder, resolve_source, seeded_checkpoint
from gamexport.targets import UNSUPPORTED

STAGES = ("load", "export", "check", "parity", "latency", "report", "commit")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-dyn")
GRAPH_PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # written by gamexport's own builder
ENGINES = ("onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")

Progress = Callable[[str], None]


@dataclass
class BuildOptions:
    source: str | None = None      # checkpoint file/folder; None: the embedded default
    out: Path = Path("gamexport-build")
    preset: str | None = None      # seeded weights of this preset when no source is given
    threads: int | None = None     # ONNX Runtime and torch intra-op threads (None: all cores)
    latency: bool = True
    latency_runs: int = 20
    prefill_lengths: tuple[int, ...] = ()  # batch-1 prefill lengths to time; () = (min(256, P),)
    precisions: tuple[str, ...] = ("fp32",)  # graph precisions to write; fp32 is always built
    engines: tuple[str, ...] = ("onnxruntime",)
    device: str = "cpu"
    trt_profile: dict | None = None   # {"min": "1x1", "opt": "1x256", "max": "8x256"} for TensorRT
    cuda_graph: bool = False          # TensorRT decode steps replay CUDA graphs (TrtRunner(cuda_graph=True))
    triton: Path | None = None        # also write a Triton model repository here (fp32)
    progress: Progress = field(default=lambda msg: None)


@dataclass
class BuildResult:
    out: Path
    report: dict
    passed: bool


# ---- sources ------------------------------------------------------------------------------------------------
def is_trained(ckpt: Checkpoint) -> bool:
    return bool(ckpt.meta.get("trained", True))


# ---- output folder handling ---------------------------------------------------------------------------------
def check_destinations(opts: BuildOptions) -> tuple[Path, Path | None]:
    """Check every place the build will write, before it changes anything; returns (out, triton) resolved.

    ``--out`` must be new, empty or a previous build, ``OUT.failed`` (where a failing build keeps its output)
    the same, and ``--triton`` new, empty or a model repository whose gamexport models may be replaced; none
    of them may be, hold or lie inside the source or each other (``gamexport.destinations``).
    """
    from gamexport.destinations import ABSENT, BUILD, EMPTY, check_folder, classify

    source = opts.source if opts.source is not None else (demo_folder() if opts.preset is None else None)
    out = check_folder(opts.out, BUILD, guards={"the source": source})
    failed = out.with_name(out.name + ".failed")
    if classify(failed) not in (ABSENT, EMPTY, BUILD):
        raise OutputError(f"{failed} holds files that are not a gamexport build, and a failing build would put "
                          "its output there", "move it away, or pass another --out")
    triton = None
    if opts.triton is not None:
        from gamexport.engines.triton import GRAPHS, check_repository

        triton = check_repository(opts.triton, [f"gam_{graph}" for graph in GRAPHS],
                                  {"the source": source, "--out": out, "--out's failed-build folder": failed})
    return out, triton


@contextmanager
def locked_staging(out: Path) -> Iterator[Path]:
    """Hold ``.<out>.lock`` and yield a fresh staging folder beside ``out``; stale ones are removed first.

    The lock file is deleted when the build ends (``fsutil.removable_lock``); only a killed build leaves it,
    empty, and the next build takes it over and deletes it.
    """
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} is a file, not a folder", "pass --out a folder path")

    def busy() -> None:
        raise OutputError(f"another gamexport build is writing {out}", "wait for it to finish or choose another --out")

    with contextlib.ExitStack() as held:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(removable_lock(out.parent / f".{out.name}.lock", busy))
        except OSError as exc:
            raise OutputError(f"cannot write beside {out}: {exc.strerror or exc}",
                              "choose an output folder you can write to") from exc
        for stale in out.parent.glob(f".{out.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = out.parent / f".{out.name}.staging-{os.getpid()}"
        try:
            staging.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot create {staging}: {exc.strerror or exc}",
                              "choose an output folder you can write to") from exc
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _pause_hook(stage: str) -> None:
    """Test-only: GAMEXPORT_TEST_PAUSE_AT=<stage> makes the build announce and wait at that stage."""
    if os.environ.get("GAMEXPORT_TEST_PAUSE_AT") != stage:
        return
    marker = os.environ.get("GAMEXPORT_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(stage)
    time.sleep(float(os.environ.get("GAMEXPORT_TEST_PAUSE_SECONDS", "60")))


# ---- parity (gamexport/parity/: the engine, the references, the rows) -------------------------------------------
def parity_checks(ckpt: Checkpoint, eager, ort_runners: dict[str, Callable[[], object]], progress: Progress,
                  text_ids: np.ndarray | None = None) -> tuple[list[dict], object]:
    """The build's fp32 rows as report dicts (``gamexport.parity.engine.fp32_parity``); kept for tests/zoo.py."""
    from gamexport.parity.engine import fp32_parity

    rows, kept = fp32_parity(ckpt, eager, ort_runners, progress, text_ids)
    return [row.to_dict() for row in rows], kept


def variant_parity_checks(ckpt: Checkpoint, eager, runner, progress: Progress, text_ids: np.ndarray | None = None,
                          emulate: dict | None = None, threads: int | None = None) -> list[dict]:
    """A reduced-precision runner's rows as report dicts (``run_parity`` against a ``PrecisionReference``);
    kept for tests/zoo.py, tests/test_trt.py and tests/test_runners.py."""
    from gamexport.parity.engine import PrecisionReference, run_parity

    reference = PrecisionReference.for_build(ckpt, eager, text_ids, emulate)
    return [row.to_dict() for row in run_parity(runner, reference, progress, threads)]


# ---- latency ------------------------------------------------------------------------------------------------
def check_precisions(precisions: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        from gamexport.errors import InputError
        raise InputError(f"unknown precision {unknown[0]!r}", f"choose from {', '.join(PRECISIONS)}")
    return tuple(p for p in PRECISIONS if p == "fp32" or p in precisions)


def check_prefill_lengths(cfg: GAMConfig, lengths: tuple[int, ...]) -> tuple[int, ...]:
    from gamexport.errors import InputError

    for T in lengths:
        if not 1 <= T <= cfg.max_positions:
            raise InputError(f"prefill length {T} is outside 1..{cfg.max_positions}",
                             f"choose lengths within the model's {cfg.max_positions} positions")
    return lengths or (min(256, cfg.max_positions),)


def build_limits(cfg: GAMConfig, matrix, threads: int | None, progress: Progress) -> dict:
    """The machine's limits as ``gamexport bench`` defines them, measured in the build's own run (fewer runs)."""
    cpu_precisions = tuple(p for runtime, p in matrix if runtime == "onnxruntime-cpu") or ("fp32",)
    return measure_limits(cfg, cpu_precisions, threads or 1, BUILD_LIMITS, progress)


def latency_rows(eager, ort_runners: list, cfg: GAMConfig, threads: int | None, runs: int,
                 progress: Progress, prefill_lengths: tuple[int, ...] = ()) -> list[dict]:
    """Batch-1 prefill at each length (default min(256, P)) and per-token decode with state, for eager and
    ONNX Runtime in one run; ``speedup_vs_eager`` compares rows of the same mode and length. Report dicts of
    ``gamexport.parity.rows.LatencyRow``."""
    from gamexport.bench import measure, measure_decode
    from gamexport.parity.rows import LatencyRow

    lengths = check_prefill_lengths(cfg, prefill_lengths)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, cfg.max_positions), dtype=np.int64)
    rows = []
    for runner in (eager, *ort_runners):
        runner.check_finite = False  # time the backend alone, the same work on every row (parity checked outputs)
        for T in lengths:
            progress(f"latency: {runner.runtime} {runner.precision} prefill, batch 1 × {T} tokens")
            timing = measure(lambda: runner.prefill(ids[:, :T]), warmup=2, runs=runs)
            rows.append(LatencyRow(runner.runtime, runner.precision, "prefill", 1, T, timing.as_dict(), threads))
        progress(f"latency: {runner.runtime} {runner.precision} decode, one token per step with state")
        n = min(64, cfg.max_positions - 1)
        state = {"s": runner.prefill(ids[:, :1])[1]}

        def one(pos: int, runner=runner, state=state) -> None:
            state["s"] = runner.step(ids[:, pos:pos + 1], np.array([[pos]], np.int64), state["s"])[1]

        timing = measure_decode(one, range(1, 1 + n))
        rows.append(LatencyRow(runner.runtime, runner.precision, "decode", 1, 1, timing.as_dict(), threads))
    base = {(r.mode, r.seq_len): r.p50_ms for r in rows if r.runtime == "eager"}
    for r in rows:
        r.speedup_vs_eager = base[(r.mode, r.seq_len)] / r.p50_ms
    return [r.to_dict() for r in rows]


def plan_matrix(precisions: tuple[str, ...], engines: tuple[str, ...], device: str,
                cuda_graph: bool = False) -> tuple[list, list[dict]]:
    """The (runtime, precision) pairs this build runs, and ``skipped`` rows for the rest (with reasons).

    Asking for what this machine cannot have at all — a GPU that is not there, TensorRT that is not installed,
    TensorRT on the CPU — is an error in one line, raised before any work.
    """
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
    if cuda_graph and "tensorrt" not in engines:
        raise InputError("--cuda-graph applies to TensorRT's decode steps, and no TensorRT engine was asked for",
                         "add --engines tensorrt --device cuda, or drop --cuda-graph")
    skipped = [{"runtime": "eager-compile", "reason": "torch.compile takes minutes to compile on CPU; "
                "measured by the benchmark command, not by build"}]
    if device == "cuda":
        from gamexport.device import cuda_status

        usable, why = cuda_status()
        if not usable:
            raise InputError(f"--device cuda needs an NVIDIA GPU, but {why}",
                             "run on a machine with a GPU, or use --device cpu")
    else:
        skipped += [{"runtime": r, "reason": "not requested: pass --device cuda (and --engines tensorrt) on an "
                     "NVIDIA GPU"} for r in ("onnxruntime-cuda", "onnxruntime-trt", "tensorrt")]
    if "tensorrt" in engines:
        from gamexport.engines.trt import import_tensorrt

        import_tensorrt()  # one line with the install command when missing
    runtimes = []
    if "onnxruntime" in engines:
        runtimes.append("onnxruntime-cuda" if device == "cuda" else "onnxruntime-cpu")
    if "tensorrt" in engines:
        runtimes.append("tensorrt")
    pairs = []
    for runtime in runtimes:
        for precision in precisions:
            reason = UNSUPPORTED.get((runtime, precision))
            if reason:
                skipped.append({"runtime": runtime, "precision": precision, "reason": reason})
            else:
                pairs.append((runtime, precision))
    return pairs, skipped


def trt_profiles(cfg: GAMConfig, given: dict | None) -> dict | None:
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


#: Skipped (runtime, precision) pairs whose graphs are still checked, by a structural run on that runtime (never
#: timed): the bf16 graphs with bf16 weights upcast to fp32 and bf16 casts made fp32 (engines.ort.upcast_bf16).
STRUCTURAL = (("onnxruntime-cpu", "bf16"),)


def structural_runs(skipped: list[dict]) -> list[tuple[str, str]]:
    """The skipped pairs that get a structural run (:data:`STRUCTURAL`)."""
    return [(s["runtime"], s["precision"]) for s in skipped if (s["runtime"], s.get("precision")) in STRUCTURAL]


def open_variant_runner(staging: Path, cfg: GAMConfig, runtime: str, precision: str, threads: int | None,
                        trt_profile: dict | None, say: Progress, cuda_graph: bool = False, structural: bool = False):
    """A runner for one (runtime, precision) of the matrix over the staged graphs (TensorRT: builds engines);
    ``structural``: the structural run of a skipped pair (:data:`STRUCTURAL`)."""
    from gamexport.engines.ort import OrtRunner
    from gamexport.graph.builder import graph_file_name

    if structural:
        from gamexport.engines.ort import bf16_structural_runner

        return bf16_structural_runner(staging / graph_file_name("prefill", precision),
                                      staging / graph_file_name("step", precision), cfg, threads)
    if runtime == "tensorrt":
        from gamexport.engines.trt import TrtRunner, build_engines

        say(f"      tensorrt: building {precision} engines (prefill and step)")
        build_engines(staging, cfg, profiles=trt_profiles(cfg, trt_profile), precision=precision,
                      progress=lambda m: say("      " + m))
        return TrtRunner.from_folder(staging, precision=precision, cuda_graph=cuda_graph)
    provider = {"onnxruntime-cpu": "CPUExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider"}[runtime]
    return OrtRunner(staging / graph_file_name("prefill", precision), staging / graph_file_name("step", precision),
                     cfg, threads, precision=precision, provider=provider)


# ---- report and manifest ------------------------------------------------------------------------------------
def write_plot(latency: list[dict], path: Path) -> bool:
    """Bar chart of p50 latency per runtime for prefill and decode; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import io

    modes = ["prefill", "decode"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, mode in zip(axes, modes):
        rows = [r for r in latency if r["mode"] == mode]
        names = [f"{r['runtime']}\n{r['precision']}" for r in rows]
        values = [r["p50_ms"] for r in rows]
        errs = [[r["p50_ms"] - r.get("min_ms", r["p50_ms"]) for r in rows],
                [r["p90_ms"] - r["p50_ms"] for r in rows]]
        ax.bar(names, values, yerr=errs, color=["#888888", "#2a7ab9", "#d9822b", "#3a9a4a"][: len(rows)])
        if rows:
            ax.set_title(f"{mode}: batch {rows[0]['batch']} × {rows[0]['seq_len']} tokens")
        ax.set_ylabel("p50 ms (bars: min..p90)")
    fig.suptitle("gamexport build latency (lower is better)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    from gamexport.fsutil import atomic_write_bytes
    atomic_write_bytes(path, buf.getvalue())
    return True




# ---- the build ----------------------------------------------------------------------------------------------
def build(opts: BuildOptions) -> BuildResult:
    """Run the whole build; raises ``ParityError`` (after keeping diagnostics) when a parity check fails."""
    from gamexport.bench import machine_info
    from gamexport.engines.eager import EagerRunner
    from gamexport.engines.ort import OrtRunner
    from gamexport.graph import export_graphs
    from gamexport.graph.builder import graph_file_name
    from gamexport.graph.checks import check_graph_file
    from gamexport.parity import mark_calibration_scored, verdict
    from gamexport.parity.emulation import emulators, write_emulation_references
    from gamexport.parity.engine import PrecisionReference, fp32_parity, run_parity
    from gamexport.report import build_report, parity_failure, render_markdown

    say = opts.progress
    out, triton = check_destinations(opts)
    threads = opts.threads or os.cpu_count()
    t_start = time.perf_counter()

    def stage(i: int, text: str) -> None:
        _pause_hook(STAGES[i])
        say(f"[{i + 1}/{len(STAGES)}] {text}  ({time.perf_counter() - t_start:.1f}s)")

    stage(0, "loading weights")
    ckpt = resolve_source(opts.source, opts.preset)
    cfg = ckpt.config
    check_prefill_lengths(cfg, opts.prefill_lengths)
    precisions = check_precisions(opts.precisions)
    matrix, skipped = plan_matrix(precisions, tuple(opts.engines), opts.device, opts.cuda_graph)
    if any(runtime == "tensorrt" for runtime, _ in matrix):
        trt_profiles(cfg, opts.trt_profile)  # a malformed profile fails now, not after the export
    say(f"      {ckpt.source}: {cfg.n_params():,} parameters"
        + ("" if is_trained(ckpt) else " (untrained seeded weights)"))
    with locked_staging(out) as staging:
        stage(1, f"exporting ONNX graphs to {out}")
        text_ids = held_out_ids(ckpt)
        if text_ids is not None:
            say(f"      real text: {text_ids.shape[0]} × {text_ids.shape[1]} held-out tokens")
        calib_ids, eval_ids = split_calibration(text_ids, cfg)
        calibration = None
        if "int8" in precisions:
            from gamexport.calibration import calibrate

            calibration = calibrate(cfg, ckpt.weights, [calib_ids])
            atomic_write_json(staging / "calibration.json", {
                "source": ("held-out text, the first half of its rows (the INT8 gate uses the other half)"
                           if held_out(text_ids) else "held-out text, its only row: too little to hold any out, "
                           "so the INT8 rows are scored on this calibration text and are informational"
                           if text_ids is not None else "random token ids: no tokenizer and held-out text, so the "
                           "INT8 gate is informational"),
                "rows": int(calib_ids.shape[0]), "tokens_per_row": int(calib_ids.shape[1]),
                "method": "max |activation|, symmetric, zero point 0", "amax": calibration})
        written = export_graphs(cfg, ckpt.weights, staging, ckpt.sha256,
                                tuple(p for p in precisions if p in GRAPH_PRECISIONS), calibration)
        if "int8-dyn" in precisions:
            from gamexport.engines.ort import write_int8_dynamic

            for kind in ("model", "step"):
                path = write_int8_dynamic(staging / f"{kind}.inlined.onnx", staging / f"{kind}.int8-dyn.onnx")
                written[path.name] = path
        from gamexport.engines.ort import write_ort_format

        for precision in ("fp32", "int8", "int8-dyn"):  # the CPU-provider precisions an edge box runs
            if precision in precisions:
                for kind in ("prefill", "step"):
                    for path in write_ort_format(staging / graph_file_name(kind, precision), staging):
                        written[path.name] = path
        artifacts = sorted(written)
        atomic_write_json(staging / CONFIG_NAME, {**ckpt.meta, **cfg.to_dict(),
                                                  "source": {"path": ckpt.source, "sha256": ckpt.sha256}})
        if ckpt.tokenizer_path is not None:
            shutil.copyfile(ckpt.tokenizer_path, staging / TOKENIZER_NAME)

        stage(2, "checking graphs (onnx checker, structure, ONNX Runtime load)")
        graph_checks = []
        for name in artifacts:
            if not name.endswith(".onnx"):
                continue  # .ort files are checked by running them (parity)
            precision = name.split(".")[1] if name.count(".") > 1 and name.split(".")[1] in PRECISIONS else "fp32"
            if precision == "int8-dyn":
                from gamexport.graph.checks import check_int8_dynamic_file

                check_int8_dynamic_file(staging / name, cfg)
                checks = ["onnx.checker full_check", f"every weight MatMul quantized ({5 * cfg.n_layers + 1} "
                          "MatMulInteger)"]
            else:
                check_graph_file(staging / name, cfg, precision)
                checks = ["onnx.checker full_check", "structure (functions, opset, I/O)",
                          "precision plan (MatMul types, fp32 islands)",
                          "function scope (no callee name in a caller's scope: TensorRT binds by name)"]
            graph_checks.append({"artifact": name, "precision": precision, "checks": checks, "passed": True})

        progress = lambda m: say("      " + m)  # noqa: E731
        # The machine's limits for the latency rows, measured now, before any model runner is open: the limits'
        # own weight matrices (as many bytes as the model) would otherwise add to the build's peak memory.
        limits = build_limits(cfg, matrix, threads, progress) if opts.latency else None

        stage(3, "parity against eager PyTorch and the float64 reference")
        eager = EagerRunner(cfg, ckpt.weights, threads=threads)
        # The fp32 graphs always run on ONNX Runtime's CPU provider, with functions and inlined, in full detail.
        ort_runners = {
            artifact: (lambda m=m, st=st: OrtRunner(staging / m, staging / st, cfg, threads))
            for artifact, m, st in (("functions", "model.onnx", "step.onnx"),
                                    ("inlined", "model.inlined.onnx", "step.inlined.onnx"),
                                    ("ort-format", "model.ort", "step.ort"))}
        parity, fp32_runner = fp32_parity(ckpt, eager, ort_runners, progress, text_ids)
        reference = PrecisionReference.for_build(ckpt, eager, eval_ids, emulators(ckpt, precisions, calibration))
        variants = []
        for runtime, precision in matrix:
            if (runtime, precision) == ("onnxruntime-cpu", "fp32"):
                continue
            variants.append(open_variant_runner(staging, cfg, runtime, precision, threads, opts.trt_profile, say,
                                                opts.cuda_graph))
            parity += run_parity(variants[-1], reference, progress, threads)
        for runtime, precision in structural_runs(skipped):  # checked, not timed
            runner = open_variant_runner(staging, cfg, runtime, precision, threads, None, say, structural=True)
            try:
                parity += run_parity(runner, reference, progress, threads)
            finally:
                runner.close()
        if not held_out(text_ids):  # the text also calibrated INT8: its INT8 rows are not a held-out gate
            parity = [mark_calibration_scored(r) for r in parity]
        # informational rows are never counted as passed
        counted = verdict([r.to_dict() for r in parity], skipped, precisions)
        if counted.gated == 0:
            raise NothingCheckedError(counted.nothing_checked(), "this is a bug in gamexport (its fp32 rows are "
                                      "always gated): rerun with --debug and report it")
        passed = counted.passed
        write_parity_references(staging, eager, cfg, text_ids)
        write_emulation_references(staging, ckpt, precisions, calibration)

        latency: list[dict] = []
        if opts.latency:
            stage(4, f"latency, eager vs every runtime and precision, {threads} threads")
            timed = [fp32_runner] if ("onnxruntime-cpu", "fp32") in matrix else []
            latency = latency_rows(eager, [*timed, *variants], cfg, threads, opts.latency_runs, progress,
                                   opts.prefill_lengths)
            annotate_latency(latency, cfg, limits)
        else:
            stage(4, "latency skipped (--no-latency)")
        for runner in [fp32_runner, *variants]:
            runner.close()

        stage(5, "writing report")
        machine = {**machine_info(threads), **({"limits": limits_summary(limits)} if limits else {})}
        report = build_report(ckpt, is_trained(ckpt), counted, machine, artifacts, graph_checks, parity, latency,
                              skipped)
        atomic_write_text(staging / "report.json", dumps_json(report))
        atomic_write_text(staging / "report.md", render_markdown(report))
        if latency:
            write_plot(latency, staging / "latency.png")
        write_manifest(staging, ckpt)

        if not passed:
            failed_dir = out.with_name(out.name + ".failed")
            shutil.rmtree(failed_dir, ignore_errors=True)
            os.replace(staging, failed_dir)
            raise ParityError(f"{parity_failure(report['parity'])}; {out} was left as it was",
                              f"read {failed_dir / 'report.md'} for the measured differences")
        stage(6, f"moving the finished build into {out}")
        replace_dir(staging, out)
    if opts.triton is not None:
        from gamexport.engines.triton import choose_backend, write_model_repository

        backend, why = choose_backend(out, "fp32")
        models = write_model_repository(out, triton, backend=backend, precision="fp32")
        say(f"      triton: {', '.join(sorted(models))} in {opts.triton} ({why})")
    say(f"done in {time.perf_counter() - t_start:.1f}s: {out}")
    return BuildResult(out=out, report=report, passed=passed)


__all__ = ["BuildOptions", "BuildResult", "build", "resolve_source", "seeded_checkpoint", "STAGES",
           "GamexportError"]
