"""ONNX Runtime sessions for gamexport's graphs: session options, loading on exactly one execution provider, what
the optimized graph really multiplies in, the ORT-format file, and per-block outputs for localising a divergence.

Imports numpy and onnxruntime only — never torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gamexport.config import INPUT_IDS
from gamexport.errors import GamexportError, GraphError
from gamexport.layout import ORT_PROVIDERS

#: Report label of each execution provider gamexport runs (``gamexport.layout``).
RUNTIMES = ORT_PROVIDERS


def import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise GamexportError("onnxruntime is not installed",
                             "pip install 'gamexport[cpu]' (or [gpu] on an NVIDIA machine, never both)") from exc
    return onnxruntime


def session_options(threads: int | None, config: dict[str, str] | None = None):
    """Session options: ``threads`` intra-op threads, all graph optimizations, and ``config`` session entries."""
    ort = import_ort()
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
                 config: dict[str, str] | None = None, checked: bool = False):
    """An InferenceSession on exactly ``provider``: a GPU provider that ends up on the CPU is an error. An .onnx
    file's external data is checked first, unless the caller did (``checked``: it holds what the check read).
    A prepacked step graph (``layout.is_prepacked``: ONNX Runtime's own optimized copy, :func:`write_prepacked`)
    is loaded with graph optimizations off — they were applied when it was written."""
    from gamexport.layout import is_prepacked

    ort = import_ort()
    if not Path(path).is_file():
        raise GraphError(f"{path} does not exist", "run gamexport build first, or pass the build folder")
    if Path(path).suffix == ".onnx" and not checked:
        from gamexport.onnxfile import check_external_data

        check_external_data(Path(path))
    if provider != "CPUExecutionProvider":
        from gamexport.device import cuda_status

        usable, why = cuda_status()
        if not usable:
            raise GamexportError(f"{RUNTIMES.get(provider, provider)} needs an NVIDIA GPU, but {why}",
                                 "run on a machine with a GPU, or use --device cpu")
    try:
        so = session_options(threads, config)
        if is_prepacked(Path(path).name):
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), sess_options=so, providers=[provider])
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

    ort = import_ort()
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
    """One word for the optimized graph's matrix multiplies: fp32, fp16, bf16, int8, nbits (MatMulNBits: n-bit
    weight blocks, products in fp32 or, at accuracy level 4, in int8), or mixed."""
    kinds = {("int8" if op in INT8_COMPUTE else "nbits" if op == "MatMulNBits" else op.split(":")[1])
             for op in ops}
    return kinds.pop() if len(kinds) == 1 else "mixed"


#: Ops that multiply int8 operands in ONNX Runtime's CPU provider…
INT8_COMPUTE = ("MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
#: …and all ops that take integer weights (MatMulNBits: 4- or 8-bit weight blocks).
INT8_MATMULS = INT8_COMPUTE + ("MatMulNBits",)


#: Session entries that make ONNX Runtime run an INT8 graph's QuantizeLinear/DequantizeLinear pairs as written
#: (fp32 MatMuls on dequantized values) instead of fusing them into integer kernels: the graph's own arithmetic,
#: comparable with a NumPy emulation of the plan to float rounding. The fused CPU kernels are a different
#: computation (measured on an AVX2 CPU without VNNI, demo model: up to 2.2 in the logits from the Q/DQ
#: semantics, after layer 0), checked against eager fp32 by the INT8 quality gate instead.
QDQ_REFERENCE = {"session.disable_quant_qdq": "1"}


def write_ort_format(src: Path, out_dir: Path, threads: int | None = None) -> list[Path]:
    """``<stem>.ort``: ONNX Runtime's own format, which its mobile and minimal builds load.

    Written as ORT's converter does with the *Runtime* optimization style: basic optimizations applied, the
    others recorded to be replayed at load time, so the file stays valid on any machine (the *Fixed* style bakes
    in platform-specific ones). For a minimal ORT build, list its operators with ORT's
    ``create_reduced_build_config`` tool.
    """
    import tempfile

    from gamexport.fsutil import atomic_write_bytes

    ort = import_ort()
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


def prepacked_fingerprint() -> dict | None:
    """What a prepacked graph is valid for: the ONNX Runtime version that packed it, and the CPU it packed for — its
    architecture, name and instruction sets (numpy's runtime CPU-feature detection, the same on every OS), which
    decide the packed layouts ONNX Runtime's kernels chose. None where the instruction sets cannot be read: no
    prepacked graph is written or used there."""
    import platform

    from gamexport.machine import cpu_name

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return None
    if not isinstance(features, dict) or not any(features.values()):
        return None
    return {"onnxruntime": import_ort().__version__, "arch": platform.machine(), "cpu": cpu_name(),
            "instruction_sets": sorted(name for name, on in features.items() if on)}


def write_prepacked(src: Path, out_dir: Path, threads: int | None = None) -> list[Path]:
    """ONNX Runtime's optimized copy of the step graph ``src`` with its pre-packed weights saved beside it
    (``layout.PREPACKED_FILES``: the graph, its data, and the machine it is valid for), so that a session on this
    machine skips constant folding, fusions and packing when a cold ``gamexport generate`` creates its session
    (``gamexport bench``'s start-up section times a first token with and without it). The packed layouts belong to
    this CPU and this ONNX Runtime version (:func:`prepacked_fingerprint`); the file holds every weight twice
    (as given, and packed). CPU provider only. Writes nothing (returns []) where :func:`prepacked_fingerprint`
    cannot say what it would be valid for."""
    import os
    import tempfile

    from gamexport.fsutil import atomic_write_json
    from gamexport.layout import PREPACKED_DATA, PREPACKED_MACHINE, PREPACKED_STEP

    ort = import_ort()
    valid_for = prepacked_fingerprint()
    if valid_for is None:
        return []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".prepacked.") as tmp:
        so = session_options(threads, {
            "session.optimized_model_external_initializers_file_name": PREPACKED_DATA,
            "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
            "session.save_external_prepacked_constant_initializers": "1"})
        so.optimized_model_filepath = str(Path(tmp) / PREPACKED_STEP)
        try:
            ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's own exception types
            raise GraphError(f"ONNX Runtime could not write a prepacked copy of {Path(src).name}: {str(exc)[:300]}",
                             "this is a gamexport bug; please report it with --debug output") from exc
        written = []
        if not (Path(tmp) / PREPACKED_DATA).exists():   # no initializer of 1 KiB or more: an empty data file
            (Path(tmp) / PREPACKED_DATA).touch()
        for name in (PREPACKED_DATA, PREPACKED_STEP):   # a temporary folder inside out_dir: a rename each
            os.replace(Path(tmp) / name, Path(out_dir) / name)
            written.append(Path(out_dir) / name)
    machine = {"made_from": Path(src).name, "valid_for": valid_for,
               "what": "ONNX Runtime's optimized copy of the step graph with its weights pre-packed for this CPU; "
                       "gamexport generate uses it only on a machine with the same valid_for, else the step graph"}
    written.append(atomic_write_json(Path(out_dir) / PREPACKED_MACHINE, machine))
    return written


def prepacked_for_this_machine(folder: Path, listed) -> tuple[Path | None, str | None]:
    """(the folder's prepacked step graph, None) when it can be used here: its three files present and listed in
    the manifest (``listed``: the manifest's file names; their bytes are checked by the caller), its sidecar
    readable and naming this machine (:func:`prepacked_fingerprint`). Else (None, why it is not used) — the caller
    falls back to step.onnx — or (None, None) where the folder has no prepacked graph."""
    from gamexport.errors import GamexportError
    from gamexport.jsonfile import read_json
    from gamexport.layout import PREPACKED_FILES, PREPACKED_MACHINE, PREPACKED_STEP

    folder = Path(folder)
    if not (folder / PREPACKED_STEP).is_file():
        return None, None
    not_used = f"{PREPACKED_STEP} is not used"
    for name in PREPACKED_FILES:
        if not (folder / name).is_file():
            return None, f"{not_used}: {name} is missing"
        if name not in listed:
            return None, f"{not_used}: {name} is not in the manifest"
    try:
        valid_for = read_json(folder / PREPACKED_MACHINE, max_bytes=64 * 1024)
    except (GamexportError, OSError):
        return None, f"{not_used}: {PREPACKED_MACHINE} is unreadable"
    valid_for = valid_for.get("valid_for") if isinstance(valid_for, dict) else None
    here = prepacked_fingerprint()
    if here is None:
        return None, f"{not_used}: this machine's instruction sets cannot be read"
    differ = [key for key in here if not isinstance(valid_for, dict) or valid_for.get(key) != here[key]]
    if differ:
        return None, f"{not_used}: it was made for another {' and '.join(k.replace('_', ' ') for k in differ)}"
    return folder / PREPACKED_STEP, None


def block_outputs(model_path: Path, ids: np.ndarray, n_layers: int, threads: int | None = None) -> list[np.ndarray]:
    """The residual stream after every block (``x_1 … x_L``) of a prefill graph, read by exposing those values as
    extra graph outputs — Polygraphy-style per-layer comparison, to localise where a variant diverges."""
    import onnx

    ort = import_ort()
    model = onnx.load(str(model_path))
    names = [f"x_{i + 1}" for i in range(n_layers)]
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads),
                                   providers=["CPUExecutionProvider"])
    return session.run(names, {INPUT_IDS: np.asarray(ids, dtype=np.int64)})
