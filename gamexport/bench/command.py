"""``gamexport bench``: how close each runtime and precision runs to this machine's limits, measured in one run.

The yardstick is not "faster than eager PyTorch" but the fraction of what the machine can do, measured in the same
process with the same threads (``limits``: each limit the best of several kernels, measured at the start and the
end of the run, the higher kept). Each kernel is the median of ≥ 20 runs (fewer with ``quick``). Timings are
benchmarks, never pass/fail: every row carries the harness's spread and ``noisy`` flag (``timing``),
``bench.json`` lists the noisy rows, and ``load`` records the CPU time other processes took during the run.

This module runs the sections in order — limits, ceilings, runtimes (prefill, decode), the goals in paired rounds
(``paired``), start-up, scaling, training, limits again — and writes the result (``output``).
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

from gamexport import __version__
from gamexport.bench.ceilings import ceiling_against_limits, ceiling_decode_fraction, measure_ceilings
from gamexport.bench.flops import flops_per_token, weight_bytes_per_step
from gamexport.bench.limits import (batched_against_limit, best_limits, check_limits, decode_against_limit,
                                    measure_limits, prefill_against_limit, row_label)
from gamexport.bench.options import BenchOptions, check_options
from gamexport.bench.output import BENCH_FILE, SCHEMA_VERSION, render_table, write_plots
from gamexport.bench.runtimes import export_for_bench, runner_plan, runtime_rows
from gamexport.bench.scaling import run_scaling, scaling_lengths
from gamexport.bench.server import PointServer
from gamexport.bench.settings import FULL, QUICK, Effort, Progress
from gamexport.bench.startup import startup_section
from gamexport.bench.steadiness import Probe, say_unsteady
from gamexport.bench.training import run_training
from gamexport.config import GAMConfig

#: What bench.json says about how to read it.
NOTES = [
    "Fractions are achieved ÷ limit, both measured in this run with the same threads.",
    "Each limit is the best of several kernels (limits.*.candidates); a row above 1.0 of its limit marks "
    "that limit invalid (valid: false, beaten_by).",
    "Prefill FLOPs count the head at every position: the prefill and step graphs (and eager PyTorch) "
    "compute logits for every position.",
    "INT8 (static Q/DQ) is calibrated on random token ids: fine for speed, not a statement on accuracy.",
    "Reduced-precision decode rows are measured against the bandwidth and the batched limit over their own "
    "weight bytes (limits.bandwidth_by_precision, limits.batched_by_precision): smaller weights may sit in "
    "cache.",
    "fp16 graphs on ONNX Runtime's CPU provider compute in fp32 (see compute_precision).",
    "Runners are timed through the calls generate makes (no input checks).",
]


def load_source(source: str | None, preset_name: str | None):
    """A Checkpoint from a build folder (weights read back from its fp32 ``model.onnx``), a checkpoint, or the
    seeded weights of a preset (paper by default). Returns (checkpoint, build folder or None)."""
    from gamexport.checkpoint import load_checkpoint
    from gamexport.manifest import MANIFEST_NAME
    from gamexport.sources import checkpoint_from_build, seeded_checkpoint

    if source is None:
        return seeded_checkpoint(preset_name or "paper"), None
    folder = Path(source)
    if folder.is_dir() and (folder / MANIFEST_NAME).is_file():
        return checkpoint_from_build(folder), folder
    return load_checkpoint(source), None


def run_bench(opts: BenchOptions) -> dict:
    """Measure everything, write ``bench.json`` and the plots into ``opts.out``; returns the bench dict."""
    precisions, min_t, max_t = check_options(opts)
    effort = QUICK if opts.quick else FULL
    from gamexport.destinations import BENCH, check_folder

    # Before anything is measured or written: --out is new, empty or an earlier bench folder, never the source.
    out = check_folder(opts.out, BENCH, guards={"the source": opts.source})
    t_start = time.perf_counter()
    # Started first, so that its torch import overlaps this process's own; nothing is timed until it is ready.
    server = PointServer() if "scaling" not in opts.skip or "training" not in opts.skip else None
    try:
        return _run(opts, precisions, min_t, max_t, effort, out, server, t_start)
    finally:
        if server is not None:
            server.close()


def _run(opts: BenchOptions, precisions: tuple[str, ...], min_t: int, max_t: int, effort: Effort, out: Path,
         server: PointServer | None, t_start: float) -> dict:
    """The sections in order: limits, ceilings, runtimes, start-up, scaling, training, the limits again."""
    from gamexport.bench.timing import cpu_seconds, machine_info
    from gamexport.device import cuda_status

    cpu_before, wall_start = cpu_seconds(), time.perf_counter()
    say = opts.progress
    ckpt, build_folder = load_source(opts.source, opts.preset)
    cfg, threads = ckpt.config, opts.threads
    say(f"bench: {ckpt.source}: {cfg.n_params():,} parameters, {threads} threads"
        + (", --quick (smoke run: too few runs to quote)" if opts.quick else ""))
    machine = {**machine_info(threads), "gpu": cuda_status()[1]}
    if server is not None:
        server.ready()
    limits = measure_limits(cfg, precisions, threads, effort, say)
    say("steadiness: probe kernels timed before every section, to see whether the host's speed changes")
    probe = Probe(cfg, threads, effort)
    probe("start")
    pairs, skipped = runner_plan(precisions, opts.compile)
    sections = {"prefill": [], "decode": [], "ceilings": None, "scaling": None, "training": None, "startup": None,
                "paired": None}
    if "ceilings" not in opts.skip:
        sections["ceilings"] = measure_ceilings(cfg, threads, effort, say)
        probe("after ceilings")
    with tempfile.TemporaryDirectory(prefix="gamexport-bench-") as tmp_name:
        _graph_sections(opts, ckpt, build_folder, pairs, limits, effort, Path(tmp_name), sections, skipped, probe)
    if "scaling" not in opts.skip:
        sections["scaling"], more = run_scaling(scaling_lengths(min_t, max_t), threads, effort, say, server)
        skipped += more
        probe("after scaling")
    if "training" not in opts.skip:
        sections["training"], more = run_training(cfg, threads, effort, say, server)
        skipped += more
    probe("end")
    sections["steadiness"] = probe.result()
    probe.close()
    say_unsteady(sections["steadiness"], say, paired=bool(sections.get("paired")))
    if server is not None:
        server.close()  # waited for: its CPU time (and its points') counts as this run's own from here on
    say("limits: measured again at the end of the run (each limit keeps the higher of its two medians)")
    limits = best_limits(limits, measure_limits(cfg, precisions, threads, effort, lambda msg: None))
    load = run_load(cpu_before, cpu_seconds(), time.perf_counter() - wall_start)
    result = bench_result(opts, ckpt, precisions, machine, limits, load, sections, skipped)
    result["elapsed_s"] = time.perf_counter() - t_start
    return write_result(result, out, say)


def _graph_sections(opts: BenchOptions, ckpt, build_folder: Path | None, pairs: list[tuple[str, str]],
                    limits: dict, effort: Effort, tmp: Path, sections: dict, skipped: list[dict],
                    probe: Probe) -> None:
    """The sections that need graphs exported into ``tmp``: prefill and decode per runtime, and start-up (its
    first-token build folder, unless the source is a build folder)."""
    say, threads = opts.progress, opts.threads
    runtimes = "prefill" not in opts.skip or "decode" not in opts.skip
    paired = "goals" not in opts.skip and effort.paired_rounds > 0
    if runtimes or paired or ("startup" not in opts.skip and build_folder is None):
        (tmp / "graphs").mkdir()
        export_for_bench(ckpt, tmp / "graphs", tuple(p for _, p in pairs) if runtimes or paired else ("fp32",),
                         say)
    if runtimes:
        sections["prefill"], sections["decode"], failed = runtime_rows(
            pairs, ckpt, tmp / "graphs", limits, effort, threads, opts.skip, say, probe)
        skipped += failed
    if paired:
        sections["paired"] = _paired(ckpt, pairs, tmp / "graphs", limits, effort, threads, say)
        probe("after goals")
    if "startup" not in opts.skip:
        source = None if build_folder is not None else (
            ["--preset", opts.preset or "paper"] if opts.source is None else [opts.source])
        sections["startup"] = startup_section(ckpt, build_folder, tmp, threads, effort, say, source)
        probe("after startup")


def _paired(ckpt, pairs: list[tuple[str, str]], folder: Path, limits: dict, effort: Effort, threads: int,
            say: Progress) -> dict | None:
    """The goals scored in paired rounds (``paired``), the ONNX Runtime runners open for it; None without the
    fp32 runner (``--precision`` left it out)."""
    from gamexport.bench.paired import open_paired_runners, paired_section

    runners = open_paired_runners(pairs, ckpt, folder, threads)
    try:
        if "fp32" not in runners:
            say("goals: not scored (they need the fp32 ONNX Runtime rows: keep fp32 in --precision)")
            return None
        say(f"goals: {effort.paired_rounds} paired rounds of every goal's rows, limits and ceilings "
            f"({', '.join(runners)})")
        return paired_section(ckpt.config, runners, limits, threads, effort, say)
    finally:
        for runner in runners.values():
            runner.close()
        runners.clear()
        gc.collect()


def refit_fractions(cfg: GAMConfig, limits: dict, prefill: list[dict], decode: list[dict],
                    ceilings: dict | None) -> None:
    """Recompute every row's limit and fraction against ``limits`` (the run's final limits)."""
    for row in prefill:
        row.update(prefill_against_limit(cfg, row["batch"], row["seq_len"], row["p50_ms"], limits, row["precision"],
                                         row["head_positions"]))
    for row in decode:
        row.update(decode_against_limit(cfg, row["precision"], row["p50_ms"], limits) if row["batch"] == 1 else
                   batched_against_limit(cfg, row["batch"], row["p50_ms"], limits, row["precision"]))
    if ceilings is not None:
        ceilings["fp32_decode_fraction"] = ceiling_decode_fraction(cfg, ceilings, limits)
        for row in ceilings["rows"]:
            row.update(ceiling_against_limits(cfg, row, limits))


def add_speedups(rows: list[dict]) -> None:
    """Each row's speed-up over eager PyTorch and over torch.compile at the same mode, batch and length, measured
    in this run (``vs_eager``, ``vs_eager_compile``; absent where that baseline was not timed)."""
    def key(row):
        return row["mode"], row["batch"], row["seq_len"], row.get("head_positions")

    for baseline, field in (("eager", "vs_eager"), ("eager-compile", "vs_eager_compile")):
        base = {key(r): r["p50_ms"] for r in rows if r["runtime"] == baseline and r["precision"] == "fp32"}
        for row in rows:
            if key(row) in base:
                row[field] = base[key(row)] / row["p50_ms"]


def bench_result(opts: BenchOptions, ckpt, precisions: tuple[str, ...], machine: dict, limits: dict, load: dict,
                 sections: dict, skipped: list[dict]) -> dict:
    """bench.json's content (without ``elapsed_s`` and ``plots``): every row refitted to the final ``limits``,
    the limits checked against the rows, and the noisy timings named."""
    cfg = ckpt.config
    prefill, decode, ceilings = sections["prefill"], sections["decode"], sections["ceilings"]
    scaling, training = sections["scaling"], sections["training"]
    refit_fractions(cfg, limits, prefill, decode, ceilings)
    add_speedups([*prefill, *decode])
    invalid = check_limits(limits, [*prefill, *decode, *(ceilings["rows"] if ceilings else [])])
    timed = [*prefill, *decode, *(ceilings["rows"] if ceilings else []), *(scaling["points"] if scaling else []),
             *(training["rows"] if training else [])]
    timed_limits = [(name, limits[name]) for name in ("compute", "bandwidth", "batched")]
    noisy = [row_label(r) for r in timed if r.get("noisy")] + [f"limit {n}" for n, v in timed_limits if v["noisy"]]
    return {
        "schema_version": SCHEMA_VERSION, "kind": "gamexport-bench", "gamexport_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": bool(opts.quick), "threads": opts.threads,
        "source": {"path": ckpt.source, "sha256": ckpt.sha256, "trained": bool(ckpt.meta.get("trained", True)),
                   "label": str(ckpt.meta.get("label", ""))},
        "config": cfg.to_dict(), "parameters": cfg.n_params(), "machine": machine,
        "flops_per_token": flops_per_token(cfg),
        "weight_bytes_per_step": {p: weight_bytes_per_step(cfg, p) for p in ("fp32", *precisions) if p != "bf16"},
        "limits": limits, "limits_valid": not invalid, "invalid_limits": invalid, "load": load,
        "prefill": prefill, "decode": decode, "ceilings": ceilings, "scaling": scaling,
        "training": training, "startup": sections["startup"], "steadiness": sections.get("steadiness"),
        "paired": sections.get("paired"),
        "skipped": skipped, "noisy": noisy,
        "notes": list(NOTES),
    }


def write_result(result: dict, out: Path, say: Progress) -> dict:
    """Write the plots and ``bench.json`` (atomically) into ``out``; returns ``result`` with its ``plots``."""
    from gamexport.fsutil import atomic_write_json

    say(f"writing {out / BENCH_FILE} and the plots")
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = write_plots(result, out)
    atomic_write_json(out / BENCH_FILE, result)
    return result


def run_load(before, after, wall: float) -> dict:
    """Other processes' CPU time during the run (:func:`gamexport.bench.timing.other_cpu_cores`) and whether that
    makes it busy (more than ``BUSY_CORES``): a busy run's timings are void, its limits too low."""
    from gamexport.bench.timing import BUSY_CORES, other_cpu_cores

    others = other_cpu_cores(before, after, wall)
    return {"other_cpu_cores": others, "busy": others is not None and others > BUSY_CORES,
            "busy_above_cores": BUSY_CORES, "wall_s": round(wall, 1),
            "how": "all CPU time in /proc/stat (but idle and iowait) minus this process's and its waited-for "
                   "children's, over the run's wall time; null where /proc/stat is missing"}


__all__ = ["BenchOptions", "run_bench", "render_table", "load_source", "run_load", "SCHEMA_VERSION", "BENCH_FILE"]
