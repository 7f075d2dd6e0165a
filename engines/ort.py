"""ONNX Runtime runner for a build folder's ``model.onnx`` (prefill) and ``step.onnx`` (streaming chunks).

Imports numpy and onnxruntime only — never torch — so a build folder runs on a small box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gamexport.config import CONV_STATE, INPUT_IDS, POSITION_IDS, GAMConfig
from gamexport.errors import GamexportError, GraphError
from gamexport.runtime import Runner

#: Report label of each execution provider gamexport runs.
RUNTIMES = {"CPUExecutionProvider": "onnxruntime-cpu", "CUDAExecutionProvider": "onnxruntime-cuda",
            "TensorrtExecutionProvider": "onnxruntime-trt"}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise GamexportError("onnxruntime is not installed",
                             "pip install 'gamexport[cpu]' (or [gpu] on an NVIDIA machine, never both)") from exc
    return onnxruntime


def session_options(threads: int | None, config: dict[str, str] | None = None):
    """Session options: ``threads`` intra-op threads, all graph optimizations, and ``config`` session entries."""
    ort = _import_ort()
    so = ort.SessionOptions()
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.log_severity_level = 3  # errors only
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def load_session(path: Path, threads: int | None, provider: str = "CPUExecutionProvider",
                 config: dict[str, str] | None = None):
    """An InferenceSession on exactly ``provider``: a GPU provider that ends up on the CPU is an error."""
    ort = _import_ort()
    if not Path(path).is_file():
        raise GraphError(f"{path} does not exist", "run gamexport build first, or pass the build folder")
    if Path(path).suffix == ".onnx":
        from gamexport.graph.checks import check_external_data

        check_external_data(Path(path))
    if provider != "CPUExecutionProvider":
        from gamexport.device import cuda_status

        usable, why = cuda_status()
        if not usable:
            raise GamexportError(f"{RUNTIMES.get(provider, provider)} needs an NVIDIA GPU, but {why}",
                                 "run on a machine with a GPU, or use --device cpu")
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(threads, config),
                                       providers=[provider])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, …)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise GraphError(f"ONNX Runtime cannot load {path}: {first}",
                         "the file is corrupt or from an incompatible gamexport; rebuild it") from exc
    if session.get_providers()[0] != provider:
        raise GamexportError(f"ONNX Runtime was asked for {provider} but runs {path.name} on "
                             f"{session.get_providers()[0]}",
                             "install onnxruntime-gpu (and uninstall onnxruntime) with a CUDA that matches it")
    return session


def optimized_matmul_ops(path: Path, threads: int | None, provider: str = "CPUExecutionProvider") -> dict[str, int]:
    """What ONNX Runtime really multiplies with: the matrix-multiply ops of the session's optimized graph.

    Keys are ``op_type`` (plus ``:fp16``/``:bf16``/``:fp32`` for float MatMul/Gemm/FusedMatMul), values counts.
    ORT's CPU provider has no fp16 MatMul kernel on x86 and computes an fp16 graph in fp32 (it inserts casts);
    it fuses Q/DQ around a MatMul into integer ops. Asking the optimized graph is the only honest label.
    """
    import tempfile

    import onnx

    ort = _import_ort()
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable, fused
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=so, providers=[provider])
        model = onnx.load(so.optimized_model_filepath, load_external_data=False)
    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.input]}
    types.update({t.name: t.data_type for t in typed.graph.initializer})
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    ops: dict[str, int] = {}
    for node in typed.graph.node:
        if node.op_type in INT8_MATMULS:
            key = node.op_type
        elif node.op_type in ("MatMul", "Gemm", "FusedMatMul"):
            key = f"{node.op_type}:{names.get(types.get(node.input[0]), 'other')}"
        else:
            continue
        ops[key] = ops.get(key, 0) + 1
    return dict(sorted(ops.items()))


def compute_label(ops: dict[str, int]) -> str:
    """One word for the optimized graph's matrix multiplies: fp32, fp16, bf16, int8, or mixed."""
    kinds = {("int8" if op in INT8_COMPUTE else "int8w-fp32" if op in INT8_MATMULS else op.split(":")[1])
             for op in ops}
    return kinds.pop() if len(kinds) == 1 else "mixed"


#: Ops that multiply int8 operands in ONNX Runtime's CPU provider…
INT8_COMPUTE = ("MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
#: …and all ops that take int8 weights (MatMulNBits dequantizes its 8-bit weights and multiplies in fp32).
INT8_MATMULS = INT8_COMPUTE + ("MatMulNBits",)


def write_int8_dynamic(src: Path, dst: Path, threads: int | None = None) -> Path:
    """``*.int8-dyn.onnx``: ONNX Runtime's dynamic quantization (int8 weights per channel, MatMulInteger).

    ORT's quantizer skips local-function bodies and only quantizes a MatMul whose weight is an initializer, so
    the source must be the inlined graph, and its ``Transpose(weight)`` nodes are folded first by an offline
    basic-level optimization. CPU only.
    """
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from gamexport.fsutil import atomic_write_bytes

    ort = _import_ort()
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        so = session_options(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
        quantized = Path(tmp) / "quantized.onnx"
        import logging
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint at WARNING
        quantize_dynamic(str(folded), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
        model = onnx.load(str(quantized))
    # Keep gamexport's metadata (config, source hash), relabelled with this precision.
    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    meta["gamexport.precision"] = "int8-dyn"
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    atomic_write_bytes(dst, model.SerializeToString(deterministic=True))
    return dst


#: Session entries that make ONNX Runtime run an INT8 graph's QuantizeLinear/DequantizeLinear pairs as written
#: (fp32 MatMuls on dequantized values) instead of fusing them into integer kernels: the graph's own arithmetic,
#: comparable with a NumPy emulation of the plan to float rounding. The fused CPU kernels are a different
#: computation (measured on an AVX2 CPU without VNNI, demo model: up to 2.2 in the logits from the Q/DQ
#: semantics, after layer 0), checked against eager fp32 by the INT8 quality gate instead.
QDQ_REFERENCE = {"session.disable_quant_qdq": "1"}


def exact_integer_matmuls(model):
    """``model`` (an int8-dyn ``ModelProto``, edited in place and returned) with every ``MatMulInteger`` computed
    as ONNX defines it — (A − a_zero) · (B − b_zero), exact — in float64 MatMuls whose integer result is cast
    back to int32, so the rest of the graph is unchanged.

    ONNX Runtime's integer kernel is not that on every CPU: on AVX2 without VNNI it multiplies uint8 × int8 with
    ``vpmaddubsw``, which saturates each pair of products at int16 (measured on the demo model: 1307 of 65536
    outputs of layer 0's gate MatMul off, by up to 15215). The int8-dyn emulation reference describes the graph's
    arithmetic, so it is compared with this run; the real kernels are gated against eager fp32 by perplexity."""
    from onnx import TensorProto, helper

    nodes = []
    for n in model.graph.node:
        if n.op_type != "MatMulInteger":
            nodes.append(n)
            continue
        a, b, a_zero, b_zero = n.input
        t = n.output[0] + "/exact"
        nodes += [helper.make_node("Cast", [a], [t + "/a"], to=TensorProto.DOUBLE),
                  helper.make_node("Cast", [a_zero], [t + "/az"], to=TensorProto.DOUBLE),
                  helper.make_node("Sub", [t + "/a", t + "/az"], [t + "/a0"]),
                  helper.make_node("Cast", [b], [t + "/b"], to=TensorProto.DOUBLE),
                  helper.make_node("Cast", [b_zero], [t + "/bz"], to=TensorProto.DOUBLE),
                  helper.make_node("Sub", [t + "/b", t + "/bz"], [t + "/b0"]),
                  helper.make_node("MatMul", [t + "/a0", t + "/b0"], [t + "/y"]),
                  helper.make_node("Cast", [t + "/y"], [n.output[0]], to=TensorProto.INT32)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def upcast_bf16(model):
    """``model`` (a bf16 ``ModelProto``, edited in place and returned) made computable by ONNX Runtime's CPU
    provider, which has no bf16 kernels: bf16 initializers upcast to fp32 (exact: every bf16 value is an fp32
    value) and every ``Cast`` to bf16, in the graph and in the function bodies, made a cast to fp32. What is left
    is the graph's structure — its ops, wiring, attributes — computing in fp32 on the bf16-rounded weights, which
    the ``emulation-bf16-weights`` reference describes (a bug in the graph is not made fp32 by this)."""
    import ml_dtypes  # noqa: F401  (a dependency of onnx: numpy_helper reads bf16 through it)
    from onnx import TensorProto, numpy_helper

    for i, t in enumerate(model.graph.initializer):
        if t.data_type == TensorProto.BFLOAT16:
            value = numpy_helper.to_array(t).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, t.name))
    for nodes in (model.graph.node, *(f.node for f in model.functions)):
        for n in nodes:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.BFLOAT16:
                    a.i = TensorProto.FLOAT
    return model


def _rewritten_runner(model_path: Path, step_path: Path, config: GAMConfig, threads: int | None, precision: str,
                      rewrite) -> "OrtRunner":
    """An OrtRunner over ``rewrite(graph)`` of both graphs (held in memory by the sessions); its paths, labels and
    rows name the graphs on disk."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:  # the sessions hold the graphs: the files may go
        paths = []
        for path in (model_path, step_path):
            paths.append(Path(tmp) / Path(path).name)
            onnx.save(rewrite(onnx.load(str(path))), str(paths[-1]))
        runner = OrtRunner(paths[0], paths[1], config, threads, precision=precision)
    runner.model_path, runner.step_path = Path(model_path), Path(step_path)
    return runner


def exact_int8_dynamic_runner(model_path: Path, step_path: Path, config: GAMConfig, threads: int | None
                              ) -> "OrtRunner":
    """A runner over int8-dyn graphs with exact integer MatMuls (:func:`exact_integer_matmuls`): the graphs'
    own arithmetic, comparable with the NumPy emulation of dynamic quantization to float rounding."""
    return _rewritten_runner(model_path, step_path, config, threads, "int8-dyn", exact_integer_matmuls)


#: The note of rows computed by :func:`bf16_structural_runner`.
BF16_STRUCTURAL = ("bf16 structural run: ONNX Runtime's CPU provider has no bf16 kernels, so the bf16 graphs run "
                   "with their bf16 weights upcast to fp32 (exact) and their bf16 casts made fp32")


def bf16_structural_runner(model_path: Path, step_path: Path, config: GAMConfig, threads: int | None
                           ) -> "OrtRunner":
    """A runner over bf16 graphs on ONNX Runtime's CPU provider, through :func:`upcast_bf16`: precision "bf16",
    compute precision "fp32", ``structural`` True (never timed: it is not how a bf16 runtime computes)."""
    runner = _rewritten_runner(model_path, step_path, config, threads, "bf16", upcast_bf16)
    runner.structural = True
    runner.compute_precision = "fp32"  # no bf16 value is left (the optimized graph's types may read "other")
    return runner


class OrtRunner(Runner):
    """Runs the prefill and step graphs with ONNX Runtime on one execution provider (CPU, CUDA or TensorRT).

    ``precision`` is the graph's storage precision; ``compute_precision`` what ORT actually multiplies in
    (for an fp16 graph on the CPU provider: fp32 — "fp16 weights, fp32 compute").
    """

    runtime = "onnxruntime-cpu"

    def __init__(self, model_path: str | Path | None, step_path: str | Path, config: GAMConfig | None,
                 threads: int | None = None, precision: str = "fp32", provider: str = "CPUExecutionProvider",
                 session_config: dict[str, str] | None = None):
        """``model_path=None``: step graph only — prefill runs as a chunk from the zero state at position 0
        (identical by construction), so generation needs one session and one copy of the weights.
        ``config=None``: read from the step session's metadata (no second parse of the file).
        ``session_config``: ONNX Runtime session entries (``QDQ_REFERENCE``: run Q/DQ pairs as written)."""
        if provider not in RUNTIMES:
            raise GamexportError(f"unknown ONNX Runtime provider {provider!r}", f"use one of {', '.join(RUNTIMES)}")
        self.step_path = Path(step_path)
        self.model_path = Path(model_path) if model_path is not None else self.step_path
        self.precision = precision
        self.provider = provider
        self.runtime = RUNTIMES[provider]
        self.step_session = load_session(self.step_path, threads, provider, session_config)
        if config is None:  # before the prefill session: a file that is not a gamexport graph stops here
            from gamexport.graph.builder import check_config_against_graph, config_from_metadata, embedding_shapes

            config = config_from_metadata(self.step_session.get_modelmeta().custom_metadata_map, str(self.step_path))
            shapes = {t.name: [d if isinstance(d, int) else None for d in t.shape]
                      for t in [*self.step_session.get_inputs(), *self.step_session.get_outputs()]}
            if self.step_path.suffix == ".onnx":  # the session hides initializers: the positions are in the file
                import onnx

                shapes.update(embedding_shapes(onnx.load(str(self.step_path), load_external_data=False)))
            check_config_against_graph(config, shapes, str(self.step_path))
        super().__init__(config)
        self.prefill_session = (load_session(self.model_path, threads, provider, session_config) if model_path is not None
                                else None)
        self.matmul_ops: dict[str, int] = {}
        self.compute_precision = precision
        if precision != "fp32" and provider == "CPUExecutionProvider":
            self.matmul_ops = optimized_matmul_ops(self.model_path, threads)
            self.compute_precision = compute_label(self.matmul_ops)

    @classmethod
    def from_folder(cls, folder: str | Path, threads: int | None = None, inlined: bool = False,
                    precision: str = "fp32", step_only: bool = False) -> "OrtRunner":
        """A runner over a build folder; the config is read from the graph's metadata."""
        from gamexport.graph.builder import graph_file_name

        folder = Path(folder)
        model_path = folder / graph_file_name("prefill", precision, inlined)
        step_path = folder / graph_file_name("step", precision, inlined)
        return cls(None if step_only else model_path, step_path, None, threads, precision)

    def _prefill(self, ids):
        if self.prefill_session is None:
            return self._step(ids, np.zeros((ids.shape[0], 1), np.int64), self.empty_state(ids.shape[0]))
        logits, state = self.prefill_session.run(None, {INPUT_IDS: ids})
        return logits, state

    def _step(self, ids, position_ids, state):
        logits, new_state = self.step_session.run(None, {INPUT_IDS: ids, POSITION_IDS: position_ids,
                                                         CONV_STATE: state})
        return logits, new_state

    def close(self) -> None:
        self.prefill_session = self.step_session = None


def write_ort_format(src: Path, out_dir: Path, threads: int | None = None) -> list[Path]:
    """``<stem>.ort``: ONNX Runtime's own format, which its mobile and minimal builds load.

    Written as ORT's converter does with the *Runtime* optimization style: basic optimizations applied, the
    others recorded to be replayed at load time, so the file stays valid on any machine (the *Fixed* style bakes
    in platform-specific ones). For a minimal ORT build, list its operators with ORT's
    ``create_reduced_build_config`` tool.
    """
    import tempfile

    from gamexport.fsutil import atomic_write_bytes

    ort = _import_ort()
    src = Path(src)
    stem = src.name.removesuffix(".onnx")
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / f"{stem}.ort")
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.add_session_config_entry("optimization.minimal_build_optimizations", "save")
        try:
            ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's own exception types
            raise GraphError(f"ONNX Runtime could not write {src.name} in the ORT format: {str(exc)[:300]}",
                             "this is a gamexport bug; please report it with --debug output") from exc
        return [atomic_write_bytes(Path(out_dir) / f"{stem}.ort", (Path(tmp) / f"{stem}.ort").read_bytes())]


def block_outputs(model_path: Path, ids: np.ndarray, n_layers: int, threads: int | None = None) -> list[np.ndarray]:
    """The residual stream after every block (``x_1 … x_L``) of a prefill graph, read by exposing those values as
    extra graph outputs — Polygraphy-style per-layer comparison, to localise where a variant diverges."""
    import onnx

    ort = _import_ort()
    model = onnx.load(str(model_path))
    names = [f"x_{i + 1}" for i in range(n_layers)]
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads),
                                   providers=["CPUExecutionProvider"])
    return session.run(names, {INPUT_IDS: np.asarray(ids, dtype=np.int64)})
