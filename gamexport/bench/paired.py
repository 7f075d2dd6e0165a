"""The performance goals, scored in paired rounds: each goal's rows and the kernels it is measured against are
timed in alternation within the same minute, so that a host changing speed cannot set a row timed at a slow moment
against a limit timed at a fast one.

A quiet machine can still change speed under a run: on the 2-core cloud host of 2026-12 the same kernel ran up
to 3× slower from one minute to the next (``steadiness``), and in one run prefills alternated between two speeds
from one ten-second round to the next. The sections of the bench time each row once, minutes away from the limits
it is divided by, so on such a host their fractions measure the host. Here the goals are measured in **groups**
(:data:`GROUPS`): the prefill goals with every candidate kernel of the compute limit, fp32 decode with the
bandwidth limit's, batched decode with the batched limit's, each INT8 ratio with the fp32 row and the ceilings'
weight MatMuls it is divided by; flatness with the first and the last positions' steps interleaved within each
block (:func:`positions_item`). A group's items are timed in each of ``rounds`` rounds, one short block each (a
warm-up call, then calls for at least :data:`MIN_BLOCK_S`, or a few dozen decode steps; the block's time is the
median of its calls), back to back and in an order rotated every round, so that one round of a group lasts a second
or two.

On that host the slowdowns come in bursts shorter than a round: consecutive blocks of one kernel ran 3× apart. A
burst only ever slows a block, so each item is represented by its **fastest block** over the rounds — taken within
the same minute as the fastest blocks of everything it is compared with, every item having had the same rounds to
catch the host at its best. A goal's ``value`` is computed from the fastest blocks, its ``runner_up`` from each
item's second fastest; the verdict is met when both meet the goal, not met when both miss it, else "on the line".
``per_round`` keeps each round's own value, to show how much the host moved.

The limit a fraction is taken against is the best of all the limit's candidates (each at its fastest block: the
winner at the start of a run may have been measured while the host was slow). A goal whose fraction exceeds 1.0
proves that limit wrong, as anywhere in the bench: it gets no verdict.
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

#: A goal's verdicts: met on both the fastest and the runner-up blocks, missed on both, or on the line; or
#: missed on both with its ceiling — the weight MatMuls the goal's graph must run, timed alone in the same rounds —
#: below the goal on both too: in that run no graph on these kernels could have met it there ("bounded", :func:`bounded`).
VERDICTS = ("met", "not met", "on the line", "bounded")


@dataclass
class Item:
    """One timed thing: ``block()`` runs one block of calls and returns the seconds of each timed call — or, for
    an item whose ``parts`` are timed interleaved within each block, those seconds by part name."""

    name: str
    block: Callable[[], list[float] | dict[str, list[float]]]
    parts: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The names its blocks' times are kept under: its parts, or its own name."""
        return self.parts or (self.name,)


#: A kernel block lasts at least this long (more calls of a short kernel), so that one hiccup moves no median.
MIN_BLOCK_S = 0.1
MAX_BLOCK_RUNS = 64


def kernel_block(call: Callable[[], object], runs: int, warmup: int = 1) -> Callable[[], list[float]]:
    """A block of ``warmup`` untimed calls, then at least ``runs`` timed ones — more for a short kernel, so that
    the block lasts :data:`MIN_BLOCK_S` (at most :data:`MAX_BLOCK_RUNS` calls)."""
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
    """A goal (or, without ``bound``, a context value): ``value(r)`` from block times ``r`` (ms by item name — one
    round's, or each item's fastest or runner-up block — and ``_limits``), compared ``at_least`` or at most ``bound``; ``limit`` names the limit a
    fraction is of (None for a ratio of ratios), so that a fraction above 1.0 voids it; ``group`` is the group
    (:data:`GROUPS`) whose rounds it is scored on, ``needs`` the items (besides the limits' kernels) it reads, and
    ``either`` items of which it needs one (the INT8 flavours)."""

    id: str
    text: str
    bound: float | None
    at_least: bool
    value: Callable[[dict], float]
    limit: str | None
    group: str
    needs: tuple[str, ...]
    either: tuple[str, ...] = ()
    ceiling: str | None = None   # the context measure of the same fraction for the goal's weight MatMuls alone

    def scorable(self, names) -> bool:
        """Whether items ``names`` hold what it reads: every one of ``needs`` and one of ``either`` (if any)."""
        return all(n in names for n in self.needs) and (not self.either or any(n in names for n in self.either))


#: The groups timed together, and the limits whose every candidate kernel each group times.
GROUPS = {"compute": ("compute",), "bandwidth": ("bandwidth",), "positions": (), "batched": ("batched",),
          "int8 decode": (), "int8 prefill": (), "int4 decode": ()}

#: Decode blocks: this many steps per block (the batched one: BATCHED_DECODE_STEPS), and for the positions
#: group the first and the last EDGE positions.
DECODE_BLOCK_STEPS = 48
BATCHED_DECODE_STEPS = 12


def goal_shapes(cfg: GAMConfig) -> dict:
    """The shapes the goals are stated at, capped at P: T (the prefills, 256), T64 (64), M32 (batched decode)."""
    P = cfg.max_positions
    return {"T": min(256, P), "T64": min(64, P), "P": P, "M32": min(BATCHED_M, P)}


def measures(cfg: GAMConfig) -> list[Goal]:
    """The performance issue's goals (``bound`` set) and what stands in their way (context, ``bound`` None), each
    a function of one round of its group (see the module docstring)."""
    sh = goal_shapes(cfg)
    T, T64, M32 = sh["T"], sh["T64"], sh["M32"]
    per_token = flops_per_token(cfg)["total"]
    elements = sum(K * N for K, N in weight_matmul_shapes(cfg))
    step_bytes = weight_bytes_per_step(cfg, "fp32")

    def best(r: dict, limit: str) -> float:
        return max(work / (r[name] / 1e3) for name, work in r["_limits"][limit])

    def of(limit: str, name: str, work: float) -> Callable[[dict], float]:
        return lambda r: work / (r[name] / 1e3) / best(r, limit)

    def roofline(name: str) -> Callable[[dict], float]:
        return lambda r: step_bytes / best(r, "bandwidth") * 1e3 / r[name]

    def speedup(slow: str, fast: str) -> Callable[[dict], float]:
        return lambda r: r[slow] / r[fast]

    def int8_over_ceiling(row_fp32: str, rows_int8: tuple[str, ...], M: int) -> Callable[[dict], float]:
        def value(r: dict) -> float:
            fastest = max(r[row_fp32] / r[n] for n in rows_int8 if n in r)
            return fastest / (r[f"ceiling fp32 M{M}"] / r[f"ceiling int8 M{M}"])
        return value

    def int4(r: dict) -> float:
        return min(r[n] for n in ("int8 decode B1", "int8-dyn decode B1") if n in r) / r["int4 decode B1"]

    gen, pre, pre64 = f"fp32 prefill for generation B1×{T}", f"fp32 prefill B1×{T}", f"fp32 prefill B1×{T64}"
    dec, b32 = "fp32 decode B1", f"fp32 decode B{M32}"
    i8, i8d, i4 = "int8 decode B1", "int8-dyn decode B1", "int4 decode B1"
    q8, q8d = f"int8 prefill B1×{T}", f"int8-dyn prefill B1×{T}"
    c1, c1i, cT, cTi = "ceiling fp32 M1", "ceiling int8 M1", f"ceiling fp32 M{T}", f"ceiling int8 M{T}"
    c32, c64 = f"ceiling fp32 M{M32}", f"ceiling fp32 M{T64}"
    first, last = f"fp32 decode first {EDGE}", f"fp32 decode last {EDGE}"
    return [
        Goal("prefill_generation", f"prefill for generation, T={T} (state + last position's logits) ≥ 0.75 of "
             "compute", 0.75, True, of("compute", gen, prefill_flops(cfg, 1, T, "last")), "compute", "compute",
             (gen,)),
        Goal("prefill", f"prefill, all positions' logits, T={T} ≥ 0.80 of compute", 0.80, True,
             of("compute", pre, prefill_flops(cfg, 1, T, "all")), "compute", "compute", (pre,),
             ceiling=f"ceiling_fp32_M{T}_of_compute"),
        Goal("prefill_64", f"prefill, all positions' logits, T={T64} ≥ 0.70 of compute", 0.70, True,
             of("compute", pre64, prefill_flops(cfg, 1, T64, "all")), "compute", "compute", (pre64,),
             ceiling=f"ceiling_fp32_M{T64}_of_compute"),
        Goal("decode", "fp32 decode ≥ 0.80 of the bandwidth roofline", 0.80, True, roofline(dec), "bandwidth",
             "bandwidth", (dec,), ceiling="ceiling_fp32_decode_fraction"),
        Goal("decode_flat", f"fp32 decode flat over positions: last ÷ first {EDGE} positions ≤ 1.10", 1.10, False,
             speedup(last, first), None, "positions", (first, last)),
        Goal("batched_decode", f"batched decode B={M32} ≥ 0.80 of the batched limit", 0.80, True,
             of("batched", b32, M32 * per_token), "batched", "batched", (b32,), ceiling=f"ceiling_fp32_M{M32}_of_batched"),
        Goal("int8_decode", "INT8 decode ÷ fp32 ≥ 0.80 of the weight MatMuls' INT8 ÷ fp32 ceiling at M=1", 0.80,
             True, int8_over_ceiling(dec, (i8, i8d), 1), None, "int8 decode", (dec, c1, c1i), (i8, i8d)),
        Goal("int8_prefill", f"INT8 prefill ÷ fp32 ≥ 0.80 of that ceiling at M={T} (T={T})", 0.80, True,
             int8_over_ceiling(pre, (q8, q8d), T), None, "int8 prefill", (pre, cT, cTi), (q8, q8d)),
        Goal("int4_decode", "INT4 decode ≥ its INT8 decode (tokens/s ratio)", 1.0, True, int4, None, "int4 decode",
             (i4,), (i8, i8d)),
        # What stands in the way, from the same groups' rounds.
        Goal(f"ceiling_fp32_M{T64}_of_compute", "", None, True, of("compute", c64, 2 * T64 * elements), "compute",
             "compute", (c64,)),
        Goal(f"ceiling_fp32_M{T}_of_compute", "", None, True, of("compute", cT, 2 * T * elements), "compute",
             "compute", (cT,)),
        Goal("ceiling_fp32_decode_fraction", "", None, True, roofline(c1), "bandwidth", "bandwidth", (c1,)),
        Goal(f"ceiling_fp32_M{M32}_of_batched", "", None, True, of("batched", c32, 2 * M32 * elements), "batched",
             "batched", (c32,)),
        Goal("ceiling_int8_speedup_M1", "", None, True, speedup(c1, c1i), None, "int8 decode", (c1, c1i)),
        Goal("int8_decode_speedup", "", None, True, speedup(dec, i8), None, "int8 decode", (dec, i8)),
        Goal("int8-dyn_decode_speedup", "", None, True, speedup(dec, i8d), None, "int8 decode", (dec, i8d)),
        Goal(f"ceiling_int8_speedup_M{T}", "", None, True, speedup(cT, cTi), None, "int8 prefill", (cT, cTi)),
        Goal(f"int8_prefill_speedup_T{T}", "", None, True, speedup(pre, q8), None, "int8 prefill", (pre, q8)),
        Goal(f"int8-dyn_prefill_speedup_T{T}", "", None, True, speedup(pre, q8d), None, "int8 prefill", (pre, q8d)),
        Goal("int4_decode_tokens_per_s", "", None, True, lambda r: 1e3 / r[i4], None, "int4 decode", (i4,)),
        Goal("int8_decode_tokens_per_s", "", None, True, lambda r: 1e3 / r[i8], None, "int4 decode", (i8,)),
        Goal("fp32_decode_tokens_per_s", "", None, True, lambda r: 1e3 / r[dec], None, "bandwidth", (dec,)),
    ]


def goals(cfg: GAMConfig) -> list[Goal]:
    """The goals among :func:`measures` (those with a bound)."""
    return [m for m in measures(cfg) if m.bound is not None]


def fastest(rounds: list[dict], k: int = 0) -> dict | None:
    """Each item's ``k``-th fastest block over ``rounds`` (0: the fastest; block times are medians of the block's
    calls), and the rounds' ``_limits``; None with ``k`` rounds or fewer."""
    if len(rounds) <= k:
        return None
    names = [n for n in rounds[0] if not n.startswith("_")]
    return {**{n: sorted(r[n] for r in rounds)[k] for n in names}, "_limits": rounds[0].get("_limits", {})}


def _value(measure: Goal, r: dict | None) -> float | None:
    if r is None:
        return None
    try:
        return float(measure.value(r))
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def verdict(goal: Goal, value: float | None, runner_up: float | None) -> tuple[str, str | None]:
    """(verdict, why there is none) from the goal's value on each item's fastest block and on its runner-up
    block: met when both meet the goal, not met when both miss it, else on the line; no verdict where a fraction
    of a limit exceeds 1.0 (that limit is wrong) or the run could not score it."""
    if value is None or runner_up is None:
        return "", "not measured in this run"
    if goal.limit is not None and value > 1.0:
        return "", f"the {goal.limit} limit is beaten ({value:.2f} of it)"

    def ok(v: float) -> bool:
        return v >= goal.bound if goal.at_least else v <= goal.bound

    if ok(value) and ok(runner_up):
        return "met", None
    if not ok(value) and not ok(runner_up):
        return "not met", None
    return "on the line", None


def bounded(goal: Goal, entry: dict, context: dict) -> bool:
    """Whether a goal missed on both blocks (``entry``: its scored record) is stopped by its ceiling: the same
    fraction of the same limit for the weight MatMuls alone that its graph runs (``context[goal.ceiling]``, timed in
    the same rounds) misses the goal on its fastest and on its runner-up block too. The graph does at least that
    work, so no graph on ONNX Runtime's kernels could have met the goal on that host in that run; how close it came to what did run is
    value ÷ ceiling. Prefill for generation has none: its head runs at one position, the ceiling's at every one."""
    ceiling = context.get(goal.ceiling) if goal.ceiling else None
    if entry.get("verdict") != "not met" or not ceiling or ceiling.get("runner_up") is None:
        return False
    return all((v < goal.bound) if goal.at_least else (v > goal.bound)
               for v in (ceiling["value"], ceiling["runner_up"]))


def score(cfg: GAMConfig, rounds: dict[str, list[dict]]) -> dict:
    """The goals and the context values from each group's ``rounds`` (each round a dict of block ms by item, and
    ``_limits``): ``value`` from each item's fastest block, ``runner_up`` from its second fastest, ``per_round``
    from each round's own blocks; and the verdicts."""
    out_goals, ctx = [], {}
    for m in measures(cfg):
        rs = rounds.get(m.group, [])
        value, runner_up = _value(m, fastest(rs)), _value(m, fastest(rs, 1))
        per_round = [v for v in (_value(m, r) for r in rs) if v is not None]
        if m.bound is None:
            if value is not None:
                ctx[m.id] = {"value": value, "runner_up": runner_up, "per_round": per_round}
            continue
        said, why = verdict(m, value, runner_up)
        entry = {"id": m.id, "goal": m.text, "group": m.group, "bound": m.bound, "at_least": m.at_least,
                 "limit": m.limit, "value": value, "runner_up": runner_up, "per_round": per_round,
                 "verdict": said}
        if why:
            entry["no_verdict"] = why
        out_goals.append(entry)
    by_id = {m.id: m for m in measures(cfg)}
    for entry in out_goals:   # the context values are all scored by now
        if bounded(by_id[entry["id"]], entry, ctx):
            entry["verdict"] = "bounded"
    return {"goals": out_goals, "context": ctx}


def limit_items(cfg: GAMConfig, limits: dict, threads: int, runs: int,
                ceilings: dict[str, Item]) -> tuple[list[Item], dict]:
    """Every candidate kernel of the three limits as an item, and ``_limits``: {limit: [(item name, work of one
    call)]}. A candidate that is the model's own weight MatMuls at an M the ``ceilings`` items time (by name) is
    that item: the same kernel, timed once per round."""
    from gamexport.bench.kernels import kernel_call

    items, used = [], {}
    for name, key in (("compute", "gflops"), ("bandwidth", "gbps"), ("batched", "gflops")):
        used[name] = []
        for c in limits[name]["candidates"]:
            work = c["bytes"] if key == "gbps" else c.get("flops") or 2 * float(np.prod(c["shape"]))
            kernel = c.get("kernel") or {}
            same = f"ceiling {kernel.get('kind', 'fp32')} M{c['shape'][0]}"
            if kernel.get("op") == "weight-matmuls" and same in ceilings:
                used[name].append((same, work))
                continue
            call = kernel_call(c, cfg, threads)
            if call is None:
                continue
            items.append(Item(f"limit {name}: {c['name']}", kernel_block(call, runs)))
            used[name].append((items[-1].name, work))
    return items, used


def ceiling_items(cfg: GAMConfig, threads: int, runs: int, with_int8: bool) -> dict[str, Item]:
    """The ceilings' weight MatMuls (``kernels.weight_matmuls_calls``) at the M the goals need, by name: fp32 at
    M = 1, 32, 64 and min(256, P) (capped at P), int8 at M = 1 and min(256, P) where an INT8 precision runs."""
    from gamexport.bench.kernels import weight_matmuls_calls

    s = goal_shapes(cfg)
    Ms = {"fp32": sorted({1, s["M32"], s["T64"], s["T"]}), "int8": sorted({1, s["T"]}) if with_int8 else []}
    items = {}
    for kind, kind_Ms in Ms.items():
        if kind_Ms:
            for M, call in weight_matmuls_calls(cfg, kind, threads, kind_Ms, seed=3).items():
                items[f"ceiling {kind} M{M}"] = Item(f"ceiling {kind} M{M}", kernel_block(call, runs))
    return items


def _decode_block(runner, ids: np.ndarray, starts: list[int], steps: int) -> Callable[[], list[float]]:
    """A block of ``steps`` one-token decode steps (state carried, as ``generate`` calls them), each block starting
    at the next of ``starts`` (the state before it prefilled, untimed) and three untimed steps first."""
    from gamexport.bench.runtimes import _decode_samples

    calls = [0]

    def block() -> list[float]:
        start = starts[calls[0] % len(starts)]
        calls[0] += 1
        return _decode_samples(runner, ids, list(range(start, start + steps)), 3)
    return block


def positions_item(runner, ids: np.ndarray, P: int) -> Item:
    """Decode at the first and at the last :data:`EDGE` positions, their steps interleaved within each block
    (``runtimes.interleaved_decode_samples``): a position-dependent cost shows in the ratio of the two, while a
    host changing speed — in bursts shorter than a block on the 2026-12 host — slows both alike."""
    from gamexport.bench.runtimes import interleaved_decode_samples

    first, last = f"fp32 decode first {EDGE}", f"fp32 decode last {EDGE}"
    streams = [(ids, list(range(1, 1 + EDGE))), (ids, list(range(P - EDGE, P)))]

    def block() -> dict[str, list[float]]:
        return dict(zip((first, last), interleaved_decode_samples(runner, streams, 3)))
    return Item(f"fp32 decode first and last {EDGE}, interleaved", block, (first, last))


def runner_items(runners: dict, cfg: GAMConfig, runs: int) -> list[Item]:
    """The rows the goals need from the open ``runners`` ({precision: ONNX Runtime runner})."""
    sh = goal_shapes(cfg)
    P, T, T64, M32 = sh["P"], sh["T"], sh["T64"], sh["M32"]
    rng = np.random.default_rng(11)
    ids = rng.integers(0, cfg.vocab_size, size=(M32, P), dtype=np.int64)
    one = np.ascontiguousarray(ids[:1])
    items = []
    for precision, runner in runners.items():
        for t in ((T, T64) if precision == "fp32" else (T,)):
            x = np.ascontiguousarray(ids[:1, :t])
            items.append(Item(f"{precision} prefill B1×{t}", kernel_block(lambda r=runner, x=x: r._prefill(x), runs)))
        if P >= 2:
            steps = min(DECODE_BLOCK_STEPS, P - 1)
            starts = list(range(1, P - steps + 1, steps)) or [1]   # successive blocks walk the positions
            items.append(Item(f"{precision} decode B1", _decode_block(runner, one, starts, steps)))
        if precision != "fp32":
            continue
        x = np.ascontiguousarray(ids[:1, :T])
        pos = np.arange(T, dtype=np.int64)[None, :].copy()
        items.append(Item(f"fp32 prefill for generation B1×{T}", kernel_block(
            lambda r=runner, x=x, p=pos, s=runner.empty_state(1): r._step(x, p, s), runs)))
        if P >= 2:
            items.append(Item(f"fp32 decode B{M32}", _decode_block(runner, np.ascontiguousarray(ids), [1],
                                                                  min(BATCHED_DECODE_STEPS, P - 1))))
        if P > 2 * EDGE:
            items.append(positions_item(runner, one, P))
    return items


def plan_groups(cfg: GAMConfig, items: list[Item], used: dict) -> dict[str, list[Item]]:
    """Each group's items (:data:`GROUPS`): every item a measure of the group reads, and every candidate of the
    group's limits; a group none of whose goals can be scored (an item missing) is left out."""
    by_name = {n: i for i in items for n in (i.name, *i.names)}
    out = {}
    for group, limits in GROUPS.items():
        mine = [m for m in measures(cfg) if m.group == group]
        if not any(m.bound is not None and m.scorable(by_name) for m in mine):
            continue
        names = [n for lim in limits for n, _ in used.get(lim, [])]
        names += [n for m in mine for n in (*m.needs, *m.either) if n in by_name]
        out[group] = list({id(by_name[n]): by_name[n] for n in names}.values())
    return out


def run_rounds(groups: dict[str, list[Item]], rounds: int, say: Progress) -> dict[str, list[dict]]:
    """Time every group's items once per round, the order rotated each round, the groups one after another;
    each round's p50 ms by item."""
    out: dict[str, list[dict]] = {}
    for group, items in groups.items():
        say(f"goals: {group}: {rounds} paired rounds of {len(items)} timings")
        out[group] = []
        for k in range(rounds):
            order = items[k % len(items):] + items[:k % len(items)]
            r = {}
            for item in order:
                samples = item.block()
                r.update({n: float(np.median(s)) * 1e3
                          for n, s in (samples.items() if isinstance(samples, dict) else [(item.name, samples)])})
            out[group].append(r)
    return out


def paired_section(cfg: GAMConfig, runners: dict, limits: dict, threads: int, effort: Effort,
                   say: Progress) -> dict:
    """bench.json's ``paired``: every goal's group timed in ``effort.paired_rounds`` rounds, and the scores.
    ``runners``: the open ONNX Runtime runners by precision (fp32 required; int8, int8-dyn, int4 where run)."""
    from gamexport.bench.kernels import torch_or_none

    runs = effort.paired_runs
    ceilings = ceiling_items(cfg, threads, runs, with_int8=any(p in runners for p in ("int8", "int8-dyn")))
    lim_items, used = limit_items(cfg, limits, threads, runs, ceilings)
    items = [*lim_items, *ceilings.values(), *runner_items(runners, cfg, runs)]
    groups = plan_groups(cfg, items, used)
    torch = torch_or_none()
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(threads)   # the limits' torch kernels run on the run's threads
    try:
        rounds = run_rounds(groups, effort.paired_rounds, say)
    finally:
        if torch is not None:
            torch.set_num_threads(before)
    for group_rounds in rounds.values():
        for r in group_rounds:
            r["_limits"] = used
    scored = score(cfg, rounds)
    del items, lim_items, ceilings, groups
    gc.collect()
    return {"what": "the goals in groups (each with its limit's candidate kernels, or the ceilings it is divided "
                    f"by), each group's items timed in alternation, one block each per round, {effort.paired_rounds} "
                    "rounds (order rotated); a goal's value from each item's fastest block (a block: the median of "
                    "its calls), its runner_up from each item's second fastest; met when both meet it, not met when "
                    "both miss it, else on the line",
            "rounds": effort.paired_rounds, "runs_per_block": runs,
            "limits_used": {k: [n for n, _ in v] for k, v in used.items()},
            "timings_ms": {group: {name: [r[name] for r in rs] for name in rs[0] if not name.startswith("_")}
                           for group, rs in rounds.items() if rs},
            **scored}


def open_paired_runners(pairs: list[tuple[str, str]], ckpt, folder: Path, threads: int) -> dict:
    """ONNX Runtime runners of the precisions the goals need among ``pairs``, all open at once."""
    from gamexport.bench.runtimes import open_runner

    wanted = ("fp32", "int8", "int8-dyn", "int4")
    return {p: open_runner(rt, p, ckpt, folder, threads) for rt, p in pairs
            if rt == "onnxruntime-cpu" and p in wanted}
