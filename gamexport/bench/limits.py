"""The machine's limits, defined once: measured, kept best-of, checked against the rows, summarised.

Both ``gamexport bench`` and ``gamexport build`` (``BUILD_LIMITS``, ``measure_limits``, ``annotate_latency``,
``limits_summary``) import this module; it imports neither of them. Each limit is the best of several kernels
(``kernels``), all recorded and the winner named, so that no single kernel's weakness passes for the machine's:

* **compute** — GFLOP/s of ONNX Runtime ``MatMul`` with a constant (pre-packed) weight at the model's own prefill
  shapes and at 2048³, the same with the weight a graph input, and ``torch.mm`` 2048³ where torch is installed
  (prefill is measured against it);
* **bandwidth** — GB/s of ONNX Runtime's GEMV ``MatMul`` [1, K]×[K, N] whose weight holds as many fp32 bytes as the
  model has, of the model's own weight MatMuls at M = 1 in one graph (:func:`model_gemvs`), and of a plain
  streaming read of 4× the last-level cache (batch-1 decode is measured against the roofline ``bandwidth ÷ bytes
  of weights a step reads``);
* **batched** — the GEMV's weights at M = 32, ONNX Runtime and ``torch.mm``, and the model's own weight MatMuls at
  M = 32 in one graph (:func:`model_batched`), GFLOP/s (batched decode).

Each INT8 precision (int8, int8-dyn) gets its own compute and batched limit (``compute_by_precision``,
``batched_by_precision``): the best of the fp32 candidates and of the integer GEMM its graphs become in ONNX
Runtime (``kernels.time_int8_matmul``) at the same shapes — at M = 32 over as many int8 weights as the model has.
An integer GEMM does more multiply-adds per second than an fp32 one (measured on an AVX2 host: ~2×), so an INT8
prefill row measured against fp32 kernels alone ran at 1.2–1.3× its "limit". Bandwidth and batched are also
measured over each reduced precision's own weight bytes (``bandwidth_by_precision``): an INT8 model's weights may
fit in cache where fp32's do not.

A row that runs above 1.0 of its limit proves the limit wrong: :func:`check_limits` marks it ``valid: false`` and
names the row.
"""

from __future__ import annotations

from gamexport.bench import kernels
from gamexport.bench.flops import flops_per_token, prefill_flops, weight_bytes_per_step
from gamexport.bench.settings import BATCHED_M, COMPUTE_SHAPE, Effort, Progress
from gamexport.config import GAMConfig
from gamexport.layout import QUANTIZED_PRECISIONS


def bandwidth_shape(nbytes: int, K: int) -> tuple[int, int]:
    """[K, N] fp32 holding about ``nbytes``: K fixed (the model's width), N = round(nbytes / 4 / K)."""
    return K, max(1, round(nbytes / 4 / K))


def prefill_shapes(cfg: GAMConfig) -> list[tuple[str, int, int]]:
    """(name, K, N) of the model's own large prefill MatMuls: gate, FFN up and down, and the tied head when its
    weight is at least the FFN's."""
    d = cfg.d_model
    shapes = [("gate", d, 2 * d), ("ffn up", d, 4 * d), ("ffn down", 4 * d, d)]
    return shapes + ([("head", d, cfg.vocab_size)] if cfg.vocab_size >= 4 * d else [])


def _gflops(entry: dict) -> dict:
    """The entry with its GFLOP/s: its ``flops`` per call where it says, else 2·M·K·N of its ``shape``."""
    flops = entry.get("flops") or 2 * entry["shape"][0] * entry["shape"][1] * entry["shape"][2]
    return {**entry, "gflops": flops / (entry["p50_ms"] / 1e3) / 1e9}


def _gbps(entry: dict, nbytes: int) -> dict:
    return {**entry, "bytes": int(nbytes), "gbps": nbytes / (entry["p50_ms"] / 1e3) / 1e9}


def compute_candidates(cfg: GAMConfig, threads: int, effort: Effort, say: Progress) -> list[dict]:
    """Every GEMM the compute limit is the best of: ONNX Runtime with a constant (pre-packed) weight at the
    model's own prefill shapes (T = min(256, P)) and at 2048³, ONNX Runtime with the weight a graph input at
    2048³, and ``torch.mm`` 2048³ where torch is installed."""
    T = min(256, cfg.max_positions)
    M, K, N = COMPUTE_SHAPE
    out = []
    for name, Kp, Np in prefill_shapes(cfg):
        say(f"limits: compute, onnxruntime MatMul {name} {T}×{Kp}×{Np}, constant weight, {threads} threads")
        out.append({"name": f"onnxruntime {name} {T}x{Kp}x{Np}", **kernels.time_matmul(T, Kp, Np, threads, effort)})
    say(f"limits: compute, onnxruntime MatMul {M}×{K}×{N}, constant weight and graph input")
    out.append({"name": f"onnxruntime {M}x{K}x{N}", **kernels.time_matmul(M, K, N, threads, effort)})
    out.append({"name": f"onnxruntime {M}x{K}x{N} inputs",
                **kernels.time_matmul(M, K, N, threads, effort, constant=False)})
    torch = kernels.torch_or_none()
    if torch is not None:
        say(f"limits: compute, torch.mm {M}×{K}×{N}")
        out.append({"name": f"torch.mm {M}x{K}x{N}", **kernels.time_torch_mm(torch, M, K, N, threads, effort)})
    return [_gflops(c) for c in out]


def int8_compute_candidates(cfg: GAMConfig, precision: str, threads: int, effort: Effort,
                            say: Progress) -> list[dict]:
    """The integer GEMM an INT8 ``precision``'s graphs run (:func:`kernels.time_int8_matmul`) at the model's own
    prefill shapes (T = min(256, P)), with constant weights."""
    T = min(256, cfg.max_positions)
    out = []
    for name, Kp, Np in prefill_shapes(cfg):
        say(f"limits: compute, onnxruntime {precision} MatMul {name} {T}×{Kp}×{Np}, {threads} threads")
        out.append({"name": f"onnxruntime {precision} {name} {T}x{Kp}x{Np}",
                    **kernels.time_int8_matmul(precision, T, Kp, Np, threads, effort)})
    return [_gflops(c) for c in out]


def int8_batched_candidates(precision: str, nbytes: int, K: int, threads: int, effort: Effort,
                            say: Progress) -> list[dict]:
    """The integer GEMM of an INT8 ``precision`` at M = BATCHED_M over ``nbytes`` of int8 weights [K, N]."""
    N = max(1, round(nbytes / K))
    say(f"limits: batched, onnxruntime {precision} MatMul {BATCHED_M}×{K}×{N}")
    return [_gflops({"name": f"onnxruntime {precision} {BATCHED_M}x{K}x{N}",
                     **kernels.time_int8_matmul(precision, BATCHED_M, K, N, threads, effort)})]


def bandwidth_candidates(nbytes: int, K: int, threads: int, effort: Effort, say: Progress,
                         read_bytes: int | None = None) -> list[dict]:
    """ONNX Runtime's GEMV [1, K]×[K, N] over ``nbytes`` of fp32 weights, and a plain streaming read of
    ``read_bytes`` (default: the same bytes)."""
    Kb, Nb = bandwidth_shape(nbytes, K)
    read_bytes = read_bytes or Kb * Nb * 4
    say(f"limits: bandwidth, onnxruntime MatMul [1,{Kb}]×[{Kb},{Nb}] ({Kb * Nb * 4 / 1e6:.1f} MB of fp32 weights) "
        f"and a streaming read of {read_bytes / 1e6:.1f} MB")
    gemv = _gbps({"name": f"onnxruntime GEMV 1x{Kb}x{Nb}", **kernels.time_matmul(1, Kb, Nb, threads, effort)},
                 Kb * Nb * 4)
    stream = kernels.time_stream(read_bytes, threads, effort)
    nread = stream["shape"][0] * 4
    size = f"{nread / 1e6:.1f} MB" if nread >= 1e6 else f"{nread / 1e3:.1f} kB"
    stream = _gbps({"name": f"stream read {size}", **stream}, nread)
    return [gemv, stream]


def model_gemvs(cfg: GAMConfig, threads: int, effort: Effort, say: Progress) -> dict:
    """The fp32 bandwidth candidate that reads as the model does: its weight MatMuls at M = 1 in one graph
    (:func:`kernels.time_weight_matmuls`, the ceilings' kernel). A run where that kernel, timed again by the
    ceilings, beat the other candidates had its bandwidth limit invalid; as a candidate it makes the limit the
    strongest streaming read measured."""
    say("limits: bandwidth, the model's fp32 weight MatMuls at M = 1 in one graph")
    timing = kernels.time_weight_matmuls(cfg, threads, effort)
    return _gbps({"name": f"onnxruntime weight GEMVs ×{timing['shape'][1]}", **timing}, timing["bytes"])


def model_batched(cfg: GAMConfig, threads: int, effort: Effort, say: Progress, kind: str = "fp32") -> dict:
    """The batched candidate that multiplies as a batched decode step does: the model's weight MatMuls at
    M = BATCHED_M in one graph (the ceilings' kernel at M = 32; ``kind`` int8 for the INT8 precisions' batched
    limits). The ceilings time that kernel anyway, and on 2026-12-03 it beat the fp32 batched limit and int8-dyn's
    without being among their candidates, which left those limits invalid."""
    say(f"limits: batched, the model's {kind} weight MatMuls at M = {BATCHED_M} in one graph")
    timing = kernels.time_weight_matmuls(cfg, threads, effort, BATCHED_M, kind)
    label = "" if kind == "fp32" else f" {kind}"
    return _gflops({"name": f"onnxruntime{label} weight MatMuls ×{timing['shape'][1]} M{BATCHED_M}", **timing})


def batched_candidates(K: int, N: int, threads: int, effort: Effort, say: Progress) -> list[dict]:
    """The bandwidth limit's weights at M = BATCHED_M: ONNX Runtime with the weight constant, and ``torch.mm``
    where torch is installed."""
    say(f"limits: batched, the same weights at M = {BATCHED_M}")
    out = [{"name": f"onnxruntime {BATCHED_M}x{K}x{N}", **kernels.time_matmul(BATCHED_M, K, N, threads, effort)}]
    torch = kernels.torch_or_none()
    if torch is not None:
        timing = kernels.time_torch_mm(torch, BATCHED_M, K, N, threads, effort)
        out.append({"name": f"torch.mm {BATCHED_M}x{K}x{N}", **timing})
    return [_gflops(c) for c in out]


def best_of(candidates: list[dict], key: str) -> dict:
    """A limit: the fields of the candidate that reached the most ``key`` (``gflops`` or ``gbps``), which one it
    was (``best``), every candidate, and ``valid`` (until a row beats it, see :func:`check_limits`)."""
    winner = max(candidates, key=lambda c: c[key])
    return {**winner, "best": winner["name"], "candidates": candidates, "valid": True, "beaten_by": []}


def measure_limits(cfg: GAMConfig, precisions: tuple[str, ...], threads: int, effort: Effort,
                   say: Progress) -> dict:
    """The machine's limits (see the module docstring), each the best of several kernels measured now, plus the
    bandwidth and the batched limit at each reduced precision's byte count (its decode limits: an INT8 model's
    weights may fit in cache where fp32's do not) and the compute and batched limits of each INT8 precision with
    its integer GEMM among the candidates."""
    compute = best_of(compute_candidates(cfg, threads, effort, say), "gflops")
    model_bytes = 4 * cfg.n_params()
    bandwidth = best_of([*bandwidth_candidates(model_bytes, cfg.d_model, threads, effort, say,
                                               read_bytes=kernels.stream_bytes()),
                         model_gemvs(cfg, threads, effort, say)], "gbps")
    Kb, Nb = bandwidth_shape(model_bytes, cfg.d_model)
    batched = best_of([*batched_candidates(Kb, Nb, threads, effort, say),
                       model_batched(cfg, threads, effort, say)], "gflops")

    by_precision: dict[str, dict] = {"fp32": {"bytes": bandwidth["bytes"], "gbps": bandwidth["gbps"],
                                              "shape": bandwidth["shape"], "same_as": "bandwidth"}}
    batched_by: dict[str, dict] = {"fp32": {"gflops": batched["gflops"], "shape": batched["shape"],
                                            "same_as": "batched"}}
    compute_by: dict[str, dict] = {"fp32": {"gflops": compute["gflops"], "shape": compute["shape"],
                                            "same_as": "compute"}}
    done: dict[int, tuple[list, list]] = {}   # fp32 candidates over a byte count, shared by its precisions
    int8_model: dict | None = None            # the model's int8 weight MatMuls at M = 32, shared by int8 flavours
    for p in precisions:
        if p == "fp32" or p == "bf16":
            continue
        nbytes = weight_bytes_per_step(cfg, p)
        Kp, Np = bandwidth_shape(nbytes, cfg.d_model)
        if Kp * Np not in done:
            say(f"limits: bandwidth and batched over the {p} weights' bytes")
            done[Kp * Np] = (bandwidth_candidates(nbytes, cfg.d_model, threads, effort, say),
                             batched_candidates(Kp, Np, threads, effort, say))
        bw, bat = done[Kp * Np]
        by_precision[p] = best_of(bw, "gbps")
        if p in QUANTIZED_PRECISIONS:
            bat = bat + int8_batched_candidates(p, nbytes, cfg.d_model, threads, effort, say)
            if p in ("int8", "int8-dyn"):   # both run the integer GEMM the int8 ceilings time
                int8_model = int8_model or model_batched(cfg, threads, effort, say, "int8")
                bat = bat + [int8_model]
            compute_by[p] = best_of(compute["candidates"] + int8_compute_candidates(cfg, p, threads, effort, say),
                                    "gflops")
        batched_by[p] = best_of(bat, "gflops")
    return {"compute": compute, "bandwidth": bandwidth, "batched": batched, "bandwidth_by_precision": by_precision,
            "batched_by_precision": batched_by, "compute_by_precision": compute_by}


#: Limits measured again over each reduced precision's weight bytes: table → (the fp32 limit, its unit key).
BY_PRECISION = {"bandwidth_by_precision": ("bandwidth", "gbps"), "batched_by_precision": ("batched", "gflops"),
                "compute_by_precision": ("compute", "gflops")}


def best_limits(first: dict, second: dict) -> dict:
    """Each limit from whichever of two measurements (start and end of a run) reached more: other work on the
    machine only ever lowers a limit, and a lowered limit would flatter every fraction measured against it.
    Each candidate keeps its higher measurement (both in ``measured``); the limit is again the best candidate,
    and records its own two values (``measured``) and which one it kept (``kept``)."""
    keys = {"compute": "gflops", "bandwidth": "gbps", "batched": "gflops"}

    def higher(a: dict, b: dict, key: str) -> dict:
        return {**(b if b[key] > a[key] else a), "measured": {"start": a[key], "end": b[key]}}

    def pick(a: dict, b: dict, key: str) -> dict:
        ends = {c["name"]: c for c in b["candidates"]}
        merged = [higher(c, ends[c["name"]], key) if c["name"] in ends else c for c in a["candidates"]]
        best = best_of(merged, key)
        best.update(measured={"start": a[key], "end": b[key]}, kept="end" if b[key] > a[key] else "start")
        return best

    out = {name: pick(first[name], second[name], key) for name, key in keys.items()}
    for table, (name, key) in BY_PRECISION.items():
        if table not in first:
            continue
        by_precision = {}
        for p, entry in first[table].items():
            if entry.get("same_as") == name:
                by_precision[p] = {**entry, key: out[name][key]}
            else:
                by_precision[p] = pick(entry, second[table][p], key)
        out[table] = by_precision
    return out


#: A row faster than this fraction of its limit proves the limit wrong (not the row fast).
FRACTION_MAX = 1.0


def fraction(achieved: float, limit: float) -> float:
    """achieved ÷ limit (0 where the limit is not positive)."""
    return achieved / limit if limit > 0 else 0.0


def prefill_against_limit(cfg: GAMConfig, batch: int, seq_len: int, p50_ms: float, limits: dict,
                          precision: str = "fp32", head_positions: str = "all") -> dict:
    """A prefill timing as achieved GFLOP/s and its fraction of the compute limit of its precision
    (``limits.compute_by_precision``: an INT8 precision's includes its integer GEMM; the fp32 one otherwise);
    FLOPs as :func:`gamexport.bench.flops.prefill_flops` counts them for ``head_positions``."""
    flops = prefill_flops(cfg, batch, seq_len, head_positions)
    achieved = flops / (p50_ms / 1e3) / 1e9
    limit = (limits.get("compute_by_precision") or {}).get(precision, limits["compute"])["gflops"]
    return {"flops": flops, "achieved": achieved, "unit": "GFLOP/s", "limit": "compute", "limit_value": limit,
            "fraction": fraction(achieved, limit)}


def decode_against_limit(cfg: GAMConfig, precision: str, p50_ms: float, limits: dict) -> dict:
    """A batch-1 decode step's timing as tokens/s and its fraction of the bandwidth roofline (bandwidth ÷ bytes of
    weights one step reads, at the precision's own bandwidth measurement)."""
    nbytes = weight_bytes_per_step(cfg, precision)
    by_precision = limits["bandwidth_by_precision"]
    bw = by_precision.get(precision, by_precision["fp32"])["gbps"]
    roofline = bw * 1e9 / nbytes
    tps = 1 / (p50_ms / 1e3)
    return {"bytes_per_step": nbytes, "bandwidth_gbps": bw, "achieved": tps, "unit": "tokens/s",
            "limit": "bandwidth-roofline", "limit_value": roofline, "fraction": fraction(tps, roofline)}


def batched_against_limit(cfg: GAMConfig, batch: int, p50_ms: float, limits: dict,
                          precision: str = "fp32") -> dict:
    """A batched decode step's timing as achieved GFLOP/s and its fraction of the batched (M = 32) limit over the
    precision's own weight bytes (``limits.batched_by_precision``; the fp32 one where it has none)."""
    achieved = batch * flops_per_token(cfg)["total"] / (p50_ms / 1e3) / 1e9
    by_precision = limits.get("batched_by_precision") or {}
    limit = by_precision.get(precision, limits["batched"])["gflops"]
    return {"achieved": achieved, "unit": "GFLOP/s", "limit": "batched", "limit_value": limit,
            "fraction": fraction(achieved, limit)}


def row_label(r: dict) -> str:
    """A row's name in ``beaten_by`` and bench.json's ``noisy`` list (runtime, ceiling, scaling or training)."""
    if "M" in r:
        return f"ceiling {r['precision']} weight MatMuls M{r['M']}"
    if "model" in r:
        return f"training {r['model']} B{r['batch']}×{r['T']}"
    if "block" in r:
        return f"scaling {r['block']} {r['mode']} T{r['T']}"
    return f"{r['runtime']} {r['precision']} {r['mode']} {shape_label(r)}"


def shape_label(r: dict) -> str:
    """"B1×256" — and "B1×256 last" for a prefill whose head counts at the last position only (generation's)."""
    return f"B{r['batch']}×{r['seq_len']}" + (" last" if r.get("head_positions") == "last" else "")


def _limit_entries(limits: dict, row: dict) -> list[dict]:
    """The limit entries a row's fraction was measured against: its precision's entry in the limit's
    ``*_by_precision`` table (``limit_precision`` / ``bandwidth_precision`` where a ceiling row names it), and the
    fp32 limit itself where that entry is the same measurement or the table has none."""
    name = row["limit"] if row["limit"] in ("compute", "batched") else "bandwidth"
    by_precision = limits.get(f"{name}_by_precision") or {}
    key = row.get("limit_precision") or row.get("bandwidth_precision") or row.get("precision", "fp32")
    entry = by_precision.get(key, limits[name])
    return [limits[name], entry] if entry.get("same_as") == name else [entry]


def check_limits(limits: dict, rows: list[dict]) -> list[dict]:
    """Mark every limit that a row beats (fraction > 1: the machine did more than its "limit") ``valid: false``,
    naming the rows in ``beaten_by``; each row measured against an invalid limit gets ``limit_valid: false`` and
    the same names in ``limit_beaten_by``. Returns [{"limit", "beaten_by"}] of the invalid limits."""
    entries = [limits["compute"], limits["bandwidth"], limits["batched"],
               *[e for table in BY_PRECISION for e in (limits.get(table) or {}).values()]]
    for entry in entries:
        entry["valid"], entry["beaten_by"] = True, []
    for row in rows:
        if "fraction" in row and row["fraction"] > FRACTION_MAX:
            for entry in _limit_entries(limits, row):
                entry["valid"] = False
                if row_label(row) not in entry["beaten_by"]:
                    entry["beaten_by"].append(row_label(row))
    for row in rows:
        if "fraction" in row:
            beaten = [name for e in _limit_entries(limits, row) for name in e["beaten_by"]]
            row.pop("limit_beaten_by", None)
            row["limit_valid"] = not beaten
            if beaten:
                row["limit_beaten_by"] = list(dict.fromkeys(beaten))
    return invalid_limits(limits)


def invalid_limits(limits: dict) -> list[dict]:
    """[{"limit", "beaten_by"}] of the limits :func:`check_limits` marked invalid ([] when all hold)."""
    invalid = [{"limit": name, "beaten_by": limits[name]["beaten_by"]}
               for name in ("compute", "bandwidth", "batched") if not limits[name].get("valid", True)]
    invalid += [{"limit": f"{table}.{p}", "beaten_by": e["beaten_by"]}
                for table, (name, _) in BY_PRECISION.items() for p, e in (limits.get(table) or {}).items()
                if not e.get("valid", True) and e.get("same_as") != name]
    return invalid


#: The build measures the limits with fewer runs than ``gamexport bench`` (it is a build, not a benchmark).
BUILD_LIMITS = Effort(limit_runs=5, limit_warmup=1, runs=10, warmup=2, max_seconds=10.0, batched_decode_steps=16,
                      scaling_runs=0, scaling_max_seconds=0.0, help_runs=0, first_token_runs=0, startup_warmup=0,
                      training_runs=0)


def limits_summary(limits: dict) -> dict:
    """The limits as the build report's ``machine.limits`` carries them: values, the kernel each came from, and
    whether any latency row beat them (:func:`check_limits`, run by :func:`annotate_latency`)."""
    invalid = invalid_limits(limits)
    return {"compute_gflops": limits["compute"]["gflops"], "bandwidth_gbps": limits["bandwidth"]["gbps"],
            "batched_gflops": limits["batched"]["gflops"],
            "bandwidth_by_precision_gbps": {p: v["gbps"] for p, v in limits["bandwidth_by_precision"].items()},
            "compute_by_precision_gflops": {p: v["gflops"]
                                            for p, v in (limits.get("compute_by_precision") or {}).items()},
            "best": {name: limits[name]["best"] for name in ("compute", "bandwidth", "batched")},
            "valid": not invalid, "invalid": invalid,
            "definition": "the best of several kernels measured in this run: compute of ONNX Runtime MatMul with "
                          f"constant weights at the model's prefill shapes and at {'x'.join(map(str, COMPUTE_SHAPE))}"
                          " (also with the weight a graph input) and torch.mm; bandwidth of ONNX Runtime's GEMV "
                          "over the model's weight bytes, of the model's own weight MatMuls at M=1 and a streaming "
                          f"read of 4x the last-level cache; batched the same weights at M={BATCHED_M} and the "
                          "model's own weight MatMuls there; each INT8 precision's compute and batched limits also "
                          "count its integer GEMM (Q/DQ MatMul or DynamicQuantizeLinear + MatMulInteger) at the "
                          "same shapes; medians (see docs/benchmarks.md)"}


def annotate_latency(rows: list[dict], cfg: GAMConfig, limits: dict) -> None:
    """Add achieved / limit / fraction to the build's CPU latency rows (GPU rows have no CPU limit to meet), and
    mark any limit a row beats invalid (:func:`check_limits`)."""
    for row in rows:
        if row["runtime"] not in ("eager", "onnxruntime-cpu"):      # the build's eager runner is on the CPU
            continue
        if row["mode"] == "prefill":
            row.update(prefill_against_limit(cfg, row["batch"], row["seq_len"], row["p50_ms"], limits,
                                             row["precision"], row.get("head_positions", "all")))
        elif row["batch"] == 1:
            row.update(decode_against_limit(cfg, row["precision"], row["p50_ms"], limits))
    check_limits(limits, rows)
