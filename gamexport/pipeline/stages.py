"""``gamexport build``: checkpoint → ONNX graphs → parity → latency → report, into a folder, atomically.

:func:`build` runs the stages named by :data:`STAGES` in order, each a short function over one :class:`Build`
(the state a build carries from stage to stage): ``load`` the weights and plan the targets, ``export`` the graphs
into a staging folder, ``check`` them, ``bundle`` the step graphs for onnxruntime-genai, ``parity`` against eager
PyTorch, ``latency``, ``report``, ``commit`` (move the staging folder into place, or keep it as ``OUT.failed``). Runners come from ``gamexport.targets``; where the
build writes, and the lock, from :mod:`.folders`.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gamexport.bench.limits import annotate_latency, limits_summary
from gamexport.checkpoint import Checkpoint
from gamexport.errors import NothingCheckedError, ParityError
from gamexport.fsutil import atomic_write_json, atomic_write_text, dumps_json, replace_dir
from gamexport import layout
from gamexport.layout import (CALIBRATED_PRECISIONS, CONFIG, GRAPH_PRECISIONS, GRAPHS, LATENCY_PLOT,
                              ORT_FORMAT_PRECISIONS, PRECISIONS, REPORT_JSON, REPORT_MD, TOKENIZER, graph_file,
                              ort_file)
from gamexport.manifest import write_manifest
from gamexport.parity.references import held_out, held_out_ids, split_calibration, write_parity_references
from gamexport.sources import resolve_source
from gamexport.targets import (BASELINE, CPU_PRECISIONS, REFERENCE, OpenOptions, Plan, check_options, open_files,
                               open_runner, plan)

from .folders import check_destinations, failed_folder, locked_staging, pause_hook
from .latency import build_limits, latency_rows, write_plot
from .options import BuildOptions, BuildResult, check_precisions, check_prefill_lengths

STAGES = ("load", "export", "check", "bundle", "parity", "latency", "report", "commit")
#: Why the build writes no eager-compile rows.
EAGER_COMPILE_SKIP = {"runtime": "eager-compile", "reason": "torch.compile takes minutes to compile on CPU; "
                      "measured by the benchmark command, not by build"}


def is_trained(ckpt: Checkpoint) -> bool:
    return bool(ckpt.meta.get("trained", True))


@dataclass
class Build:
    """What one build carries from stage to stage; each stage fills in its part."""

    opts: BuildOptions
    out: Path
    triton: Path | None
    threads: int
    started: float = field(default_factory=time.perf_counter)
    ckpt: Checkpoint | None = None
    precisions: tuple[str, ...] = ()
    plan: Plan | None = None
    skipped: list[dict] = field(default_factory=list)
    staging: Path | None = None
    text_ids: np.ndarray | None = None   # held-out text (None: no tokenizer or text)
    eval_ids: np.ndarray | None = None   # the part of it that scores INT8 (the rest calibrates)
    calibration: dict | None = None
    artifacts: list[str] = field(default_factory=list)
    bundles: list[str] = field(default_factory=list)  # onnxruntime-genai bundle folders written (genai, genai-int8…)
    genai: list[dict] = field(default_factory=list)  # each bundle through og.Generator vs gamexport's greedy decode
    graph_checks: list[dict] = field(default_factory=list)
    limits: dict | None = None
    eager: object = None
    runners: list = field(default_factory=list)  # open runners: the fp32 baseline first, then the plan's others
    parity: list = field(default_factory=list)
    counted: object = None
    latency: list[dict] = field(default_factory=list)
    report: dict | None = None

    @property
    def cfg(self):
        return self.ckpt.config

    @property
    def options(self) -> OpenOptions:
        return OpenOptions(self.threads, self.opts.trt_profile, self.opts.cuda_graph, self.opts.progress)

    def say(self, msg: str) -> None:
        self.opts.progress(msg)

    def progress(self, msg: str) -> None:
        """A detail line, indented under its stage."""
        self.opts.progress("      " + msg)

    def stage(self, name: str, text: str) -> None:
        i = STAGES.index(name)
        pause_hook(name)
        self.say(f"[{i + 1}/{len(STAGES)}] {text}  ({time.perf_counter() - self.started:.1f}s)")

    def close_runners(self) -> None:
        for runner in self.runners:
            runner.close()
        self.runners = []


# ---- load -----------------------------------------------------------------------------------------------------
def load(b: Build) -> None:
    """The weights, the precisions and the targets to run; every option is checked here, before any work."""
    b.stage("load", "loading weights")
    b.ckpt = resolve_source(b.opts.source, b.opts.preset)
    check_prefill_lengths(b.cfg, b.opts.prefill_lengths)
    b.precisions = check_precisions(b.opts.precisions)
    b.plan = plan(b.precisions, tuple(b.opts.engines), b.opts.device, cuda_graph=b.opts.cuda_graph)
    b.skipped = [EAGER_COMPILE_SKIP, *b.plan.elsewhere, *b.plan.skipped]
    check_options(b.plan.targets, b.cfg, b.options)  # a malformed TensorRT profile fails now, not after the export
    b.say(f"      {b.ckpt.source}: {b.cfg.n_params():,} parameters"
          + ("" if is_trained(b.ckpt) else " (untrained seeded weights)"))


# ---- export ---------------------------------------------------------------------------------------------------
def export(b: Build) -> None:
    """Every graph of every precision into the staging folder, with the config and the tokenizer."""
    from gamexport.graph import export_graphs

    b.stage("export", f"exporting ONNX graphs to {b.out}")
    b.text_ids = held_out_ids(b.ckpt)
    if b.text_ids is not None:
        b.say(f"      real text: {b.text_ids.shape[0]} × {b.text_ids.shape[1]} held-out tokens")
    calib_ids, b.eval_ids = split_calibration(b.text_ids, b.cfg)
    if any(p in CALIBRATED_PRECISIONS for p in b.precisions):
        calibrate(b, calib_ids)
    written = export_graphs(b.cfg, b.ckpt.weights, b.staging, b.ckpt.sha256,
                            tuple(p for p in b.precisions if p in GRAPH_PRECISIONS), b.calibration, b.opts.int4)
    written.update(write_runtime_formats(b))
    b.artifacts = sorted(written)
    atomic_write_json(b.staging / CONFIG, {**b.ckpt.meta, **b.cfg.to_dict(),
                                           "source": {"path": b.ckpt.source, "sha256": b.ckpt.sha256}})
    if b.ckpt.tokenizer_path is not None:
        shutil.copyfile(b.ckpt.tokenizer_path, b.staging / TOKENIZER)


def calibrate(b: Build, calib_ids: np.ndarray) -> None:
    """INT8's activation ranges, from the calibration half of the held-out text; ``calibration.json`` says which."""
    from gamexport.calibration import calibrate as measure_ranges

    text_ids = b.text_ids
    b.calibration = measure_ranges(b.cfg, b.ckpt.weights, [calib_ids])
    atomic_write_json(b.staging / "calibration.json", {
        "source": ("held-out text, the first half of its rows (the INT8 gate uses the other half)"
                   if held_out(text_ids) else "held-out text, its only row: too little to hold any out, "
                   "so the INT8 rows are scored on this calibration text and are informational"
                   if text_ids is not None else "random token ids: no tokenizer and held-out text, so the "
                   "INT8 gate is informational"),
        "rows": int(calib_ids.shape[0]), "tokens_per_row": int(calib_ids.shape[1]),
        "method": "max |activation|, symmetric, zero point 0", "amax": b.calibration})


def write_runtime_formats(b: Build) -> dict[str, Path]:
    """ONNX Runtime's own files: the dynamic INT8 graphs (quantized from the inlined fp32 graphs), the .ort
    format of the CPU-provider precisions, and (unless ``--no-prepacked``) the fp32 step graph pre-packed for this
    machine's CPU (``layout.PREPACKED_FILES``)."""
    from gamexport.engines.ort import write_int8_dynamic, write_ort_format

    written = {}
    for precision in b.precisions:
        if layout.precision(precision).writer == "ort-dynamic":
            for kind in GRAPHS:
                path = write_int8_dynamic(b.staging / graph_file(kind, inlined=True),
                                          b.staging / graph_file(kind, precision))
                written[path.name] = path
    for precision in ORT_FORMAT_PRECISIONS:
        if precision in b.precisions:
            for kind in GRAPHS:
                for path in write_ort_format(b.staging / graph_file(kind, precision), b.staging):
                    written[path.name] = path
    if b.opts.prepacked:   # what gamexport generate opens on this machine: the fp32 step graph, pre-packed
        from gamexport.engines.ort import write_prepacked

        paths = write_prepacked(b.staging / graph_file("step"), b.staging, b.threads)
        if not paths:
            b.progress("      no prepacked step graph: this machine's instruction sets cannot be read")
        for path in paths:
            written[path.name] = path
    return written


# ---- check ----------------------------------------------------------------------------------------------------
def check(b: Build) -> None:
    """Every .onnx file through the checker and gamexport's structural checks (.ort files and the prepacked step
    graph, ONNX Runtime's own, are checked by running them, in parity)."""
    b.stage("check", "checking graphs (onnx checker, structure, ONNX Runtime load)")
    for name in b.artifacts:
        if name.endswith(".onnx") and not layout.is_prepacked(name):  # ORT's own graph: checked by running it
            b.graph_checks.append(check_graph(b, name))


def check_graph(b: Build, name: str) -> dict:
    from gamexport.graph.checks import check_graph_file, check_int8_dynamic_file

    parts = name.split(".")
    precision = parts[1] if len(parts) > 2 and parts[1] in PRECISIONS else "fp32"
    if layout.precision(precision).writer == "ort-dynamic":
        check_int8_dynamic_file(b.staging / name, b.cfg)
        checks = ["onnx.checker full_check", f"every weight MatMul quantized ({5 * b.cfg.n_layers + 1} "
                  "MatMulInteger)"]
    else:
        check_graph_file(b.staging / name, b.cfg, precision)
        checks = ["onnx.checker full_check", "structure (functions, opset, I/O)",
                  "precision plan (MatMul types, fp32 islands)",
                  "function scope (no callee name in a caller's scope: TensorRT binds by name)"]
    return {"artifact": name, "precision": precision, "checks": checks, "passed": True}


# ---- bundle ---------------------------------------------------------------------------------------------------
def bundle(b: Build) -> None:
    """An onnxruntime-genai bundle (``genai/``, ``genai-<precision>/``) for each precision it runs, in the staging
    folder (so the manifest lists its files). A step graph without the per-layer state convention gets none, and
    the stage says why in one line (``write_bundle``'s refusal: the graph is read once); the build goes on."""
    from gamexport.bundles.genai import BundleError, write_bundle

    b.stage("bundle", "onnxruntime-genai bundles")
    for precision in (p for p in b.precisions if p in CPU_PRECISIONS):
        try:
            b.bundles.append(write_bundle(b.staging, precision).name)
        except BundleError as refused:
            b.progress(f"genai: no bundle written: {refused.message}")
            return
    b.progress(f"genai: {', '.join(f'{name}/' for name in b.bundles)}" if b.bundles else "genai: no precision to bundle")


def measure_machine(b: Build) -> None:
    """The machine's limits for the latency rows, measured before any model runner is open: the limits' own
    weight matrices (as many bytes as the model) would otherwise add to the build's peak memory."""
    if b.opts.latency:
        b.limits = build_limits(b.cfg, b.plan.pairs, b.threads, b.progress)


# ---- parity ---------------------------------------------------------------------------------------------------
def parity(b: Build) -> None:
    """Every planned runner against eager PyTorch (fp32) or the precision's reference; the verdict."""
    from gamexport.parity import mark_calibration_scored, verdict
    from gamexport.parity.emulation import emulators, write_emulation_references
    from gamexport.parity.engine import PrecisionReference, fp32_parity, run_parity

    from .genai import genai_parity

    b.stage("parity", "parity against eager PyTorch and the float64 reference")
    b.eager = open_runner(REFERENCE, "fp32", None, b.cfg, b.options, checkpoint=b.ckpt)
    b.parity, baseline = fp32_parity(b.ckpt, b.eager, fp32_artifacts(b), b.progress, b.text_ids)
    b.runners = [baseline]
    emulate = emulators(b.ckpt, b.precisions, b.calibration, b.opts.int4)
    reference = PrecisionReference.for_build(b.ckpt, b.eager, b.eval_ids, emulate)
    for runtime, precision in b.plan.pairs:
        if (runtime, precision) != BASELINE:  # checked above, artifact by artifact
            b.runners.append(open_runner(runtime, precision, b.staging, b.cfg, b.options))
            b.parity += run_parity(b.runners[-1], reference, b.progress, b.threads)
    for runtime, precision in b.plan.structural:  # checked, not timed
        runner = open_runner(runtime, precision, b.staging, b.cfg, b.options, structural=True)
        try:
            b.parity += run_parity(runner, reference, b.progress, b.threads)
        finally:
            runner.close()
    b.genai = genai_parity(b)
    if not held_out(b.text_ids):  # the text also calibrated INT8: its INT8 rows are not a held-out gate
        b.parity = [mark_calibration_scored(r) for r in b.parity]
    # informational rows are never counted as passed
    b.counted = verdict([r.to_dict() for r in b.parity] + [g for g in b.genai if "skipped" not in g], b.skipped,
                        b.precisions)
    if b.counted.gated == 0:
        raise NothingCheckedError(b.counted.nothing_checked(), "this is a bug in gamexport (its fp32 rows are "
                                  "always gated): rerun with --debug and report it")
    write_parity_references(b.staging, b.eager, b.cfg, b.text_ids)
    write_emulation_references(b.staging, emulate, b.cfg.n_layers)


def fp32_artifacts(b: Build) -> dict:
    """Openers of the baseline's runner over each fp32 artifact: with functions, inlined, the .ort format, and the
    prepacked step graph alone (as ``gamexport generate`` runs it: prefill as a chunk of the step graph)."""
    runtime, _ = BASELINE
    files = {"functions": (graph_file("prefill"), graph_file("step")),
             "inlined": (graph_file("prefill", inlined=True), graph_file("step", inlined=True)),
             "ort-format": (ort_file("prefill"), ort_file("step"))}
    if layout.PREPACKED_STEP in b.artifacts:
        files["prepacked"] = (None, layout.PREPACKED_STEP)
    return {artifact: (lambda m=m, st=st: open_files(runtime, m and b.staging / m, b.staging / st, b.cfg,
                                                     b.options))
            for artifact, (m, st) in files.items()}


# ---- latency --------------------------------------------------------------------------------------------------
def latency(b: Build) -> None:
    """Eager and every planned runner timed in this run (the baseline's runner only when the plan has it)."""
    if b.opts.latency:
        b.stage("latency", f"latency, eager vs every runtime and precision, {b.threads} threads")
        baseline, *others = b.runners
        timed = [baseline] if BASELINE in b.plan.pairs else []
        b.latency = latency_rows(b.eager, [*timed, *others], b.cfg, b.threads, b.opts.latency_runs, b.progress,
                                 b.opts.prefill_lengths)
        annotate_latency(b.latency, b.cfg, b.limits)
    else:
        b.stage("latency", "latency skipped (--no-latency)")
    b.close_runners()


# ---- report ---------------------------------------------------------------------------------------------------
def report(b: Build) -> None:
    """report.json, report.md, the latency plot and the manifest, in the staging folder."""
    from gamexport.machine import machine_info
    from gamexport.report import build_report, graph_sizes, render_markdown

    b.stage("report", "writing report")
    machine = {**machine_info(b.threads), **({"limits": limits_summary(b.limits)} if b.limits else {})}
    b.report = build_report(b.ckpt, is_trained(b.ckpt), b.counted, machine, b.artifacts, b.graph_checks, b.parity,
                            b.latency, b.skipped, graph_sizes(b.staging, b.precisions))
    if b.genai:
        b.report["genai"] = b.genai
    atomic_write_text(b.staging / REPORT_JSON, dumps_json(b.report))
    atomic_write_text(b.staging / REPORT_MD, render_markdown(b.report))
    if b.latency:
        write_plot(b.latency, b.staging / LATENCY_PLOT)
    write_manifest(b.staging, b.ckpt)


# ---- commit ---------------------------------------------------------------------------------------------------
def commit(b: Build) -> None:
    """Move the finished build into ``--out``; a failed one becomes ``OUT.failed`` and the build raises."""
    from gamexport.report import checked_rows, parity_failure

    if not b.counted.passed:
        failed_dir = failed_folder(b.out)
        shutil.rmtree(failed_dir, ignore_errors=True)
        os.replace(b.staging, failed_dir)
        raise ParityError(f"{parity_failure(checked_rows(b.report))}; {b.out} was left as it was",
                          f"read {failed_dir / REPORT_MD} for the measured differences")
    b.stage("commit", f"moving the finished build into {b.out}")
    replace_dir(b.staging, b.out)


def write_bundles(b: Build) -> None:
    """The Triton model repository (--triton), from the committed build."""
    from gamexport.bundles.triton import choose_backend, write_model_repository

    backend, why = choose_backend(b.out, "fp32")
    models = write_model_repository(b.out, b.triton, backend=backend, precision="fp32")
    b.say(f"      triton: {', '.join(sorted(models))} in {b.opts.triton} ({why})")


# ---- the build ------------------------------------------------------------------------------------------------
def build(opts: BuildOptions) -> BuildResult:
    """Run the whole build; raises ``ParityError`` (after keeping diagnostics) when a parity check fails."""
    out, triton = check_destinations(opts)
    b = Build(opts, out, triton, opts.threads or os.cpu_count())
    load(b)
    with locked_staging(out) as b.staging:
        try:
            export(b)
            check(b)
            bundle(b)
            measure_machine(b)
            parity(b)
            latency(b)
        finally:
            b.close_runners()
        report(b)
        commit(b)
    if opts.triton is not None:
        write_bundles(b)
    b.say(f"done in {time.perf_counter() - b.started:.1f}s: {out}")
    return BuildResult(out=out, report=b.report, passed=b.counted.passed)


# ---- the parity stage's rows as report dicts (tests/zoo.py, tests/test_trt_*.py, tests/test_runners.py) --------
def parity_checks(ckpt: Checkpoint, eager, ort_runners: dict, progress, text_ids: np.ndarray | None = None
                  ) -> tuple[list[dict], object]:
    """The build's fp32 rows as report dicts (``gamexport.parity.engine.fp32_parity``)."""
    from gamexport.parity.engine import fp32_parity

    rows, kept = fp32_parity(ckpt, eager, ort_runners, progress, text_ids)
    return [row.to_dict() for row in rows], kept


def variant_parity_checks(ckpt: Checkpoint, eager, runner, progress, text_ids: np.ndarray | None = None,
                          emulate: dict | None = None, threads: int | None = None) -> list[dict]:
    """A reduced-precision runner's rows as report dicts (``run_parity`` against a ``PrecisionReference``)."""
    from gamexport.parity.engine import PrecisionReference, run_parity

    reference = PrecisionReference.for_build(ckpt, eager, text_ids, emulate)
    return [row.to_dict() for row in run_parity(runner, reference, progress, threads)]
