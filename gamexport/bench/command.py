"""``gamexport bench``: how close each runtime and precision runs to this machine's limits, measured in one run.

The yardstick is not "faster than eager PyTorch" but the fraction of what the machine can do, measured in the same
process with the same threads. Each limit is the best of several kernels (all recorded, the winner named), so that
no single kernel's weakness passes for the machine's:

* **compute** — GFLOP/s of ONNX Runtime ``MatMul`` with a constant (pre-packed) weight at the model's own prefill
  shapes and at 2048³, the same with the weight a graph input, and ``torch.mm`` 2048³ where torch is installed
  (prefill is measured against it);
* **bandwidth** — GB/s of ONNX Runtime's GEMV ``MatMul`` [1, K]×[K, N] whose weight holds as many fp32 bytes as the
  model has, and of a plain streaming read of 4× the last-level cache (batch-1 decode is measured against the
  roofline ``bandwidth ÷ bytes of weights a step reads``);
* **batched** — the GEMV's weights at M = 32, ONNX Runtime and ``torch.mm``, GFLOP/s (batched decode).

A row that runs above 1.0 of its limit proves the limit wrong: :func:`check_limits` marks it ``valid: false`` and
names the row. Each kernel is the median of ≥ 20 runs (fewer with ``quick``). Timings are benchmarks, never
pass/fail: every row carries the harness's spread and ``noisy`` flag (:mod:`gamexport.bench`), ``bench.json`` lists
the noisy rows, and ``load`` records the CPU time other processes took during the run.

The scaling section is the paper's Table 2 protocol at CPU scale: one GAM block and one Transformer block
(pre-LN, 8 heads, ``scaled_dot_product_attention``), d 512, B 1, T from 256 to 8192, forward and
forward+backward, both in PyTorch; each point runs in a fresh process forked from a "zygote" that has only
imported torch (so the import is paid once), and its peak memory is that process's ``VmHWM`` after a reset
through ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from gamexport import __version__
from gamexport.config import GAMConfig
from gamexport.errors import GamexportError, InputError

SCHEMA_VERSION = 1
BENCH_FILE = "bench.json"
SCALING_PLOT = "scaling.png"
FRACTIONS_PLOT = "fractions.png"

#: Sections a run can skip (the limits are always measured: every fraction needs them).
SECTIONS = ("prefill", "decode", "ceilings", "scaling", "training", "startup")
#: ONNX Runtime CPU precisions the bench measures (bf16 has no CPU kernels: a skipped row says so).
PRECISIONS = ("fp32", "fp16", "int8", "int8-dyn")
#: Bytes per stored element of the weights a MatMul reads, per precision.
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int8-dyn": 1}

# ---- the machine's limits (defined here, once) and the shapes measured against them ---------------------------
COMPUTE_SHAPE = (2048, 2048, 2048)   # M, K, N of the compute limit
BATCHED_M = 32                       # rows of the batched limit (the bandwidth limit's weights)
STREAM_FALLBACK_BYTES = 256 * 2**20  # streaming read where the last-level cache's size is unknown
PREFILL_LENGTHS = (64, 256)          # batch-1 prefill lengths, capped at P
BATCHED_PREFILL = 8                  # batch of the batched prefill, at T = min(256, P)
DECODE_BATCHES = (8, 32)             # batched decode, against the batched (M = 32) limit
EDGE = 32                            # decode: medians of the first and last EDGE positions
# Scaling (the paper's Table 2 protocol at CPU scale).
SCALING_D = 512
SCALING_HEADS = 8
SCALING_SLOTS = 512
SCALING_KERNEL = 3
SCALING_MIN_T = 256
SCALING_MAX_T = 8192
# Training throughput (GAM vs the width-matched Transformer at the bench's model config).
TRAIN_BATCH = 4
TRAIN_SEQ = 256                      # capped at the model's max_positions

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Effort:
    """How many runs each kind of measurement takes."""

    limit_runs: int
    limit_warmup: int
    runs: int
    warmup: int
    max_seconds: float
    batched_decode_steps: int
    scaling_runs: int
    scaling_max_seconds: float
    help_runs: int
    first_token_runs: int
    startup_warmup: int
    training_runs: int


FULL = Effort(limit_runs=20, limit_warmup=3, runs=20, warmup=2, max_seconds=30.0, batched_decode_steps=64,
              scaling_runs=10, scaling_max_seconds=30.0, help_runs=5, first_token_runs=3, startup_warmup=1,
              training_runs=5)
QUICK = Effort(limit_runs=2, limit_warmup=1, runs=5, warmup=1, max_seconds=2.0, batched_decode_steps=16,
               scaling_runs=2, scaling_max_seconds=3.0, help_runs=2, first_token_runs=1, startup_warmup=0,
               training_runs=2)


@dataclass
class BenchOptions:
    source: str | None = None        # checkpoint, folder holding one, or a build folder; None: seeded --preset
    preset: str | None = None        # seeded weights of this preset when no source is given (default paper)
    out: Path = Path("gamexport-bench")
    threads: int = 2
    precisions: tuple[str, ...] = PRECISIONS
    compile: bool = False            # also time torch.compile (minutes to compile on CPU)
    quick: bool = False
    min_t: int | None = None         # scaling: shortest T (default min(256, max_t))
    max_t: int = SCALING_MAX_T
    skip: tuple[str, ...] = ()
    progress: Progress = field(default=lambda msg: None)


# ---- FLOPs and bytes -------------------------------------------------------------------------------------------
def flops_per_token(cfg: GAMConfig) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) one token costs in the GAM model, by term, and their total.

    Per layer: memory read 4·S·d (``h·Mᵀ`` and ``softmax·M``), gate 4·d² (``Linear(d, 2d)``), FFN 16·d²
    (``d→4d→d``), depthwise conv 2·k·d; once: the tied head 2·V·d. LayerNorm, softmax, sigmoid, GELU, biases and
    the embedding gathers are not counted. The graphs (and eager PyTorch) compute the head at every position.
    """
    d, L, S, k, V = cfg.d_model, cfg.n_layers, cfg.n_slots, cfg.kernel_size, cfg.vocab_size
    terms = {"memory_read": L * 4 * S * d, "gate": L * 4 * d * d, "ffn": L * 16 * d * d, "conv": L * 2 * k * d,
             "head": 2 * V * d}
    return {**terms, "total": sum(terms.values())}


def gam_block_flops(T: int, d: int = SCALING_D, slots: int = SCALING_SLOTS, kernel: int = SCALING_KERNEL) -> int:
    """Forward FLOPs of one GAM block over T tokens: T·(4·S·d + 20·d² + 2·k·d)."""
    return T * (4 * slots * d + 20 * d * d + 2 * kernel * d)


def transformer_block_flops(T: int, d: int = SCALING_D) -> int:
    """Forward FLOPs of one pre-LN Transformer block over T tokens: T·(24·d² + 2·T·d).

    24·d²: QKV 6·d², output projection 2·d², MLP 16·d². Causal attention: ``QKᵀ`` and ``AV`` over the T/2 keys a
    query sees on average, 2 × 2·d·T/2 = 2·T·d per token (the count behind GAM's 2.33× FLOP advantage at T = 8192).
    """
    return T * (24 * d * d + 2 * T * d)


def matmul_weight_elements(cfg: GAMConfig) -> int:
    """Elements of the weights the model multiplies with: per layer M (S·d), gate (2·d²), FFN (8·d²); the head."""
    d = cfg.d_model
    return cfg.n_layers * (cfg.n_slots * d + 2 * d * d + 8 * d * d) + cfg.vocab_size * d


def weight_bytes_per_step(cfg: GAMConfig, precision: str) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the P−1 position rows it does not use.

    The MatMul weights (memory bank, gate, FFN, tied embedding/head) count at the precision's storage size (plus
    one fp32 scale per output channel for INT8); LayerNorms, biases and the conv stay fp32. A graph that reads a
    weight twice (e.g. M and a folded Mᵀ) or in a wider type than it stores is measured against this, so the
    duplication shows as a lower fraction.
    """
    d, L = cfg.d_model, cfg.n_layers
    used = cfg.n_params() - (cfg.max_positions - 1) * d
    mm = matmul_weight_elements(cfg)
    nbytes = (used - mm) * 4 + mm * WEIGHT_BYTES[precision]
    if precision.startswith("int8"):
        nbytes += 4 * (L * (cfg.n_slots + d + 2 * d + 4 * d + d) + cfg.vocab_size)
    return int(nbytes)


def scaling_lengths(min_t: int, max_t: int) -> list[int]:
    """T = min_t, 2·min_t, … ≤ max_t."""
    out, T = [], min_t
    while T <= max_t:
        out.append(T)
        T *= 2
    return out


# ---- options -----------------------------------------------------------------------------------------------------
def check_options(opts: BenchOptions) -> tuple[tuple[str, ...], int, int]:
    """(precisions, min_t, max_t) after checking every option; one-line InputError for a bad one."""
    from gamexport.limits import MAX_SCALING_T, MAX_THREADS, check_range

    if not isinstance(opts.threads, int):
        raise InputError(f"--threads must be an integer, got {opts.threads!r}", "e.g. --threads 2")
    check_range("--threads", opts.threads, 1, MAX_THREADS)
    unknown = [p for p in opts.precisions if p not in PRECISIONS + ("bf16",)]
    if unknown:
        raise InputError(f"unknown precision {unknown[0]!r}", f"choose from {', '.join(PRECISIONS)}")
    if not opts.precisions:
        raise InputError("no precision given", f"pass --precision with some of {', '.join(PRECISIONS)}")
    bad = [s for s in opts.skip if s not in SECTIONS]
    if bad:
        raise InputError(f"unknown section {bad[0]!r} in --skip", f"choose from {', '.join(SECTIONS)}")
    check_range("--max-t", opts.max_t, 1, MAX_SCALING_T)
    min_t = opts.min_t if opts.min_t is not None else min(SCALING_MIN_T, opts.max_t)
    if min_t < 1 or min_t > opts.max_t:
        raise InputError(f"--min-t {min_t} must be between 1 and --max-t {opts.max_t}",
                         "lower --min-t or raise --max-t")
    if opts.source is not None and opts.preset is not None:
        raise InputError("--preset chooses seeded weights and cannot be combined with a SOURCE",
                         "drop --preset (the config comes from the source)")
    if opts.preset is not None:
        from gamexport.config import preset

        preset(opts.preset)  # one line for an unknown name, before any work
    ordered = tuple(p for p in PRECISIONS + ("bf16",) if p in opts.precisions)
    return ordered, min_t, opts.max_t


def load_source(source: str | None, preset_name: str | None):
    """A Checkpoint from a build folder (weights read back from its fp32 ``model.onnx``), a checkpoint, or the
    seeded weights of a preset (paper by default). Returns (checkpoint, build folder or None)."""
    from gamexport.checkpoint import Checkpoint, load_checkpoint
    from gamexport.engines.pipeline import seeded_checkpoint
    from gamexport.manifest import MANIFEST_NAME

    if source is None:
        return seeded_checkpoint(preset_name or "paper"), None
    folder = Path(source)
    if folder.is_dir() and (folder / MANIFEST_NAME).is_file():
        import onnx
        from onnx import numpy_helper

        from gamexport.graph.builder import META_SOURCE_SHA, read_graph_config
        from gamexport.manifest import verify

        verify(folder, ["model.onnx"])
        model = onnx.load(str(folder / "model.onnx"))
        cfg, meta = read_graph_config(model)
        weights = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
        info = {}
        if (folder / "config.json").is_file():
            from gamexport.jsonfile import MIB, Obj, read_json

            try:
                info = read_json(folder / "config.json", schema=Obj(), max_bytes=MIB)
            except (OSError, GamexportError):
                info = {}
        meta_out = {k: info[k] for k in ("trained", "label") if k in info}
        return Checkpoint(config=cfg, weights=weights, source=str(folder), sha256=meta.get(META_SOURCE_SHA, ""),
                          meta=meta_out), folder
    return load_checkpoint(source), None


# ---- limits ------------------------------------------------------------------------------------------------------
def _nodes_session(nodes: list, inputs: list, outputs: list, initializers: list, threads: int):
    """An ONNX Runtime CPU session of a hand-written graph (default and com.microsoft opsets), under the session
    options the model graphs get."""
    from onnx import helper

    from gamexport.engines.ort import _import_ort, session_options
    from gamexport.graph.builder import IR_VERSION, OPSET

    ort = _import_ort()
    graph = helper.make_graph(nodes, "bench", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=IR_VERSION)
    data = model.SerializeToString()
    del graph, model
    return ort.InferenceSession(data, sess_options=session_options(threads), providers=["CPUExecutionProvider"])


def _matmul_session(M: int, K: int, N: int, threads: int, seed: int = 0, constant: bool = True):
    """An ONNX Runtime session of one MatMul [M, K]×[K, N]: the [K, N] weight an initializer (``constant``: ONNX
    Runtime pre-packs it once, as it does the model's weights), or a second graph input (packed on every call)."""
    from onnx import TensorProto, helper, numpy_helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [M, N])
    node = helper.make_node("MatMul", ["a", "w"], ["c"])
    if not constant:
        return _nodes_session([node], [a, helper.make_tensor_value_info("w", TensorProto.FLOAT, [K, N])], [c], [],
                              threads)
    w = (np.random.default_rng(seed).standard_normal((K, N), dtype=np.float32) * 0.02)
    return _nodes_session([node], [a], [c], [numpy_helper.from_array(w, "w")], threads)


def _timed(fn: Callable[[], object], effort: Effort) -> dict:
    """The limit harness: ``effort.limit_runs`` timed calls after ``effort.limit_warmup`` untimed ones."""
    from gamexport.bench import measure

    return measure(fn, warmup=effort.limit_warmup, runs=effort.limit_runs,
                   max_seconds=max(effort.max_seconds, 10.0)).as_dict()


def _time_matmul(M: int, K: int, N: int, threads: int, effort: Effort, constant: bool = True) -> dict:
    """Time an ONNX Runtime MatMul (see :func:`_matmul_session`); the timing, its shape and engine."""
    session = _matmul_session(M, K, N, threads, constant=constant)
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((M, K), dtype=np.float32)}
    if not constant:
        feeds["w"] = rng.standard_normal((K, N), dtype=np.float32) * 0.02
    timing = _timed(lambda: session.run(None, feeds), effort)
    del session
    gc.collect()
    engine = "onnxruntime-cpu MatMul fp32" + ("" if constant else ", weight a graph input (not pre-packed)")
    return {"shape": [M, K, N], "engine": engine, **timing}


def _torch_or_none():
    """torch, imported only where it is installed (an edge box running the bench may not have it)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


def _with_torch_threads(torch, threads: int, fn: Callable[[], dict]) -> dict:
    """``fn()`` with torch on ``threads`` intra-op threads, the previous setting restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _time_torch_mm(torch, M: int, K: int, N: int, threads: int, effort: Effort) -> dict:
    """Time ``torch.mm`` [M, K]×[K, N] fp32 on ``threads`` threads."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g) * 0.02
    timing = _with_torch_threads(torch, threads, lambda: _timed(lambda: torch.mm(a, w), effort))
    del a, w
    return {"shape": [M, K, N], "engine": f"torch {torch.__version__} torch.mm fp32", **timing}


def _time_stream(nbytes: int, threads: int, effort: Effort) -> dict:
    """Time a plain streaming read of ``nbytes`` of float32: ``torch.sum`` on ``threads`` threads where torch is
    installed, else numpy's sum (single-threaded: a weak limit on more than one core, and it says so)."""
    n = max(1, nbytes // 4)
    torch = _torch_or_none()
    if torch is not None:
        x = torch.ones(n, dtype=torch.float32)
        timing = _with_torch_threads(torch, threads, lambda: _timed(lambda: torch.sum(x), effort))
        engine = f"torch {torch.__version__} torch.sum over float32, {threads} threads"
    else:
        x = np.ones(n, dtype=np.float32)
        timing = _timed(lambda: np.add.reduce(x), effort)
        engine = "numpy sum over float32 (single-threaded: a weak limit; install torch for a threaded read)"
    del x
    gc.collect()
    return {"shape": [n], "engine": engine, **timing}


def bandwidth_shape(nbytes: int, K: int) -> tuple[int, int]:
    """[K, N] fp32 holding about ``nbytes``: K fixed (the model's width), N = round(nbytes / 4 / K)."""
    return K, max(1, round(nbytes / 4 / K))


def stream_bytes() -> int:
    """Bytes the streaming-read bandwidth candidate reads: 4 × the last-level cache, 256 MB where its size is
    unknown (so the read comes from memory, not from cache)."""
    from gamexport.bench import llc_bytes

    llc = llc_bytes()
    return 4 * llc if llc else STREAM_FALLBACK_BYTES


def prefill_shapes(cfg: GAMConfig) -> list[tuple[str, int, int]]:
    """(name, K, N) of the model's own large prefill MatMuls: gate, FFN up and down, and the tied head when its
    weight is at least the FFN's."""
    d = cfg.d_model
    shapes = [("gate", d, 2 * d), ("ffn up", d, 4 * d), ("ffn down", 4 * d, d)]
    return shapes + ([("head", d, cfg.vocab_size)] if cfg.vocab_size >= 4 * d else [])


def _gflops(entry: dict) -> dict:
    M, K, N = entry["shape"]
    return {**entry, "gflops": 2 * M * K * N / (entry["p50_ms"] / 1e3) / 1e9}


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
        out.append({"name": f"onnxruntime {name} {T}x{Kp}x{Np}", **_time_matmul(T, Kp, Np, threads, effort)})
    say(f"limits: compute, onnxruntime MatMul {M}×{K}×{N}, constant weight and graph input")
    out.append({"name": f"onnxruntime {M}x{K}x{N}", **_time_matmul(M, K, N, threads, effort)})
    out.append({"name": f"onnxruntime {M}x{K}x{N} inputs",
                **_time_matmul(M, K, N, threads, effort, constant=False)})
    torch = _torch_or_none()
    if torch is not None:
        say(f"limits: compute, torch.mm {M}×{K}×{N}")
        out.append({"name": f"torch.mm {M}x{K}x{N}", **_time_torch_mm(torch, M, K, N, threads, effort)})
    return [_gflops(c) for c in out]


def bandwidth_candidates(nbytes: int, K: int, threads: int, effort: Effort, say: Progress,
                         read_bytes: int | None = None) -> list[dict]:
    """ONNX Runtime's GEMV [1, K]×[K, N] over ``nbytes`` of fp32 weights, and a plain streaming read of
    ``read_bytes`` (default: the same bytes)."""
    Kb, Nb = bandwidth_shape(nbytes, K)
    read_bytes = read_bytes or Kb * Nb * 4
    say(f"limits: bandwidth, onnxruntime MatMul [1,{Kb}]×[{Kb},{Nb}] ({Kb * Nb * 4 / 1e6:.1f} MB of fp32 weights) "
        f"and a streaming read of {read_bytes / 1e6:.1f} MB")
    gemv = _gbps({"name": f"onnxruntime GEMV 1x{Kb}x{Nb}", **_time_matmul(1, Kb, Nb, threads, effort)}, Kb * Nb * 4)
    stream = _time_stream(read_bytes, threads, effort)
    nread = stream["shape"][0] * 4
    size = f"{nread / 1e6:.1f} MB" if nread >= 1e6 else f"{nread / 1e3:.1f} kB"
    stream = _gbps({"name": f"stream read {size}", **stream}, nread)
    return [gemv, stream]


def batched_candidates(K: int, N: int, threads: int, effort: Effort, say: Progress) -> list[dict]:
    """The bandwidth limit's weights at M = BATCHED_M: ONNX Runtime with the weight constant, and ``torch.mm``
    where torch is installed."""
    say(f"limits: batched, the same weights at M = {BATCHED_M}")
    out = [{"name": f"onnxruntime {BATCHED_M}x{K}x{N}", **_time_matmul(BATCHED_M, K, N, threads, effort)}]
    torch = _torch_or_none()
    if torch is not None:
        out.append({"name": f"torch.mm {BATCHED_M}x{K}x{N}", **_time_torch_mm(torch, BATCHED_M, K, N, threads,
                                                                               effort)})
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
    weights may fit in cache where fp32's do not)."""
    compute = best_of(compute_candidates(cfg, threads, effort, say), "gflops")
    model_bytes = 4 * cfg.n_params()
    bandwidth = best_of(bandwidth_candidates(model_bytes, cfg.d_model, threads, effort, say,
                                             read_bytes=stream_bytes()), "gbps")
    Kb, Nb = bandwidth_shape(model_bytes, cfg.d_model)
    batched = best_of(batched_candidates(Kb, Nb, threads, effort, say), "gflops")

    by_precision: dict[str, dict] = {"fp32": {"bytes": bandwidth["bytes"], "gbps": bandwidth["gbps"],
                                              "shape": bandwidth["shape"], "same_as": "bandwidth"}}
    batched_by: dict[str, dict] = {"fp32": {"gflops": batched["gflops"], "shape": batched["shape"],
                                            "same_as": "batched"}}
    done: dict[int, tuple[dict, dict]] = {}
    for p in precisions:
        if p == "fp32" or p == "bf16":
            continue
        nbytes = weight_bytes_per_step(cfg, p)
        Kp, Np = bandwidth_shape(nbytes, cfg.d_model)
        if Kp * Np not in done:
            say(f"limits: bandwidth and batched over the {p} weights' bytes")
            done[Kp * Np] = (best_of(bandwidth_candidates(nbytes, cfg.d_model, threads, effort, say), "gbps"),
                             best_of(batched_candidates(Kp, Np, threads, effort, say), "gflops"))
        by_precision[p], batched_by[p] = done[Kp * Np]
    return {"compute": compute, "bandwidth": bandwidth, "batched": batched, "bandwidth_by_precision": by_precision,
            "batched_by_precision": batched_by}


# ---- ceilings: the model's weight MatMuls alone -----------------------------------------------------------------
def weight_matmul_shapes(cfg: GAMConfig) -> list[tuple[int, int]]:
    """[K, N] of every weight MatMul of one token's forward pass, as the graphs run them: per layer h·Mᵀ (d, S),
    softmax·M (S, d), gate (d, 2d), FFN (d, 4d) and (4d, d); then the tied head (d, V)."""
    d, S = cfg.d_model, cfg.n_slots
    return [*[(K, N) for _ in range(cfg.n_layers) for K, N in ((d, S), (S, d), (d, 2 * d), (d, 4 * d), (4 * d, d))],
            (d, cfg.vocab_size)]


def _weights_only_session(cfg: GAMConfig, kind: str, threads: int, seed: int = 0):
    """One ONNX Runtime graph holding only the model's weight MatMuls, each fed by a graph input [M, K]:
    ``fp32`` MatMul, or ``int8`` DynamicQuantizeMatMul (int8 weights per output channel, activations quantized
    on the fly — the integer GEMM both of ONNX Runtime's INT8 flavours run)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    for i, (K, N) in enumerate(weight_matmul_shapes(cfg)):
        if kind == "fp32":
            inits.append(numpy_helper.from_array((rng.standard_normal((K, N), dtype=np.float32) * 0.02), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [f"x{K}", f"w{i}"], [f"y{i}"]))
        else:
            inits += [numpy_helper.from_array(rng.integers(-127, 128, (K, N), dtype=np.int8), f"w{i}"),
                      numpy_helper.from_array(np.full((N,), 0.01, np.float32), f"s{i}"),
                      numpy_helper.from_array(np.zeros((N,), np.int8), f"z{i}")]
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [f"x{K}", f"w{i}", f"s{i}", f"z{i}"], [f"y{i}"],
                                          domain="com.microsoft"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    widths = sorted({K for K, _ in weight_matmul_shapes(cfg)})
    inputs = [helper.make_tensor_value_info(f"x{K}", TensorProto.FLOAT, ["M", K]) for K in widths]
    return _nodes_session(nodes, inputs, outputs, inits, threads), widths


def measure_ceilings(cfg: GAMConfig, threads: int, effort: Effort, say: Progress) -> dict:
    """What the kernels allow before any graph overhead: the model's weight MatMuls alone (fp32 MatMul and the
    integer GEMM), at M = 1 (a decode step) and M = min(256, P) (a prefill).

    ``fp32_decode_fraction`` (set by :func:`refit_fractions`, against the run's final limits) is the
    bandwidth-roofline fraction a step would reach if everything but its weight MatMuls were free (h·Mᵀ and
    softmax·M read the memory bank in two layouts, which the roofline counts once);
    ``int8_speedup`` at each M is the fastest INT8 ÷ fp32 a graph built on these kernels can reach.
    """
    from gamexport.bench import measure

    rng = np.random.default_rng(3)
    rows = []
    for kind in ("fp32", "int8"):
        session, widths = _weights_only_session(cfg, kind, threads)
        for M in (1, min(256, cfg.max_positions)):
            say(f"ceilings: the model's {len(weight_matmul_shapes(cfg))} weight MatMuls alone, {kind}, M = {M}")
            feeds = {f"x{K}": rng.standard_normal((M, K), dtype=np.float32) for K in widths}
            timing = measure(lambda: session.run(None, feeds), warmup=effort.warmup, runs=effort.runs,
                             max_seconds=effort.max_seconds)
            rows.append({"precision": kind, "M": M, **timing.as_dict()})
        del session
        gc.collect()
    t = {(r["precision"], r["M"]): r["p50_ms"] for r in rows}
    Ms = sorted({r["M"] for r in rows})
    return {"what": "the model's weight MatMuls (per layer h·Mᵀ, softmax·M, gate, FFN×2; the head) in one ONNX "
                    "Runtime graph, each fed by a graph input, nothing else: fp32 MatMul and int8 "
                    "DynamicQuantizeMatMul",
            "matmuls": len(weight_matmul_shapes(cfg)), "rows": rows,
            "int8_speedup": {str(M): t[("fp32", M)] / t[("int8", M)] for M in Ms}}


def ceiling_decode_fraction(cfg: GAMConfig, ceilings: dict, limits: dict) -> float:
    """The bandwidth-roofline step time over the fp32 weight MatMuls' own time at M = 1."""
    roofline_ms = weight_bytes_per_step(cfg, "fp32") / (limits["bandwidth"]["gbps"] * 1e9) * 1e3
    return roofline_ms / next(r["p50_ms"] for r in ceilings["rows"] if r["precision"] == "fp32" and r["M"] == 1)


# ---- runners -----------------------------------------------------------------------------------------------------
def export_for_bench(ckpt, folder: Path, precisions: tuple[str, ...], say: Progress) -> dict:
    """Write the graphs each precision needs into ``folder`` with gamexport's own builder (INT8 calibrated on
    random token ids — fine for speed, not for accuracy) and ONNX Runtime's dynamic quantizer."""
    from gamexport.graph.builder import export_graphs

    cfg = ckpt.config
    graph_precisions = tuple(p for p in ("fp32", "fp16", "int8") if p == "fp32" or p in precisions)
    calibration = None
    if "int8" in precisions:
        from gamexport.calibration import calibrate

        ids = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(2, cfg.max_positions), dtype=np.int64)
        calibration = calibrate(cfg, ckpt.weights, [ids])
    say(f"export: {', '.join(graph_precisions)} graphs into a temporary folder")
    written = export_graphs(cfg, ckpt.weights, folder, ckpt.sha256, graph_precisions, calibration)
    if "int8-dyn" in precisions:
        from gamexport.engines.ort import write_int8_dynamic

        say("export: int8-dyn graphs (ONNX Runtime's dynamic quantization of the inlined fp32 graphs)")
        for kind in ("model", "step"):
            path = write_int8_dynamic(folder / f"{kind}.inlined.onnx", folder / f"{kind}.int8-dyn.onnx")
            written[path.name] = path
    return written


def runner_plan(precisions: tuple[str, ...], compile: bool) -> tuple[list[tuple[str, str]], list[dict]]:
    """(runtime, precision) pairs this machine runs, and ``skipped`` rows with reasons for the rest."""
    from gamexport.engines.pipeline import UNSUPPORTED

    pairs = [("eager", "fp32")]
    skipped = []
    if compile:
        pairs.append(("eager-compile", "fp32"))
    else:
        skipped.append({"runtime": "eager-compile", "precision": "fp32",
                        "reason": "torch.compile takes minutes to compile on CPU: pass --compile to time it"})
    for p in PRECISIONS + ("bf16",):
        reason = UNSUPPORTED.get(("onnxruntime-cpu", p))
        if reason:
            skipped.append({"runtime": "onnxruntime-cpu", "precision": p, "reason": reason})
        elif p in precisions:
            pairs.append(("onnxruntime-cpu", p))
        else:
            skipped.append({"runtime": "onnxruntime-cpu", "precision": p, "reason": "not requested (--precision)"})
    skipped += gpu_skips()
    return pairs, skipped


def gpu_skips() -> list[dict]:
    """Skipped rows for the GPU runtimes, with the reason this machine cannot (or the bench does not) run them."""
    from gamexport.device import cuda_status

    usable, why = cuda_status()
    if not usable:
        return [{"runtime": r, "reason": f"needs an NVIDIA GPU: {why}"}
                for r in ("onnxruntime-cuda", "onnxruntime-trt", "tensorrt")]
    try:
        import onnxruntime as ort
        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    cpu_build = "onnxruntime-gpu is not installed (this onnxruntime is the CPU build)"
    checks = (("onnxruntime-cuda", "CUDAExecutionProvider" in providers, cpu_build),
              ("onnxruntime-trt", "TensorrtExecutionProvider" in providers, cpu_build),
              ("tensorrt", _has_tensorrt(), "tensorrt is not installed"))
    return [{"runtime": runtime, "reason": missing if not ok else
             f"GPU present ({why}), but bench measures CPU limits only; GPU rows need GPU limits first"}
            for runtime, ok, missing in checks]


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def open_runner(runtime: str, precision: str, ckpt, folder: Path, threads: int):
    from gamexport.graph.builder import graph_file_name

    if runtime in ("eager", "eager-compile"):
        from gamexport.engines.eager import EagerRunner

        return EagerRunner(ckpt.config, ckpt.weights, threads=threads, compile=runtime == "eager-compile")
    from gamexport.engines.ort import OrtRunner

    return OrtRunner(folder / graph_file_name("prefill", precision), folder / graph_file_name("step", precision),
                     ckpt.config, threads, precision=precision)


def _describe(runner) -> dict:
    return {"runtime": runner.runtime, "precision": runner.precision,
            "compute_precision": getattr(runner, "compute_precision", runner.precision),
            **({"matmul_ops": runner.matmul_ops} if getattr(runner, "matmul_ops", None) else {})}


def _fraction(achieved: float, limit: float) -> float:
    return achieved / limit if limit > 0 else 0.0


def prefill_rows(runner, cfg: GAMConfig, limits: dict, effort: Effort, threads: int, say: Progress) -> list[dict]:
    """Batch-1 prefill at T ∈ {64, 256} (capped at P) and batched prefill, against the compute limit."""
    from gamexport.bench import measure

    P = cfg.max_positions
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(BATCHED_PREFILL, P), dtype=np.int64)
    shapes = [(1, T) for T in sorted({min(T, P) for T in PREFILL_LENGTHS})] + [(BATCHED_PREFILL, min(256, P))]
    rows = []
    for B, T in shapes:
        say(f"prefill: {runner.runtime} {runner.precision}, batch {B} × {T} tokens")
        x = np.ascontiguousarray(ids[:B, :T])
        timing = measure(lambda: runner._prefill(x), warmup=effort.warmup, runs=effort.runs,
                         max_seconds=effort.max_seconds)
        rows.append({**_describe(runner), "mode": "prefill", "batch": B, "seq_len": T, **timing.as_dict(),
                     "tokens_per_s": B * T / (timing.p50_ms / 1e3), "head_positions": "all",
                     **prefill_against_limit(cfg, B, T, timing.p50_ms, limits), "threads": threads})
    return rows


def prefill_against_limit(cfg: GAMConfig, batch: int, seq_len: int, p50_ms: float, limits: dict) -> dict:
    """A prefill timing as achieved GFLOP/s and its fraction of the compute limit."""
    flops = batch * seq_len * flops_per_token(cfg)["total"]
    achieved = flops / (p50_ms / 1e3) / 1e9
    limit = limits["compute"]["gflops"]
    return {"flops": flops, "achieved": achieved, "unit": "GFLOP/s", "limit": "compute", "limit_value": limit,
            "fraction": _fraction(achieved, limit)}


def decode_against_limit(cfg: GAMConfig, precision: str, p50_ms: float, limits: dict) -> dict:
    """A batch-1 decode step's timing as tokens/s and its fraction of the bandwidth roofline (bandwidth ÷ bytes of
    weights one step reads, at the precision's own bandwidth measurement)."""
    nbytes = weight_bytes_per_step(cfg, precision)
    by_precision = limits["bandwidth_by_precision"]
    bw = by_precision.get(precision, by_precision["fp32"])["gbps"]
    roofline = bw * 1e9 / nbytes
    tps = 1 / (p50_ms / 1e3)
    return {"bytes_per_step": nbytes, "bandwidth_gbps": bw, "achieved": tps, "unit": "tokens/s",
            "limit": "bandwidth-roofline", "limit_value": roofline, "fraction": _fraction(tps, roofline)}


def batched_against_limit(cfg: GAMConfig, batch: int, p50_ms: float, limits: dict,
                          precision: str = "fp32") -> dict:
    """A batched decode step's timing as achieved GFLOP/s and its fraction of the batched (M = 32) limit over the
    precision's own weight bytes (``limits.batched_by_precision``; the fp32 one where it has none)."""
    achieved = batch * flops_per_token(cfg)["total"] / (p50_ms / 1e3) / 1e9
    by_precision = limits.get("batched_by_precision") or {}
    limit = by_precision.get(precision, limits["batched"])["gflops"]
    return {"achieved": achieved, "unit": "GFLOP/s", "limit": "batched", "limit_value": limit,
            "fraction": _fraction(achieved, limit)}


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


def ceiling_against_limits(cfg: GAMConfig, row: dict, limits: dict) -> dict:
    """A ceilings row against the limit it could beat: at M > 1 its GFLOP/s (the int8 rows count the same FLOPs)
    against compute; at M = 1 the bytes its weights hold (the memory bank twice, as the graph holds it) per second
    against the bandwidth over that precision's bytes. {} for an int8 row at M = 1 when no INT8 bandwidth was
    measured (its weights may sit in cache: the fp32 bandwidth is no limit for them)."""
    elements = sum(K * N for K, N in weight_matmul_shapes(cfg))
    if row["M"] > 1:
        flops = 2 * row["M"] * elements
        achieved, unit, name, limit = flops / (row["p50_ms"] / 1e3) / 1e9, "GFLOP/s", "compute", \
            limits["compute"]["gflops"]
    else:
        by_precision = limits["bandwidth_by_precision"]
        key = "fp32" if row["precision"] == "fp32" else next((p for p in ("int8", "int8-dyn") if p in by_precision),
                                                            None)
        if key is None:
            return {}
        outputs = sum(N for _, N in weight_matmul_shapes(cfg))
        nbytes = 4 * elements if key == "fp32" else elements + 5 * outputs   # int8 weights + fp32 scale + zero point
        achieved, unit, name, limit = nbytes / (row["p50_ms"] / 1e3) / 1e9, "GB/s", "bandwidth", \
            by_precision[key]["gbps"]
        row["bandwidth_precision"] = key
    return {"achieved": achieved, "unit": unit, "limit": name, "limit_value": limit,
            "fraction": _fraction(achieved, limit)}


def refit_fractions(cfg: GAMConfig, limits: dict, prefill: list[dict], decode: list[dict],
                    ceilings: dict | None) -> None:
    """Recompute every row's limit and fraction against ``limits`` (the run's final limits)."""
    for row in prefill:
        row.update(prefill_against_limit(cfg, row["batch"], row["seq_len"], row["p50_ms"], limits))
    for row in decode:
        row.update(decode_against_limit(cfg, row["precision"], row["p50_ms"], limits) if row["batch"] == 1 else
                   batched_against_limit(cfg, row["batch"], row["p50_ms"], limits, row["precision"]))
    if ceilings is not None:
        ceilings["fp32_decode_fraction"] = ceiling_decode_fraction(cfg, ceilings, limits)
        for row in ceilings["rows"]:
            row.update(ceiling_against_limits(cfg, row, limits))


#: A row faster than this fraction of its limit proves the limit wrong (not the row fast).
FRACTION_MAX = 1.0


#: Limits measured again over each reduced precision's weight bytes: table → (the fp32 limit, its unit key).
BY_PRECISION = {"bandwidth_by_precision": ("bandwidth", "gbps"), "batched_by_precision": ("batched", "gflops")}


def _limit_entries(limits: dict, row: dict) -> list[dict]:
    """The limit entries a row's fraction was measured against (a bandwidth or batched row: its precision's entry,
    and the fp32 limit itself where that entry is the same measurement)."""
    if row["limit"] == "compute":
        return [limits["compute"]]
    name = "batched" if row["limit"] == "batched" else "bandwidth"
    by_precision = limits.get(f"{name}_by_precision") or {}
    key = row.get("bandwidth_precision") or row.get("precision", "fp32")
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
                if _row_label(row) not in entry["beaten_by"]:
                    entry["beaten_by"].append(_row_label(row))
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
            "best": {name: limits[name]["best"] for name in ("compute", "bandwidth", "batched")},
            "valid": not invalid, "invalid": invalid,
            "definition": "the best of several kernels measured in this run: compute of ONNX Runtime MatMul with "
                          f"constant weights at the model's prefill shapes and at {'x'.join(map(str, COMPUTE_SHAPE))}"
                          " (also with the weight a graph input) and torch.mm; bandwidth of ONNX Runtime's GEMV "
                          "over the model's weight bytes and a streaming read of 4x the last-level cache; batched "
                          f"the same weights at M={BATCHED_M}; medians (see docs/benchmarks.md)"}


def annotate_latency(rows: list[dict], cfg: GAMConfig, limits: dict) -> None:
    """Add achieved / limit / fraction to the build's CPU latency rows (GPU rows have no CPU limit to meet), and
    mark any limit a row beats invalid (:func:`check_limits`)."""
    for row in rows:
        if row["runtime"] not in ("eager", "onnxruntime-cpu"):      # the build's eager runner is on the CPU
            continue
        if row["mode"] == "prefill":
            row.update(prefill_against_limit(cfg, row["batch"], row["seq_len"], row["p50_ms"], limits))
        elif row["batch"] == 1:
            row.update(decode_against_limit(cfg, row["precision"], row["p50_ms"], limits))
    check_limits(limits, rows)


def _decode_samples(runner, ids: np.ndarray, positions: list[int], warmup: int) -> list[float]:
    """Per-step seconds of one-token decode steps at ``positions`` (state carried), as ``generate`` calls them."""
    B = ids.shape[0]
    _, state0 = runner._prefill(np.ascontiguousarray(ids[:, : positions[0]]))
    pos_arrays = {p: np.full((B, 1), p, np.int64) for p in positions}
    tokens = {p: np.ascontiguousarray(ids[:, p:p + 1]) for p in positions}
    state = state0
    for p in positions[:warmup]:
        _, state = runner._step(tokens[p], pos_arrays[p], state)
    state = state0
    samples = []
    for p in positions:
        t0 = time.perf_counter()
        _, state = runner._step(tokens[p], pos_arrays[p], state)
        samples.append(time.perf_counter() - t0)
    return samples


def decode_rows(runner, cfg: GAMConfig, limits: dict, effort: Effort, threads: int, say: Progress) -> list[dict]:
    """Batch-1 decode over every position 1..P−1 against the bandwidth roofline; batched decode at B = 8 and 32
    against the batched (M = 32) limit."""
    from gamexport.bench import summarize

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
    rows.append({**_describe(runner), "mode": "decode", "batch": 1, "seq_len": 1, "positions": [1, P - 1],
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
        rows.append({**_describe(runner), "mode": "decode", "batch": B, "seq_len": 1, "positions": [1, steps],
                     **timing.as_dict(), "tokens_per_s": B / (timing.p50_ms / 1e3), "flops_per_token": per_token,
                     **batched_against_limit(cfg, B, timing.p50_ms, limits, runner.precision),
                     "threads": threads})
    return rows


# ---- scaling: one GAM block vs one Transformer block -------------------------------------------------------------
def make_transformer_block(d: int = SCALING_D, n_heads: int = SCALING_HEADS):
    """A pre-LN Transformer block: x + proj(SDPA_causal(LN1 x)); x + MLP(LN2 x) with a 4d GELU MLP."""
    import torch.nn as nn
    import torch.nn.functional as F

    class TransformerBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n_heads = n_heads
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            B, T, _ = x.shape                                                      # x: (B, T, d)
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)                       # 3 × (B, T, d)
            q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)            # (B, H, T, d/H)
            x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))                  # (B, T, d)
            return x + self.mlp(self.ln2(x))                                       # (B, T, d)

    return TransformerBlock()


def make_gam_block(d: int = SCALING_D):
    from gamexport.model import GAMBlock

    return GAMBlock(GAMConfig(d_model=d, n_slots=SCALING_SLOTS, kernel_size=SCALING_KERNEL, dropout=0.0))


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


PEAK_METHOD = ("peak RSS of the point's own process: VmHWM from /proc/self/status after resetting it through "
               "/proc/self/clear_refs once the block and input exist (peak_extra_mb = that peak − the RSS then)")
PEAK_FALLBACK = "getrusage(RUSAGE_SELF).ru_maxrss of the point's own process (includes its start-up)"


def scaling_point(spec: dict) -> dict:
    """Time one (block, mode, T) point in this process; runs inside a fresh process (see ``run_scaling``)."""
    import resource

    import torch

    from gamexport.bench import measure

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    T, d = int(spec["T"]), int(spec.get("d", SCALING_D))
    block = make_gam_block(d) if spec["block"] == "gam" else make_transformer_block(d)
    x = torch.randn(1, T, d)
    past = torch.zeros(1, SCALING_KERNEL - 1, d)
    call = (lambda: block(x, past)[0]) if spec["block"] == "gam" else (lambda: block(x))
    if spec["mode"] == "forward":
        block.eval()

        def fn():
            with torch.inference_mode():
                call()
    else:
        block.train()

        def fn():
            block.zero_grad(set_to_none=True)
            call().sum().backward()
    rss0 = _proc_status_kib("VmRSS")
    exact = _reset_peak_rss()
    timing = measure(fn, warmup=int(spec.get("warmup", 1)), runs=int(spec["runs"]),
                     max_seconds=float(spec["max_seconds"]))
    if exact:
        peak = _proc_status_kib("VmHWM") or 0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**timing.as_dict(), "peak_rss_mb": peak / 1024,
            "peak_extra_mb": (peak - rss0) / 1024 if exact and rss0 is not None else None,
            "peak_method": PEAK_METHOD if exact else PEAK_FALLBACK, "threads": torch.get_num_threads()}


def training_point(spec: dict) -> dict:
    """Time full training steps (forward, cross-entropy, backward, gradient clipping, AdamW) of one language model
    in this process; runs inside a fresh process (see ``run_training``)."""
    import torch

    from gamexport.bench import measure
    from gamexport.training.baselines import build_lm

    torch.set_num_threads(int(spec["threads"]))
    cfg = GAMConfig.from_dict(spec["config"]).replace(dropout=0.0)
    model = build_lm(spec["model"], cfg, seed=0).train()
    B, T = int(spec["batch"]), int(spec["T"])
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def fn():
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    timing = measure(fn, warmup=int(spec.get("warmup", 1)), runs=int(spec["runs"]),
                     max_seconds=float(spec["max_seconds"]))
    return {**timing.as_dict(), "parameters": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads()}


def run_point(spec: dict) -> dict:
    """One measurement of a fresh process: a scaling point or a training point."""
    return training_point(spec) if spec.get("kind") == "training" else scaling_point(spec)


_ZYGOTE = r"""
import json, os, sys
import torch  # imported once here; every point runs in a fresh child forked before any torch op or thread
from gamexport.engines.benchmark import run_point
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    spec = json.loads(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            result = run_point(spec)
        except BaseException as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(w, "wb") as f:
            f.write(json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        data = json.dumps({"error": f"the measuring process died (wait status {status}); out of memory?"}).encode()
    sys.stdout.write(data.decode() + "\n")
    sys.stdout.flush()
"""


class PointServer:
    """Runs scaling points, each in a fresh process.

    With ``os.fork``: a "zygote" interpreter imports torch once (started early, so its import overlaps the main
    process's own start; ``ready()`` waits for it before anything is timed) and forks one child per point, before
    any torch op or thread exists in it. Without: one fresh interpreter per point.
    """

    def __init__(self) -> None:
        self.proc = None
        self._ready = False
        if hasattr(os, "fork"):
            self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, bufsize=1)

    def ready(self) -> None:
        if self.proc is not None and not self._ready:
            line = self.proc.stdout.readline()
            if line.strip() != "ready":
                self.close()
                self.proc = None  # fall back to one interpreter per point
            self._ready = True

    def point(self, spec: dict) -> dict:
        self.ready()
        if self.proc is None:
            return _point_in_subprocess(spec)
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"error": "the measuring process exited"}

    def close(self) -> None:
        if self.proc is None:
            return
        if not self._ready:  # still importing: nothing to finish
            self.proc.kill()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc = None


def _point_in_subprocess(spec: dict) -> dict:
    """Fallback without ``os.fork``: one fresh interpreter per point."""
    code = ("import json, sys; from gamexport.engines.benchmark import run_point; "
            "print(json.dumps(run_point(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_scaling(lengths: list[int], threads: int, effort: Effort, say: Progress,
                server: PointServer | None = None) -> tuple[dict, list[dict]]:
    """Every (block, mode, T) point, each in a fresh process; (section, skipped rows)."""
    specs = [{"block": block, "mode": mode, "T": T, "d": SCALING_D, "threads": threads,
              "runs": effort.scaling_runs, "warmup": 1, "max_seconds": effort.scaling_max_seconds}
             for mode in ("forward", "forward+backward") for block in ("gam", "transformer") for T in lengths]
    own = server is None
    server = server or PointServer()
    points, skipped = [], []
    try:
        for spec in specs:
            say(f"scaling: {spec['block']} block {spec['mode']}, d {SCALING_D}, B 1, T {spec['T']}")
            result = server.point(spec)
            if "error" in result:
                skipped.append({"runtime": "eager", "section": "scaling", "block": spec["block"],
                                "mode": spec["mode"], "T": spec["T"], "reason": result["error"]})
                continue
            flops = (gam_block_flops(spec["T"]) if spec["block"] == "gam" else transformer_block_flops(spec["T"]))
            flops *= 3 if spec["mode"] == "forward+backward" else 1
            points.append({"block": spec["block"], "mode": spec["mode"], "T": spec["T"], "batch": 1, **result,
                           "flops": flops, "achieved": flops / (result["p50_ms"] / 1e3) / 1e9, "unit": "GFLOP/s"})
    finally:
        if own:
            server.close()
    section = {"framework": "torch (eager)", "d_model": SCALING_D, "heads": SCALING_HEADS, "slots": SCALING_SLOTS,
               "kernel_size": SCALING_KERNEL, "batch": 1, "lengths": lengths,
               "flops": {"gam": "T·(4·S·d + 20·d² + 2·k·d)", "transformer": "T·(24·d² + 2·T·d), causal attention",
                         "forward+backward": "3 × forward"},
               "dropout": 0.0, "process": "a fresh process per point, forked from one that has only imported torch",
               "peak_memory": points[0]["peak_method"] if points else PEAK_METHOD,
               "points": points, "summary": scaling_summary(points)}
    return section, skipped


def scaling_summary(points: list[dict]) -> dict:
    """Growth of each block's time from T to 8·T (linear cost: 8), and the Transformer ÷ GAM time per T."""
    t = {(p["block"], p["mode"], p["T"]): p["p50_ms"] for p in points}
    growth, ratio = [], []
    for (block, mode, T), ms in sorted(t.items()):
        if (block, mode, T * 8) in t:
            growth.append({"block": block, "mode": mode, "from_T": T, "to_T": T * 8,
                           "time_ratio": t[(block, mode, T * 8)] / ms})
        if block == "gam" and ("transformer", mode, T) in t:
            ratio.append({"mode": mode, "T": T, "transformer_over_gam": t[("transformer", mode, T)] / ms,
                          "flop_ratio": transformer_block_flops(T) / gam_block_flops(T)})
    return {"growth_8x": growth, "transformer_over_gam": ratio}


def run_training(cfg: GAMConfig, threads: int, effort: Effort, say: Progress,
                 server: PointServer | None = None) -> tuple[dict | None, list[dict]]:
    """Training tokens/s of GAM and of the Transformer width-matched to it (``matched_config``), each in a fresh
    process: B = TRAIN_BATCH, T = min(TRAIN_SEQ, P), full AdamW steps; (section, skipped rows)."""
    from gamexport.errors import ConfigError
    from gamexport.training.baselines import matched_config

    T = min(TRAIN_SEQ, cfg.max_positions)
    try:
        tcfg = matched_config("transformer", cfg)
    except ConfigError as exc:
        return None, [{"runtime": "eager", "section": "training", "reason": str(exc)}]
    own = server is None
    server = server or PointServer()
    rows, skipped = [], []
    try:
        for model, mcfg in (("gam", cfg), ("transformer", tcfg)):
            say(f"training: {model} (d {mcfg.d_model}, {mcfg.n_params():,} parameters), B {TRAIN_BATCH}, T {T}, "
                "AdamW steps")
            spec = {"kind": "training", "model": model, "config": cfg.to_dict(), "batch": TRAIN_BATCH, "T": T,
                    "threads": threads, "runs": effort.training_runs, "warmup": 1,
                    "max_seconds": effort.scaling_max_seconds}
            result = server.point(spec)
            if "error" in result:
                skipped.append({"runtime": "eager", "section": "training", "model": model,
                                "reason": result["error"]})
                continue
            result["d_model"] = mcfg.d_model
            rows.append({"model": model, "batch": TRAIN_BATCH, "T": T, **result,
                         "tokens_per_s": TRAIN_BATCH * T / (result["p50_ms"] / 1e3)})
    finally:
        if own:
            server.close()
    tps = {r["model"]: r["tokens_per_s"] for r in rows}
    ratio = tps["gam"] / tps["transformer"] if len(tps) == 2 else None
    return {"framework": "torch (eager), fp32", "batch": TRAIN_BATCH, "T": T, "dropout": 0.0,
            "step": "forward, cross-entropy over all positions, backward, clip_grad_norm 1.0, AdamW",
            "process": "a fresh process per model, forked from one that has only imported torch",
            "rows": rows, "gam_over_transformer": ratio}, skipped


# ---- start-up ----------------------------------------------------------------------------------------------------
def gamexport_command() -> list[str]:
    """How a user starts gamexport here: the console script beside this Python, else ``python -m``."""
    script = Path(sys.executable).with_name("gamexport")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "gamexport.cli.main"]


def time_command(argv: list[str], runs: int, warmup: int) -> dict:
    """Wall time of a whole process (start to exit), median of ``runs`` after ``warmup`` untimed runs."""
    from gamexport.bench import summarize

    env = {**os.environ, "GAMEXPORT_DEBUG": ""}
    samples = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise GamexportError(f"{' '.join(argv[-6:])} failed while timing start-up: {tail}",
                                 "run it by hand to see why")
        if i >= warmup:
            samples.append(elapsed)
    return {"command": argv, **summarize(samples, warmup).as_dict()}


def startup_section(ckpt, build_folder: Path | None, tmp: Path, threads: int, effort: Effort,
                    say: Progress) -> dict:
    """``gamexport --help`` and the time to first token of ``gamexport generate`` on a build folder."""
    cmd = gamexport_command()
    say(f"startup: {' '.join(cmd[-1:])} --help, {effort.help_runs} runs")
    help_t = time_command([*cmd, "--help"], effort.help_runs, effort.startup_warmup)
    folder = build_folder
    note = "the SOURCE build folder"
    if folder is None:
        from gamexport.engines.pipeline import write_manifest

        folder = tmp / "first-token-build"
        folder.mkdir()
        for name in ("model.onnx", "step.onnx"):
            shutil.copyfile(tmp / "graphs" / name, folder / name)
        write_manifest(folder, ckpt)
        note = "a build folder of the fp32 graphs with a manifest (no report), written for this run"
    argv = [*cmd, "generate", str(folder), "--ids", "1", "--max-new-tokens", "1", "--threads", str(threads)]
    say(f"startup: gamexport generate (1 new token) on {note}, {effort.first_token_runs} runs")
    first = time_command(argv, effort.first_token_runs, effort.startup_warmup)
    return {"help": {**help_t, "what": "wall time of `gamexport --help`, process start to exit"},
            "first_token": {**first, "folder": note,
                            "what": "wall time of `gamexport generate FOLDER --ids 1 --max-new-tokens 1`, process "
                                    "start to exit: imports, manifest check (sha256 of the graphs), ONNX Runtime "
                                    "session creation, prefill and sampling of the first token"}}


# ---- the run -----------------------------------------------------------------------------------------------------
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
    from gamexport.bench import cpu_seconds, machine_info
    from gamexport.fsutil import atomic_write_json

    cpu_before, wall_start = cpu_seconds(), time.perf_counter()
    say = opts.progress
    ckpt, build_folder = load_source(opts.source, opts.preset)
    cfg = ckpt.config
    threads = opts.threads
    say(f"bench: {ckpt.source}: {cfg.n_params():,} parameters, {threads} threads"
        + (", --quick (smoke run: too few runs to quote)" if opts.quick else ""))

    from gamexport.device import cuda_status
    machine = {**machine_info(threads), "gpu": cuda_status()[1]}
    if server is not None:
        server.ready()
    limits = measure_limits(cfg, precisions, threads, effort, say)
    pairs, skipped = runner_plan(precisions, opts.compile)
    prefill: list[dict] = []
    decode: list[dict] = []
    scaling = None
    startup = None
    ceilings = None
    if "ceilings" not in opts.skip:
        ceilings = measure_ceilings(cfg, threads, effort, say)
    with tempfile.TemporaryDirectory(prefix="gamexport-bench-") as tmp_name:
        tmp = Path(tmp_name)
        need_graphs = ("prefill" not in opts.skip or "decode" not in opts.skip
                       or ("startup" not in opts.skip and build_folder is None))
        if need_graphs:
            (tmp / "graphs").mkdir()
            export_for_bench(ckpt, tmp / "graphs", tuple(p for _, p in pairs) if "prefill" not in opts.skip
                             or "decode" not in opts.skip else ("fp32",), say)
        if "prefill" not in opts.skip or "decode" not in opts.skip:
            for runtime, precision in pairs:
                if runtime == "eager-compile":
                    say("compile: torch.compile of prefill and step (slow on CPU; compiled on the first calls)")
                runner = open_runner(runtime, precision, ckpt, tmp / "graphs", threads)
                try:
                    rows_p = ([] if "prefill" in opts.skip else
                              prefill_rows(runner, cfg, limits, effort, threads, say))
                    rows_d = ([] if "decode" in opts.skip else
                              decode_rows(runner, cfg, limits, effort, threads, say))
                    prefill += rows_p
                    decode += rows_d
                except Exception as exc:  # torch.compile needs a working C++ toolchain; anything else is a bug
                    if runtime != "eager-compile":
                        raise
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                    skipped.append({"runtime": runtime, "precision": precision,
                                    "reason": f"torch.compile failed: {type(exc).__name__}: {first}"})
                    say(f"compile: torch.compile failed, skipped ({type(exc).__name__})")
                finally:
                    runner.close()
                    del runner
                    gc.collect()
        if "startup" not in opts.skip:
            startup = startup_section(ckpt, build_folder, tmp, threads, effort, say)
    if "scaling" not in opts.skip:
        scaling, scaling_skipped = run_scaling(scaling_lengths(min_t, max_t), threads, effort, say, server)
        skipped += scaling_skipped
    training = None
    if "training" not in opts.skip:
        training, training_skipped = run_training(cfg, threads, effort, say, server)
        skipped += training_skipped
    if server is not None:
        server.close()  # waited for: its CPU time (and its points') counts as this run's own from here on
    say("limits: measured again at the end of the run (each limit keeps the higher of its two medians)")
    limits = best_limits(limits, measure_limits(cfg, precisions, threads, effort, lambda msg: None))
    refit_fractions(cfg, limits, prefill, decode, ceilings)
    invalid = check_limits(limits, [*prefill, *decode, *(ceilings["rows"] if ceilings else [])])
    load = run_load(cpu_before, cpu_seconds(), time.perf_counter() - wall_start)

    timed = [*prefill, *decode, *(ceilings["rows"] if ceilings else []), *(scaling["points"] if scaling else []),
             *(training["rows"] if training else [])]
    timed_limits = [(name, limits[name]) for name in ("compute", "bandwidth", "batched")]
    noisy = [_row_label(r) for r in timed if r.get("noisy")] + [f"limit {n}" for n, v in timed_limits if v["noisy"]]
    result = {
        "schema_version": SCHEMA_VERSION, "kind": "gamexport-bench", "gamexport_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": bool(opts.quick), "threads": threads,
        "source": {"path": ckpt.source, "sha256": ckpt.sha256, "trained": bool(ckpt.meta.get("trained", True)),
                   "label": str(ckpt.meta.get("label", ""))},
        "config": cfg.to_dict(), "parameters": cfg.n_params(), "machine": machine,
        "flops_per_token": flops_per_token(cfg),
        "weight_bytes_per_step": {p: weight_bytes_per_step(cfg, p) for p in ("fp32", *precisions) if p != "bf16"},
        "limits": limits, "limits_valid": not invalid, "invalid_limits": invalid, "load": load,
        "prefill": prefill, "decode": decode, "ceilings": ceilings, "scaling": scaling,
        "training": training, "startup": startup, "skipped": skipped, "noisy": noisy,
        "notes": [
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
        ],
        "elapsed_s": time.perf_counter() - t_start,
    }
    say(f"writing {out / BENCH_FILE} and the plots")
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = write_plots(result, out)
    atomic_write_json(out / BENCH_FILE, result)
    return result


def run_load(before, after, wall: float) -> dict:
    """Other processes' CPU time during the run (:func:`gamexport.bench.other_cpu_cores`) and whether that makes
    it busy (more than ``BUSY_CORES``): a busy run's timings are void, its limits too low."""
    from gamexport.bench import BUSY_CORES, other_cpu_cores

    others = other_cpu_cores(before, after, wall)
    return {"other_cpu_cores": others, "busy": others is not None and others > BUSY_CORES,
            "busy_above_cores": BUSY_CORES, "wall_s": round(wall, 1),
            "how": "all CPU time in /proc/stat (but idle and iowait) minus this process's and its waited-for "
                   "children's, over the run's wall time; null where /proc/stat is missing"}


def _row_label(r: dict) -> str:
    if "M" in r:
        return f"ceiling {r['precision']} weight MatMuls M{r['M']}"
    if "model" in r:
        return f"training {r['model']} B{r['batch']}×{r['T']}"
    if "block" in r:
        return f"scaling {r['block']} {r['mode']} T{r['T']}"
    return f"{r['runtime']} {r['precision']} {r['mode']} B{r['batch']}×{r['seq_len']}"


# ---- output ------------------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def write_plots(result: dict, out: Path) -> list[str]:
    """``scaling.png`` (time vs T, log-log, both blocks) and ``fractions.png`` (fraction of the limit per runtime
    and precision); [] when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from gamexport.fsutil import atomic_write_bytes

    written = []
    scaling = result.get("scaling")
    if scaling and scaling["points"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, mode in zip(axes, ("forward", "forward+backward")):
            for block, color in (("gam", "#2a7ab9"), ("transformer", "#d9822b")):
                pts = sorted((p["T"], p["p50_ms"]) for p in scaling["points"]
                             if p["block"] == block and p["mode"] == mode)
                if pts:
                    ax.plot([t for t, _ in pts], [ms for _, ms in pts], "o-", color=color,
                            label="GAM block" if block == "gam" else "Transformer block")
            gam = sorted((p["T"], p["p50_ms"]) for p in scaling["points"] if p["block"] == "gam" and p["mode"] == mode)
            if len(gam) > 1:  # a linear-cost guide through GAM's first point
                ax.plot([gam[0][0], gam[-1][0]], [gam[0][1], gam[0][1] * gam[-1][0] / gam[0][0]], ":",
                        color="#888888", label="linear in T")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ticks = sorted({p["T"] for p in scaling["points"]})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("p50 ms")
            ax.set_title(f"{mode}, d {scaling['d_model']}, B 1")
            ax.legend(fontsize=8)
        fig.suptitle(f"one block, {result['threads']} threads, torch")
        fig.tight_layout()
        atomic_write_bytes(out / SCALING_PLOT, _png(fig))
        plt.close(fig)
        written.append(SCALING_PLOT)
    rows = [*result["prefill"], *result["decode"]]
    if rows:
        groups: dict[str, list[dict]] = {}
        for r in rows:
            key = (f"prefill B{r['batch']}×{r['seq_len']} (compute)" if r["mode"] == "prefill" else
                   f"decode B{r['batch']} ({'bandwidth roofline' if r['batch'] == 1 else 'M=32 MatMul'})")
            groups.setdefault(key, []).append(r)
        fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 0.45 * max(
            len(g) for g in groups.values()) + 1.6), sharey=True, squeeze=False)
        for ax, (title, group) in zip(axes[0], groups.items()):
            names = [f"{r['runtime']} {r['precision']}" for r in group]
            values = [r["fraction"] for r in group]
            colors = ["#cc4444" if r.get("noisy") else "#2a7ab9" for r in group]
            ax.barh(range(len(group)), values, color=colors)
            ax.set_yticks(range(len(group)), names, fontsize=8)
            ax.axvline(1.0, color="#444444", linewidth=0.8)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("fraction of limit")
        axes[0][0].invert_yaxis()
        fig.suptitle(f"fraction of this machine's limits, {result['threads']} threads (red: noisy)")
        fig.tight_layout()
        atomic_write_bytes(out / FRACTIONS_PLOT, _png(fig))
        plt.close(fig)
        written.append(FRACTIONS_PLOT)
    return written


def render_table(result: dict) -> str:
    """The readable summary ``gamexport bench`` prints."""
    lim = result["limits"]
    lines = [f"gamexport bench — {result['machine']['cpu']}, {result['threads']} threads"
             + ("  [--quick: smoke run, do not quote]" if result["quick"] else ""),
             f"model: {result['parameters']:,} parameters, {result['flops_per_token']['total'] / 1e6:.2f} MFLOP "
             f"per token (head at every position), {result['weight_bytes_per_step']['fp32'] / 1e6:.1f} MB fp32 "
             "weights per decode step",
             f"limits: compute {lim['compute']['gflops']:.1f} GFLOP/s ({lim['compute']['best']}), "
             f"bandwidth {lim['bandwidth']['gbps']:.1f} GB/s ({lim['bandwidth']['best']}), batched "
             f"{lim['batched']['gflops']:.1f} GFLOP/s ({lim['batched']['best']}); each the best of "
             f"{len(lim['compute']['candidates'])}, {len(lim['bandwidth']['candidates'])} and "
             f"{len(lim['batched']['candidates'])} kernels"]
    for bad in result.get("invalid_limits", []):
        lines.append(f"LIMIT INVALID: {bad['limit']} beaten by {', '.join(bad['beaten_by'])} — a fraction above "
                     "1.0 means the limit is too low, not the row fast")
    load = result.get("load") or {}
    if load.get("busy"):
        lines.append(f"BUSY: other processes used {load['other_cpu_cores']:.2f} cores during the run (more than "
                     f"{load['busy_above_cores']}): the timings are void")
    lines.append("")
    header = f"{'runtime':<16} {'prec':<8} {'mode':<7} {'B×T':>8} {'p50 ms':>9} {'achieved':>18} {'of limit':>9}"
    rows = [*result["prefill"], *result["decode"]]
    if rows:
        lines += [header, "-" * len(header)]
        for r in rows:
            shape = f"{r['batch']}×{r['seq_len']}"
            lines.append(f"{r['runtime']:<16} {r['precision']:<8} {r['mode']:<7} {shape:>8} {r['p50_ms']:>9.3f} "
                         f"{r['achieved']:>9.1f} {r['unit']:<8} {r['fraction']:>8.2f}"
                         + (f"  last/first {r['last_over_first']:.2f}" if "last_over_first" in r else "")
                         + ("  [noisy]" if r["noisy"] else "")
                         + ("  [limit invalid]" if r.get("limit_valid") is False else ""))
        lines.append("")
    scaling = result.get("scaling")
    if scaling and scaling["points"]:
        lines.append(f"scaling (one block, d {scaling['d_model']}, B 1, torch):")
        head = f"{'block':<12} {'mode':<17} {'T':>6} {'p50 ms':>10} {'GFLOP/s':>8} {'peak MB':>8} {'+MB':>7}"
        lines += [head, "-" * len(head)]
        for p in scaling["points"]:
            extra = f"{p['peak_extra_mb']:>7.0f}" if p.get("peak_extra_mb") is not None else f"{'-':>7}"
            lines.append(f"{p['block']:<12} {p['mode']:<17} {p['T']:>6} {p['p50_ms']:>10.2f} {p['achieved']:>8.1f} "
                         f"{p['peak_rss_mb']:>8.0f} {extra}" + ("  [noisy]" if p["noisy"] else ""))
        for g in scaling["summary"]["growth_8x"]:
            lines.append(f"  {g['block']} {g['mode']}: T={g['to_T']} ÷ T={g['from_T']} = {g['time_ratio']:.2f} "
                         "(linear: 8)")
        for r in scaling["summary"]["transformer_over_gam"]:
            lines.append(f"  T={r['T']} {r['mode']}: Transformer ÷ GAM time {r['transformer_over_gam']:.2f} "
                         f"(FLOPs {r['flop_ratio']:.2f})")
        lines.append("")
    ceilings = result.get("ceilings")
    if ceilings:
        lines.append(f"ceilings (the {ceilings['matmuls']} weight MatMuls alone, ONNX Runtime):")
        for r in ceilings["rows"]:
            lines.append(f"  {r['precision']:<5} M={r['M']:<4} {r['p50_ms']:>9.3f} ms"
                         + ("  [noisy]" if r["noisy"] else ""))
        lines.append(f"  fp32 decode could reach {ceilings['fp32_decode_fraction']:.2f} of the roofline if the rest "
                     "were free; INT8 ÷ fp32 at most " + ", ".join(f"{v:.2f}× (M={k})" for k, v in
                                                              ceilings["int8_speedup"].items()))
        lines.append("")
    training = result.get("training")
    if training and training["rows"]:
        lines.append(f"training (torch fp32, B {training['batch']} × T {training['T']}, AdamW steps):")
        for r in training["rows"]:
            lines.append(f"  {r['model']:<12} d {r['d_model']:<5} {r['parameters']:>12,} parameters  "
                         f"{r['p50_ms']:>9.1f} ms/step  {r['tokens_per_s']:>8.0f} tokens/s"
                         + ("  [noisy]" if r["noisy"] else ""))
        if training["gam_over_transformer"] is not None:
            lines.append(f"  GAM ÷ Transformer tokens/s: {training['gam_over_transformer']:.2f}")
        lines.append("")
    st = result.get("startup")
    if st:
        lines.append(f"start-up: gamexport --help {st['help']['p50_ms']:.0f} ms; first token of gamexport generate "
                     f"{st['first_token']['p50_ms']:.0f} ms")
    for s in result["skipped"]:
        what = " ".join(str(s[k]) for k in ("runtime", "precision", "section", "model", "block", "mode", "T")
                        if k in s)
        lines.append(f"skipped: {what}: {s['reason']}")
    return "\n".join(lines)


__all__ = ["BenchOptions", "run_bench", "render_table", "flops_per_token", "weight_bytes_per_step",
           "gam_block_flops", "transformer_block_flops", "make_transformer_block", "make_gam_block",
           "scaling_point", "training_point", "run_training", "measure_ceilings", "weight_matmul_shapes",
           "SCHEMA_VERSION", "BENCH_FILE", "SCALING_PLOT", "FRACTIONS_PLOT"]
