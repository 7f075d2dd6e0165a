"""Runtimes: every (runtime, precision) this machine runs, timed through the calls ``generate`` makes and set
against the limits — batch-1 and batched prefill against compute, batch-1 decode against the bandwidth roofline,
batched decode against the batched limit."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np

from gamexport.bench.flops import flops_per_token
from gamexport.bench.limits import batched_against_limit, decode_against_limit, prefill_against_limit
from gamexport.bench.options import PRECISIONS
from gamexport.bench.settings import BATCHED_PREFILL, DECODE_BATCHES, EDGE, PREFILL_LENGTHS, Effort, Progress
from gamexport.bench.steadiness import no_probe
from gamexport.config import GAMConfig


def export_for_bench(ckpt, folder: Path, precisions: tuple[str, ...], say: Progress) -> dict:
    """Write the graphs each precision needs into ``folder`` as the build writes them (``layout.Precision.writer``):
    gamexport's own builder (calibrated precisions on random token ids — fine for speed, not for accuracy), then
    ONNX Runtime's dynamic quantizer of the inlined fp32 graphs."""
    from gamexport.graph.builder import export_graphs
    from gamexport.layout import GRAPHS, graph_file, precision as record

    cfg = ckpt.config
    wanted = ("fp32", *(p for p in precisions if p != "fp32" and p in PRECISIONS))
    graph_precisions = tuple(p for p in wanted if record(p).writer == "builder")
    calibration = None
    if any(record(p).calibrated for p in graph_precisions):
        from gamexport.calibration import calibrate

        ids = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(2, cfg.max_positions), dtype=np.int64)
        calibration = calibrate(cfg, ckpt.weights, [ids])
    say(f"export: {', '.join(graph_precisions)} graphs into a temporary folder")
    written = export_graphs(cfg, ckpt.weights, folder, ckpt.sha256, graph_precisions, calibration)
    for p in wanted:
        if record(p).writer == "ort-dynamic":
            from gamexport.engines.ort import write_int8_dynamic

            say(f"export: {p} graphs (ONNX Runtime's dynamic quantization of the inlined fp32 graphs)")
            for kind in GRAPHS:
                path = write_int8_dynamic(folder / graph_file(kind, inlined=True), folder / graph_file(kind, p))
                written[path.name] = path
    return written


def runner_plan(precisions: tuple[str, ...], compile: bool) -> tuple[list[tuple[str, str]], list[dict]]:
    """(runtime, precision) pairs this machine runs, and ``skipped`` rows with reasons for the rest: eager PyTorch,
    then ONNX Runtime's CPU provider at every precision (``gamexport.targets.plan``), then the GPU targets."""
    from gamexport.targets import REFERENCE, plan

    pairs = [(REFERENCE, "fp32")]
    skipped = []
    if compile:
        pairs.append(("eager-compile", "fp32"))
    else:
        skipped.append({"runtime": "eager-compile", "precision": "fp32",
                        "reason": "torch.compile takes minutes to compile on CPU: pass --compile to time it"})
    cpu = plan(precisions, listed=PRECISIONS + ("bf16",), elsewhere=gpu_skip_reason())
    return pairs + cpu.pairs, skipped + cpu.skipped + cpu.elsewhere


def gpu_skip_reason():
    """The reason a GPU target is not run by the bench: this machine cannot, or the bench does not (yet)."""
    from gamexport.device import cuda_status

    usable, why = cuda_status()

    def reason(target) -> str:
        if not usable:
            return f"needs an NVIDIA GPU: {why}"
        return target.missing() or (f"GPU present ({why}), but bench measures CPU limits only; GPU rows need GPU "
                                    "limits first")

    return reason


def open_runner(runtime: str, precision: str, ckpt, folder: Path, threads: int):
    """The runner of one (runtime, precision) (``gamexport.targets.open_runner``): eager PyTorch (compiled or
    not) on the checkpoint's weights, or ONNX Runtime on the graphs in ``folder``."""
    from gamexport.targets import OpenOptions, open_runner as open_target

    return open_target(runtime, precision, folder, ckpt.config, OpenOptions(threads=threads), checkpoint=ckpt)


def describe_runner(runner) -> dict:
    """The fields every row of a runner starts with, from its ``describe()``: runtime, precision, the precision it
    computes in, and the MatMul ops it runs (where the backend has them to read)."""
    said = runner.describe()
    return {"runtime": said.runtime, "precision": said.precision, "compute_precision": said.compute_precision,
            **({"matmul_ops": said.kernels} if said.kernels else {})}


def prefill_rows(runner, cfg: GAMConfig, limits: dict, effort: Effort, threads: int, say: Progress) -> list[dict]:
    """Batch-1 prefill at T ∈ {64, 256} (capped at P) and batched prefill, against the compute limit; then
    prefill for generation at B = 1, T = min(256, P) (:func:`generation_prefill_row`)."""
    from gamexport.bench.timing import measure

    P = cfg.max_positions
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(BATCHED_PREFILL, P), dtype=np.int64)
    shapes = [(1, T) for T in sorted({min(T, P) for T in PREFILL_LENGTHS})] + [(BATCHED_PREFILL, min(256, P))]
    rows = []
    for B, T in shapes:
        say(f"prefill: {runner.runtime} {runner.precision}, batch {B} × {T} tokens")
        x = np.ascontiguousarray(ids[:B, :T])
        timing = measure(lambda: runner._prefill(x), warmup=effort.warmup, runs=effort.runs,
                         max_seconds=effort.max_seconds)
        rows.append({**describe_runner(runner), "mode": "prefill", "batch": B, "seq_len": T, **timing.as_dict(),
                     "tokens_per_s": B * T / (timing.p50_ms / 1e3), "head_positions": "all",
                     **prefill_against_limit(cfg, B, T, timing.p50_ms, limits, runner.precision),
                     "threads": threads})
    rows.append(generation_prefill_row(runner, cfg, ids[:1, :min(256, P)], limits, effort, threads, say))
    return rows


def generation_prefill_row(runner, cfg: GAMConfig, ids: np.ndarray, limits: dict, effort: Effort, threads: int,
                           say: Progress) -> dict:
    """Prefill as generation runs it: the prompt as one chunk of the step call from the zero state (the state
    and the next token's logits). Its FLOPs count the head at the last position only — the useful work, whatever
    the runtime computes; ``head_computed`` says what it does compute (gamexport's step graphs: the last
    position; eager PyTorch: every position)."""
    from gamexport.bench.timing import measure

    B, T = ids.shape
    say(f"prefill for generation: {runner.runtime} {runner.precision}, batch {B} × {T} tokens (step call)")
    positions = np.repeat(np.arange(T, dtype=np.int64)[None, :], B, axis=0)   # a writable (B, T) array
    ids = np.ascontiguousarray(ids)
    state = runner.empty_state(B)
    logits, _ = runner._step(ids, positions, state)
    timing = measure(lambda: runner._step(ids, positions, state), warmup=effort.warmup, runs=effort.runs,
                     max_seconds=effort.max_seconds)
    return {**describe_runner(runner), "mode": "prefill", "batch": B, "seq_len": T, **timing.as_dict(),
            "tokens_per_s": B * T / (timing.p50_ms / 1e3), "head_positions": "last", "graph": "step",
            "head_computed": "last" if logits.shape[1] == 1 else "all",
            **prefill_against_limit(cfg, B, T, timing.p50_ms, limits, runner.precision, "last"),
            "threads": threads}


def _decode_samples(runner, ids: np.ndarray, positions: list[int], warmup: int) -> list[float]:
    """Per-step seconds of one-token decode steps at ``positions`` (state carried), as ``generate`` calls them."""
    return interleaved_decode_samples(runner, [(ids, positions)], warmup)[0]


def interleaved_decode_samples(runner, streams: list[tuple[np.ndarray, list[int]]], warmup: int) -> list[list[float]]:
    """Per-step seconds of one-token decode steps of several ``streams`` (ids, positions), each with its own state
    carried (prefilled up to its first position, untimed), their steps taken in turn — stream 0's first step, stream
    1's first, …, then each one's second step, the turn order reversed every step — so that a host changing speed
    within the block moves every stream alike. ``warmup`` untimed steps of each stream first (its state then reset).
    One list of samples per stream."""
    plans = []
    for ids, positions in streams:
        _, state0 = runner._prefill(np.ascontiguousarray(ids[:, : positions[0]]))
        B = ids.shape[0]
        plans.append((state0, [(np.ascontiguousarray(ids[:, p:p + 1]), np.full((B, 1), p, np.int64))
                               for p in positions]))
    for state0, steps in plans:
        state = state0
        for token, pos in steps[:warmup]:
            _, state = runner._step(token, pos, state)
    states = [state0 for state0, _ in plans]
    samples: list[list[float]] = [[] for _ in plans]
    order = list(range(len(plans)))
    for i in range(max(len(steps) for _, steps in plans)):
        for k in (order if i % 2 == 0 else order[::-1]):
            steps = plans[k][1]
            if i < len(steps):
                t0 = time.perf_counter()
                _, states[k] = runner._step(*steps[i], states[k])
                samples[k].append(time.perf_counter() - t0)
    return samples


def decode_rows(runner, cfg: GAMConfig, limits: dict, effort: Effort, threads: int, say: Progress) -> list[dict]:
    """Batch-1 decode over every position 1..P−1 against the bandwidth roofline; batched decode at B = 8 and 32
    against the batched (M = 32) limit."""
    from gamexport.bench.timing import summarize

    P = cfg.max_positions
    if P < 2:
        return []
    per_token = flops_per_token(cfg)["total"]
    rng = np.random.default_rng(2)
    rows = []
    say(f"decode: {runner.runtime} {runner.precision}, batch 1, positions 1..{P - 1}")
    positions = list(range(1, P))
    samples = _decode_samples(runner, rng.integers(0, cfg.vocab_size, size=(1, P), dtype=np.int64), positions,
                              effort.warmup + 2)
    timing = summarize(samples, effort.warmup + 2)
    ms = np.asarray(samples) * 1e3
    first, last = float(np.median(ms[:EDGE])), float(np.median(ms[-EDGE:]))
    rows.append({**describe_runner(runner), "mode": "decode", "batch": 1, "seq_len": 1, "positions": [1, P - 1],
                 **timing.as_dict(), "first_ms": first, "last_ms": last, "edge_positions": min(EDGE, len(ms)),
                 "last_over_first": last / first, "tokens_per_s": 1 / (timing.p50_ms / 1e3),
                 "flops_per_token": per_token,
                 **decode_against_limit(cfg, runner.precision, timing.p50_ms, limits), "threads": threads})
    steps = min(P - 1, effort.batched_decode_steps)
    for B in DECODE_BATCHES:
        say(f"decode: {runner.runtime} {runner.precision}, batch {B}, positions 1..{steps}")
        ids = rng.integers(0, cfg.vocab_size, size=(B, P), dtype=np.int64)
        samples = _decode_samples(runner, ids, list(range(1, 1 + steps)), effort.warmup)
        timing = summarize(samples, effort.warmup)
        rows.append({**describe_runner(runner), "mode": "decode", "batch": B, "seq_len": 1, "positions": [1, steps],
                     **timing.as_dict(), "tokens_per_s": B / (timing.p50_ms / 1e3), "flops_per_token": per_token,
                     **batched_against_limit(cfg, B, timing.p50_ms, limits, runner.precision),
                     "threads": threads})
    return rows


def runtime_rows(pairs: list[tuple[str, str]], ckpt, folder: Path, limits: dict, effort: Effort, threads: int,
                 skip: tuple[str, ...], say: Progress, probe=no_probe) -> tuple[list[dict], list[dict], list[dict]]:
    """Prefill and decode rows of every (runtime, precision) in ``pairs`` (graphs in ``folder``), one runner open
    at a time; (prefill, decode, skipped). A failing ``torch.compile`` becomes a skipped row; any other failure is
    a bug and is raised."""
    cfg = ckpt.config
    prefill: list[dict] = []
    decode: list[dict] = []
    skipped: list[dict] = []
    for runtime, precision in pairs:
        from gamexport.targets import TARGETS

        target = TARGETS[runtime]
        if target.opening:
            say(target.opening)
        runner = open_runner(runtime, precision, ckpt, folder, threads)
        probe(f"{runtime} {precision}")   # the host's speed right before this runtime's rows
        try:
            rows_p = [] if "prefill" in skip else prefill_rows(runner, cfg, limits, effort, threads, say)
            rows_d = [] if "decode" in skip else decode_rows(runner, cfg, limits, effort, threads, say)
            prefill += rows_p
            decode += rows_d
        except Exception as exc:  # only a target that may fail (torch.compile's toolchain) is skipped; else a bug
            if not target.may_fail:
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            skipped.append({"runtime": runtime, "precision": precision,
                            "reason": f"{target.may_fail}: {type(exc).__name__}: {first}"})
            say(f"{runtime}: {target.may_fail}, skipped ({type(exc).__name__})")
        finally:
            runner.close()
            del runner
            gc.collect()
    return prefill, decode, skipped
