"""The performance goals, scored in paired rounds: each goal's rows and the kernels it is measured against are
timed in alternation, so that a change of the host's speed moves both sides of every ratio.

A quiet machine can still change speed under a run: on the 2-core cloud host of 2026-12 the same kernel ran up
to 2.3× slower from one minute to the next (``steadiness``). The sections of the bench time each row once, minutes
away from the limits it is divided by, so on such a host their fractions measure the host. Here every quantity a
goal needs — the row, the limit's kernels, the ceilings' weight MatMuls — is timed in each of ``rounds`` rounds,
one short block each (a warm-up call, then a few timed calls, or one pass of decode steps), back to back. Each round
yields every goal's value from its own timings; the goal's value is the median over the rounds, and its verdict
needs the rounds to agree: met when the lower quartile meets it, not met when the upper quartile misses it, else
"on the line". A slowdown that spans a round slows the row and its limit alike; one that hits a single block
moves one round, which the quartiles absorb.

The limit a fraction is taken against is, in each round, the best of all the limit's candidates timed in that
round (the winner at the start of a run may have been measured while the host was slow). A goal whose median
fraction exceeds 1.0 proves that limit wrong, as anywhere in the bench: it gets no verdict.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gamexport.bench.flops import flops_per_token, prefill_flops, weight_bytes_per_step, weight_matmul_shapes
from gamexport.bench.settings import BATCHED_M, EDGE, Effort, Progress
from gamexport.config import GAMConfig

#: A goal's rounds: met when its lower quartile meets the goal, not met when its upper quartile misses it.
VERDICTS = ("met", "not met", "on the line")



@dataclass
class Item:
    """One timed thing: ``block()`` runs one block of calls and returns the seconds of each timed call."""

    name: str
    block: Callable[[], list[float]]
    work: float = 0.0      # FLOPs (or bytes, for a bandwidth kernel) of one call, where the goals need it


#: A kernel block lasts at least this long (more calls of a short kernel), so that one hiccup moves no median.
MIN_BLOCK_S = 0.05
MAX_BLOCK_RUNS = 64


def kernel_block(call: Callable[[], object], runs: int, warmup: int = 1) -> Callable[[], list[float]]:
    """A block of ``warmup`` untimed calls, then ``runs`` timed ones — more for a short kernel, so that the block
    lasts :data:`MIN_BLOCK_S` (at most :data:`MAX_BLOCK_RUNS` calls)."""
    def block() -> list[float]:
        t0 = time.perf_counter()
        for _ in range(warmup):
            call()
        each = (time.perf_counter() - t0) / max(warmup, 1)
        n = runs if each <= 0 else max(runs, min(MAX_BLOCK_RUNS, int(MIN_BLOCK_S / each) + 1))
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
        return samples
    return block


@dataclass(frozen=True)
class Goal:
    """A goal scored per round: ``value(round)`` from the round's p50s (ms by item name; KeyError where an item was
    not timed), compared ``at_least`` or at most ``bound``; ``limit`` names the limit a fraction is of (None for a
    ratio of ratios), so that a fraction above 1.0 voids it."""

    id: str
    text: str
    bound: float
    at_least: bool
    value: Callable[[dict], float]
    limit: str | None = None


def _shapes(cfg: GAMConfig) -> dict:
    P = cfg.max_positions
    return {"T": min(256, P), "T64": min(64, P), "P": P}


def goals(cfg: GAMConfig) -> list[Goal]:
    """The performance issue's goals, each a function of one round's timings (see the module docstring)."""
    T, T64 = _shapes(cfg)["T"], _shapes(cfg)["T64"]
    per_token = flops_per_token(cfg)["total"]

    def rate(r: dict, name: str, work: float) -> float:
        return work / (r[name] / 1e3)

    def compute(r: dict) -> float:
        return max(rate(r, n, w) for n, w in r["_limits"]["compute"])

    def of_compute(name: str, flops: float) -> Callable[[dict], float]:
        return lambda r: rate(r, name, flops) / compute(r)

    def decode_fraction(r: dict) -> float:
        bandwidth = max(rate(r, n, w) for n, w in r["_limits"]["bandwidth"])
        roofline_ms = weight_bytes_per_step(cfg, "fp32") / bandwidth * 1e3
        return roofline_ms / r["fp32 decode B1"]

    def batched(r: dict) -> float:
        best = max(rate(r, n, w) for n, w in r["_limits"]["batched"])
        return rate(r, f"fp32 decode B{BATCHED_M}", BATCHED_M * per_token) / best

    def int8_over_ceiling(row_fp32: str, rows_int8: tuple[str, ...], M: int) -> Callable[[dict], float]:
        def value(r: dict) -> float:
            best = max(r[row_fp32] / r[n] for n in rows_int8 if n in r)
            return best / (r[f"ceiling fp32 M{M}"] / r[f"ceiling int8 M{M}"])
        return value

    def int4(r: dict) -> float:
        return min(r[n] for n in ("int8 decode B1", "int8-dyn decode B1") if n in r) / r["int4 decode B1"]

    return [
        Goal("prefill_generation", f"prefill for generation, T={T} (state + last position's logits) ≥ 0.75 of "
             "compute", 0.75, True, of_compute(f"fp32 prefill for generation B1×{T}",
                                               prefill_flops(cfg, 1, T, "last")), "compute"),
        Goal("prefill", f"prefill, all positions' logits, T={T} ≥ 0.80 of compute", 0.80, True,
             of_compute(f"fp32 prefill B1×{T}", prefill_flops(cfg, 1, T, "all")), "compute"),
        Goal("prefill_64", f"prefill, all positions' logits, T={T64} ≥ 0.70 of compute", 0.70, True,
             of_compute(f"fp32 prefill B1×{T64}", prefill_flops(cfg, 1, T64, "all")), "compute"),
        Goal("decode", "fp32 decode ≥ 0.80 of the bandwidth roofline", 0.80, True, decode_fraction, "bandwidth"),
        Goal("decode_flat", f"fp32 decode flat over positions: last ÷ first {EDGE} ≤ 1.10", 1.10, False,
             lambda r: r["_edges"]["fp32 decode B1"]),
        Goal("batched_decode", "batched decode B=32 ≥ 0.80 of the batched limit", 0.80, True, batched, "batched"),
        Goal("int8_decode", "INT8 decode ÷ fp32 ≥ 0.80 of the weight MatMuls' INT8 ÷ fp32 ceiling at M=1", 0.80,
             True, int8_over_ceiling("fp32 decode B1", ("int8 decode B1", "int8-dyn decode B1"), 1)),
        Goal("int8_prefill", f"INT8 prefill ÷ fp32 ≥ 0.80 of that ceiling at M={T} (T={T})", 0.80, True,
             int8_over_ceiling(f"fp32 prefill B1×{T}", (f"int8 prefill B1×{T}", f"int8-dyn prefill B1×{T}"),
                               T)),
        Goal("int4_decode", "INT4 decode ≥ its INT8 decode (tokens/s ratio)", 1.0, True, int4),
    ]


def context(cfg: GAMConfig) -> dict[str, Callable[[dict], float]]:
    """What stands in a goal's way, from the same rounds: the ceilings' own fractions and ratios, and each INT8
    flavour's speed-up (the medians go into bench.json's ``paired.context``)."""
    T, T64, M32 = _shapes(cfg)["T"], _shapes(cfg)["T64"], min(BATCHED_M, cfg.max_positions)
    elements = sum(K * N for K, N in weight_matmul_shapes(cfg))

    def best(r: dict, limit: str) -> float:
        return max(w / (r[n] / 1e3) for n, w in r["_limits"][limit])

    return {
        f"ceiling_fp32_M{M32}_of_batched": lambda r: 2 * M32 * elements / (r[f"ceiling fp32 M{M32}"] / 1e3)
        / best(r, "batched"),
        f"ceiling_fp32_M{T64}_of_compute": lambda r: 2 * T64 * elements / (r[f"ceiling fp32 M{T64}"] / 1e3)
        / best(r, "compute"),
        "ceiling_fp32_decode_fraction": lambda r: weight_bytes_per_step(cfg, "fp32") / best(r, "bandwidth") * 1e3
        / r["ceiling fp32 M1"],
        "ceiling_int8_speedup_M1": lambda r: r["ceiling fp32 M1"] / r["ceiling int8 M1"],
        f"ceiling_int8_speedup_M{T}": lambda r: r[f"ceiling fp32 M{T}"] / r[f"ceiling int8 M{T}"],
        "int8_decode_speedup": lambda r: r["fp32 decode B1"] / r["int8 decode B1"],
        "int8-dyn_decode_speedup": lambda r: r["fp32 decode B1"] / r["int8-dyn decode B1"],
        f"int8_prefill_speedup_T{T}": lambda r: r[f"fp32 prefill B1×{T}"] / r[f"int8 prefill B1×{T}"],
        f"int8-dyn_prefill_speedup_T{T}": lambda r: r[f"fp32 prefill B1×{T}"] / r[f"int8-dyn prefill B1×{T}"],
        "int4_decode_tokens_per_s": lambda r: 1e3 / r["int4 decode B1"],
        "int8_decode_tokens_per_s": lambda r: 1e3 / r["int8 decode B1"],
        "fp32_decode_tokens_per_s": lambda r: 1e3 / r["fp32 decode B1"],
    }


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(q1), float(med), float(q3)


def verdict(goal: Goal, values: list[float]) -> tuple[str, str | None]:
    """(verdict, why there is none): met / not met / on the line from the rounds' quartiles; no verdict where the
    median fraction of a limit exceeds 1.0 (that limit is wrong) or no round could be scored."""
    if not values:
        return "", "not measured in this run"
    q1, med, q3 = quartiles(values)
    if goal.limit is not None and med > 1.0:
        return "", f"the {goal.limit} limit is beaten (median {med:.2f} of it)"
    low, high = (q1, q3) if goal.at_least else (-q3, -q1)
    bound = goal.bound if goal.at_least else -goal.bound
    if low >= bound:
        return "met", None
    if high < bound:
        return "not met", None
    return "on the line", None


def score(cfg: GAMConfig, rounds: list[dict]) -> dict:
    """The goals and the context values over ``rounds`` (each a dict of p50 ms by item, ``_edges`` and
    ``_limits``): values per round, quartiles, verdicts."""
    out_goals = []
    for goal in goals(cfg):
        values = []
        for r in rounds:
            try:
                values.append(float(goal.value(r)))
            except (KeyError, ValueError, ZeroDivisionError):
                pass
        said, why = verdict(goal, values)
        entry = {"id": goal.id, "goal": goal.text, "bound": goal.bound, "at_least": goal.at_least,
                 "limit": goal.limit, "values": values, "verdict": said}
        if values:
            entry["q1"], entry["median"], entry["q3"] = quartiles(values)
        if why:
            entry["no_verdict"] = why
        out_goals.append(entry)
    ctx = {}
    for name, fn in context(cfg).items():
        values = []
        for r in rounds:
            try:
                values.append(float(fn(r)))
            except (KeyError, ValueError, ZeroDivisionError):
                pass
        if values:
            ctx[name] = {"median": quartiles(values)[1], "values": values}
    return {"goals": out_goals, "context": ctx}


def limit_items(cfg: GAMConfig, limits: dict, threads: int, runs: int) -> tuple[list[Item], dict]:
    """Every candidate kernel of the three limits as an item, and ``_limits``: {limit: [(item name, work of one
    call)]}."""
    from gamexport.bench.kernels import kernel_call

    items, used = [], {}
    for name, key in (("compute", "gflops"), ("bandwidth", "gbps"), ("batched", "gflops")):
        used[name] = []
        for c in limits[name]["candidates"]:
            call = kernel_call(c, cfg, threads)
            if call is None:
                continue
            work = c["bytes"] if key == "gbps" else 2 * float(np.prod(c["shape"]))
            items.append(Item(f"limit {name}: {c['name']}", kernel_block(call, runs), work))
            used[name].append((items[-1].name, work))
    return items, used


def ceiling_items(cfg: GAMConfig, threads: int, runs: int, with_int8: bool) -> list[Item]:
    """The ceilings' weight MatMuls (``kernels.weight_matmuls_session``) at the M the goals need: fp32 at M = 1,
    32, 64 and min(256, P) (capped at P), int8 at M = 1 and min(256, P) where an INT8 precision runs."""
    from gamexport.bench.kernels import weight_matmuls_session

    rng = np.random.default_rng(3)
    s = _shapes(cfg)
    Ms = {"fp32": sorted({1, min(BATCHED_M, s["P"]), s["T64"], s["T"]}),
          "int8": sorted({1, s["T"]}) if with_int8 else []}
    items = []
    for kind, kind_Ms in Ms.items():
        if not kind_Ms:
            continue
        session, widths = weight_matmuls_session(cfg, kind, threads)
        for M in kind_Ms:
            feeds = {f"x{K}": rng.standard_normal((M, K), dtype=np.float32) for K in widths}
            items.append(Item(f"ceiling {kind} M{M}", kernel_block(lambda s=session, f=feeds: s.run(None, f), runs)))
    return items


def runner_items(runners: dict, cfg: GAMConfig, runs: int, decode_steps: int) -> tuple[list[Item], set[str]]:
    """The rows the goals need from the open ``runners`` ({precision: ONNX Runtime runner}); and the names of the
    decode items whose last ÷ first ``EDGE`` positions a round records."""
    from gamexport.bench.runtimes import _decode_samples

    P, T, T64 = _shapes(cfg)["P"], _shapes(cfg)["T"], _shapes(cfg)["T64"]
    rng = np.random.default_rng(11)
    ids = rng.integers(0, cfg.vocab_size, size=(BATCHED_M, P), dtype=np.int64)
    items, edged = [], set()
    for precision, runner in runners.items():
        prefill_Ts = (T, T64) if precision == "fp32" else (T,)
        for t in prefill_Ts:
            x = np.ascontiguousarray(ids[:1, :t])
            items.append(Item(f"{precision} prefill B1×{t}", kernel_block(lambda r=runner, x=x: r._prefill(x), runs)))
        if P >= 2:
            items.append(Item(f"{precision} decode B1", lambda r=runner: _decode_samples(
                r, ids[:1], list(range(1, P)), 3)))
            edged.add(f"{precision} decode B1")
        if precision != "fp32":
            continue
        x = np.ascontiguousarray(ids[:1, :T])
        pos = np.arange(T, dtype=np.int64)[None, :].copy()
        items.append(Item(f"fp32 prefill for generation B1×{T}", kernel_block(
            lambda r=runner, x=x, p=pos, s=runner.empty_state(1): r._step(x, p, s), runs)))
        if P >= 2:
            steps = list(range(1, 1 + min(P - 1, decode_steps)))
            items.append(Item(f"fp32 decode B{BATCHED_M}", lambda r=runner: _decode_samples(r, ids, steps, 2)))
    return items, edged


def run_rounds(items: list[Item], rounds: int, edged: set[str], say: Progress) -> list[dict]:
    """Time every item once per round, the order rotated each round; each round's p50 ms by item, and ``_edges``:
    the decode items' median of the last ``EDGE`` steps ÷ that of the first."""
    out = []
    for k in range(rounds):
        say(f"goals: paired round {k + 1}/{rounds} ({len(items)} timings)")
        order = items[k % len(items):] + items[:k % len(items)]
        r: dict = {"_edges": {}}
        for item in order:
            ms = np.asarray(item.block(), dtype=np.float64) * 1e3
            r[item.name] = float(np.median(ms))
            if item.name in edged and ms.size >= 2 * EDGE:
                r["_edges"][item.name] = float(np.median(ms[-EDGE:]) / np.median(ms[:EDGE]))
        out.append(r)
    return out


def paired_section(cfg: GAMConfig, runners: dict, limits: dict, threads: int, effort: Effort,
                   say: Progress) -> dict:
    """bench.json's ``paired``: every goal's items timed in ``effort.paired_rounds`` rounds, and the scores.
    ``runners``: the open ONNX Runtime runners by precision (fp32 required; int8, int8-dyn, int4 where run)."""
    from gamexport.bench.kernels import torch_or_none

    runs = effort.paired_runs
    lim_items, used = limit_items(cfg, limits, threads, runs)
    with_int8 = any(p in runners for p in ("int8", "int8-dyn"))
    rows, edged = runner_items(runners, cfg, runs, effort.batched_decode_steps)
    items = [*lim_items, *ceiling_items(cfg, threads, runs, with_int8), *rows]
    torch = torch_or_none()
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(threads)   # the limits' torch kernels run on the run's threads
    try:
        rounds = run_rounds(items, effort.paired_rounds, edged, say)
    finally:
        if torch is not None:
            torch.set_num_threads(before)
    for r in rounds:
        r["_limits"] = used
    scored = score(cfg, rounds)
    del items, lim_items, rows
    gc.collect()
    return {"what": "each goal's rows, its limit's candidate kernels and the ceilings' weight MatMuls timed in "
                    f"alternation, one block each per round, {effort.paired_rounds} rounds (order rotated); a goal's "
                    "value is the median over rounds of its per-round value, met when the lower quartile meets it, "
                    "not met when the upper quartile misses it, else on the line",
            "rounds": effort.paired_rounds, "runs_per_block": runs,
            "limits_used": {k: [n for n, _ in v] for k, v in used.items()},
            "timings_ms": {item: [r[item] for r in rounds] for item in rounds[0] if not item.startswith("_")}
            if rounds else {},
            "edges": {item: [r["_edges"].get(item) for r in rounds] for item in sorted(edged)},
            **scored}


def open_paired_runners(pairs: list[tuple[str, str]], ckpt, folder: Path, threads: int) -> dict:
    """ONNX Runtime runners of the precisions the goals need among ``pairs``, all open at once."""
    from gamexport.bench.runtimes import open_runner

    wanted = ("fp32", "int8", "int8-dyn", "int4")
    return {p: open_runner(rt, p, ckpt, folder, threads) for rt, p in pairs
            if rt == "onnxruntime-cpu" and p in wanted}
