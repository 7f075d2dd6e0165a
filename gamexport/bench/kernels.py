"""The yardstick kernels the machine's limits are measured with: hand-written ONNX Runtime graphs (one MatMul, or
a list of nodes), ``torch.mm`` and a streaming read, each timed by the limit harness.

The limits (``limits``) are the best of these; the ceilings (``ceilings``) reuse ``nodes_session``. torch is
optional: an edge box without it gets the ONNX Runtime and numpy kernels only. The INT8 kernels
(:func:`time_int8_matmul`) are the integer GEMMs ONNX Runtime fuses an INT8 graph's MatMuls into: an integer
GEMM does more multiply-adds per second than an fp32 one, so an INT8 row measured against fp32 kernels alone
would beat its "limit".
"""

from __future__ import annotations

import gc
from typing import Callable

import numpy as np

from gamexport.bench.settings import STREAM_FALLBACK_BYTES, Effort


def nodes_session(nodes: list, inputs: list, outputs: list, initializers: list, threads: int):
    """An ONNX Runtime CPU session of a hand-written graph (default and com.microsoft opsets), under the session
    options the model graphs get."""
    from onnx import helper

    from gamexport.engines.ort import import_ort, session_options
    from gamexport.graph.builder import IR_VERSION, OPSET

    ort = import_ort()
    graph = helper.make_graph(nodes, "bench", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=IR_VERSION)
    data = model.SerializeToString()
    del graph, model
    return ort.InferenceSession(data, sess_options=session_options(threads), providers=["CPUExecutionProvider"])


def weight_matmuls_session(cfg, kind: str, threads: int, seed: int = 0):
    """One ONNX Runtime graph holding only the model's weight MatMuls, each fed by a graph input [M, K]:
    ``fp32`` MatMul, or ``int8`` DynamicQuantizeMatMul (int8 weights per output channel, activations quantized
    on the fly — the integer GEMM both of ONNX Runtime's INT8 flavours run). Returns (session, the input widths K:
    input ``x{K}`` is [M, K]). The ceilings time it at every M; at M = 1 in fp32 it is also a bandwidth-limit
    candidate, and at M = 32 a batched one (:func:`time_weight_matmuls`)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    from gamexport.bench.flops import weight_matmul_shapes

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
    return nodes_session(nodes, inputs, outputs, inits, threads), widths


def _matmul_session(M: int, K: int, N: int, threads: int, seed: int = 0, constant: bool = True):
    """An ONNX Runtime session of one MatMul [M, K]×[K, N]: the [K, N] weight an initializer (``constant``: ONNX
    Runtime pre-packs it once, as it does the model's weights), or a second graph input (packed on every call)."""
    from onnx import TensorProto, helper, numpy_helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [M, N])
    node = helper.make_node("MatMul", ["a", "w"], ["c"])
    if not constant:
        return nodes_session([node], [a, helper.make_tensor_value_info("w", TensorProto.FLOAT, [K, N])], [c], [],
                              threads)
    w = (np.random.default_rng(seed).standard_normal((K, N), dtype=np.float32) * 0.02)
    return nodes_session([node], [a], [c], [numpy_helper.from_array(w, "w")], threads)


def _timed(fn: Callable[[], object], effort: Effort) -> dict:
    """The limit harness: ``effort.limit_runs`` timed calls after ``effort.limit_warmup`` untimed ones."""
    from gamexport.bench.timing import measure

    return measure(fn, warmup=effort.limit_warmup, runs=effort.limit_runs,
                   max_seconds=max(effort.max_seconds, 10.0)).as_dict()


def matmul_call(M: int, K: int, N: int, threads: int, constant: bool = True) -> Callable[[], object]:
    """One call of an ONNX Runtime MatMul (see :func:`_matmul_session`) on fixed random inputs."""
    session = _matmul_session(M, K, N, threads, constant=constant)
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((M, K), dtype=np.float32)}
    if not constant:
        feeds["w"] = rng.standard_normal((K, N), dtype=np.float32) * 0.02
    return lambda: session.run(None, feeds)


def time_matmul(M: int, K: int, N: int, threads: int, effort: Effort, constant: bool = True) -> dict:
    """Time an ONNX Runtime MatMul (see :func:`_matmul_session`); the timing, its shape, engine and kernel."""
    call = matmul_call(M, K, N, threads, constant)
    timing = _timed(call, effort)
    del call
    gc.collect()
    engine = "onnxruntime-cpu MatMul fp32" + ("" if constant else ", weight a graph input (not pre-packed)")
    return {"shape": [M, K, N], "engine": engine, "kernel": {"op": "ort-matmul", "constant": constant}, **timing}


def int8_matmul_nodes(precision: str, K: int, N: int, seed: int = 0) -> tuple[list, list]:
    """One [M, K]×[K, N] MatMul written the way an INT8 precision writes its weight MatMuls, for ONNX Runtime to
    fuse into the same integer kernel; (nodes, initializers), input ``a``, output ``c``.

    ``int8``: gamexport's static plan — the activation through QuantizeLinear → DequantizeLinear (symmetric, int8,
    zero point 0), the int8 weight per output channel through DequantizeLinear. ``int8-dyn``: what
    ``quantize_dynamic`` writes — DynamicQuantizeLinear, MatMulInteger with per-channel int8 weights, Cast, Mul by
    the scales. ``int4``: one MatMulNBits of 4-bit blocks at the build's plan (``Int4Plan()``)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).integers(-127, 128, size=(K, N), dtype=np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(N, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(N, np.int8), "wz")]
    if precision == "int8":
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "as"),
                  numpy_helper.from_array(np.array(0, np.int8), "az")]
        return [helper.make_node("QuantizeLinear", ["a", "as", "az"], ["aq"]),
                helper.make_node("DequantizeLinear", ["aq", "as", "az"], ["ad"]),
                helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
                helper.make_node("MatMul", ["ad", "wd"], ["c"])], inits
    if precision == "int8-dyn":
        return [helper.make_node("DynamicQuantizeLinear", ["a"], ["aq", "as", "az"]),
                helper.make_node("MatMulInteger", ["aq", "w", "az", "wz"], ["ci"]),
                helper.make_node("Cast", ["ci"], ["cf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["as", "ws"], ["s"]),
                helper.make_node("Mul", ["cf", "s"], ["c"])], inits
    if precision == "int4":
        from gamexport.graph.int4 import Int4Plan, quantize

        plan = Int4Plan()
        packed, scales = quantize(w.astype(np.float32) * np.float32(0.01), 4, plan.block_size)
        return [helper.make_node("MatMulNBits", ["a", "wq", "wqs"], ["c"], domain="com.microsoft", K=K, N=N,
                                 bits=4, block_size=plan.block_size, accuracy_level=plan.accuracy_level)], \
            [numpy_helper.from_array(packed, "wq"), numpy_helper.from_array(scales, "wqs")]
    raise ValueError(f"no integer kernel for precision {precision!r}")


def int8_matmul_call(precision: str, M: int, K: int, N: int, threads: int) -> Callable[[], object]:
    """One call of an INT8 MatMul as :func:`int8_matmul_nodes` writes it, on fixed random inputs."""
    from onnx import TensorProto, helper

    nodes, inits = int8_matmul_nodes(precision, K, N)
    session = nodes_session(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])],
                            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [M, N])], inits, threads)
    feeds = {"a": np.random.default_rng(1).standard_normal((M, K), dtype=np.float32)}
    return lambda: session.run(None, feeds)


def time_int8_matmul(precision: str, M: int, K: int, N: int, threads: int, effort: Effort) -> dict:
    """Time one INT8 MatMul as :func:`int8_matmul_nodes` writes it; the timing, its shape, engine and kernel."""
    call = int8_matmul_call(precision, M, K, N, threads)
    timing = _timed(call, effort)
    del call
    gc.collect()
    form = {"int8": "Q/DQ MatMul, int8 weights per channel",
            "int8-dyn": "DynamicQuantizeLinear + MatMulInteger, int8 weights per channel",
            "int4": "MatMulNBits, 4-bit weight blocks"}[precision]
    return {"shape": [M, K, N], "engine": f"onnxruntime-cpu {form}",
            "kernel": {"op": "ort-integer", "precision": precision}, **timing}


def torch_or_none():
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


def torch_mm_call(torch, M: int, K: int, N: int) -> Callable[[], object]:
    """One ``torch.mm`` [M, K]×[K, N] fp32 on fixed random inputs (on torch's current threads)."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g) * 0.02
    return lambda: torch.mm(a, w)


def time_torch_mm(torch, M: int, K: int, N: int, threads: int, effort: Effort) -> dict:
    """Time ``torch.mm`` [M, K]×[K, N] fp32 on ``threads`` threads."""
    call = torch_mm_call(torch, M, K, N)
    timing = _with_torch_threads(torch, threads, lambda: _timed(call, effort))
    del call
    return {"shape": [M, K, N], "engine": f"torch {torch.__version__} torch.mm fp32", "kernel": {"op": "torch-mm"},
            **timing}


def weight_matmuls_calls(cfg, kind: str, threads: int, Ms, seed: int = 1) -> dict[int, Callable[[], object]]:
    """One call of the model's weight MatMuls (``kind`` fp32 or int8) per row count in ``Ms``, all on one session
    (:func:`weight_matmuls_session`), each on its own fixed random inputs."""
    session, widths = weight_matmuls_session(cfg, kind, threads)
    rng = np.random.default_rng(seed)
    calls = {}
    for M in Ms:
        feeds = {f"x{K}": rng.standard_normal((M, K), dtype=np.float32) for K in widths}
        calls[M] = lambda f=feeds: session.run(None, f)
    return calls


def time_weight_matmuls(cfg, threads: int, effort: Effort, M: int = 1, kind: str = "fp32") -> dict:
    """The model's weight MatMuls alone at ``M`` rows (:func:`weight_matmuls_session`, the ceilings' kernel; fp32
    MatMul, or ``kind`` int8: DynamicQuantizeMatMul). At M = 1 in fp32 a streaming read of every weight the model
    multiplies by through ONNX Runtime's GEMV (the memory bank twice, as the graphs hold it: ``bytes``); at M = 32
    a batched decode step's GEMMs (``flops``). The timing, the bytes, the FLOPs, the engine and kernel."""
    from gamexport.bench.flops import weight_matmul_shapes

    call = weight_matmuls_calls(cfg, kind, threads, [M])[M]
    timing = _timed(call, effort)
    del call
    gc.collect()
    shapes = weight_matmul_shapes(cfg)
    elements = sum(K * N for K, N in shapes)
    op = "MatMul fp32" if kind == "fp32" else "DynamicQuantizeMatMul int8"
    return {"shape": [M, len(shapes)], "engine": f"onnxruntime-cpu {op}, the model's {len(shapes)} weight "
            f"MatMuls at M = {M} in one graph", "bytes": (4 if kind == "fp32" else 1) * elements,
            "flops": 2 * M * elements, "kernel": {"op": "weight-matmuls", "kind": kind}, **timing}


def stream_call(n: int) -> tuple[Callable[[], object], str]:
    """One plain streaming read of ``n`` float32 values and its engine: ``torch.sum`` (on torch's current
    threads) where torch is installed, else numpy's sum (single-threaded)."""
    torch = torch_or_none()
    if torch is not None:
        x = torch.ones(n, dtype=torch.float32)
        return (lambda: torch.sum(x)), f"torch {torch.__version__} torch.sum over float32"
    y = np.ones(n, dtype=np.float32)
    return (lambda: np.add.reduce(y)), "numpy sum over float32 (single-threaded: a weak limit; install torch " \
        "for a threaded read)"


def time_stream(nbytes: int, threads: int, effort: Effort) -> dict:
    """Time a plain streaming read of ``nbytes`` of float32 (:func:`stream_call`) on ``threads`` threads."""
    n = max(1, nbytes // 4)
    call, engine = stream_call(n)
    torch = torch_or_none()
    if torch is not None:
        timing = _with_torch_threads(torch, threads, lambda: _timed(call, effort))
        engine += f", {threads} threads"
    else:
        timing = _timed(call, effort)
    del call
    gc.collect()
    return {"shape": [n], "engine": engine, "kernel": {"op": "stream-read"}, **timing}


def kernel_call(entry: dict, cfg, threads: int) -> Callable[[], object] | None:
    """A fresh callable of the kernel a limit candidate was timed with (its ``kernel`` and ``shape``), for timing
    it again beside the rows measured against it (``paired``); None for an entry without a ``kernel``. torch's
    kernels run on torch's current threads."""
    kernel, shape = entry.get("kernel"), entry.get("shape")
    if not kernel or not shape:
        return None
    op = kernel["op"]
    if op == "ort-matmul":
        return matmul_call(*shape, threads, constant=kernel["constant"])
    if op == "ort-integer":
        return int8_matmul_call(kernel["precision"], *shape, threads)
    if op == "torch-mm":
        torch = torch_or_none()
        return torch_mm_call(torch, *shape) if torch is not None else None
    if op == "stream-read":
        return stream_call(shape[0])[0]
    if op == "weight-matmuls":
        return weight_matmuls_calls(cfg, kernel.get("kind", "fp32"), threads, [shape[0]])[shape[0]]
    return None


def stream_bytes() -> int:
    """Bytes the streaming-read bandwidth candidate reads: 4 × the last-level cache, 256 MB where its size is
    unknown (so the read comes from memory, not from cache)."""
    from gamexport.bench.timing import llc_bytes

    llc = llc_bytes()
    return 4 * llc if llc else STREAM_FALLBACK_BYTES
