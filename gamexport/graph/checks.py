"""Structural checks of a gamexport graph: the ONNX checker, the functions, the I/O contract.

The ONNX checker does not notice a call to a missing function or a wrong attribute (ONNX Runtime does, at
load), so the structure is asserted here explicitly, and the build loads every file in ONNX Runtime as well.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from ..config import GAMConfig, io_spec
from ..errors import GraphError
from ..onnxfile import check_external_data  # noqa: F401 (its home is the onnx-free gamexport.onnxfile)
from .builder import FUNCTION_DOMAIN, IR_VERSION, META_GRAPH, OPSET

FUNCTION_NAMES = ("CausalConv", "MemoryRead", "GatedFusion", "FeedForward", "Block")


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def structure_problems(model: onnx.ModelProto, cfg: GAMConfig) -> list[str]:
    """Everything about ``model`` that breaks the gamexport graph contract (empty list: none)."""
    problems = []
    meta = {p.key: p.value for p in model.metadata_props}
    kind = meta.get(META_GRAPH)
    if kind not in ("prefill", "step"):
        return [f"metadata {META_GRAPH!r} is {kind!r}, expected 'prefill' or 'step'"]
    if model.ir_version != IR_VERSION:
        problems.append(f"IR version {model.ir_version}, expected {IR_VERSION}")
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != OPSET:
        problems.append(f"default opset {opsets.get('')}, expected {OPSET}")
    functions = {(f.domain, f.name): f for f in model.functions}
    called = {(n.domain, n.op_type) for n in model.graph.node if n.domain == FUNCTION_DOMAIN}
    for f in functions.values():
        called |= {(n.domain, n.op_type) for n in f.node if n.domain == FUNCTION_DOMAIN}
        f_opsets = {o.domain: o.version for o in f.opset_import}
        if f_opsets.get("") != OPSET:
            problems.append(f"function {f.name} imports opset {f_opsets.get('')}, expected {OPSET}")
    missing = sorted(name for dom, name in called if (dom, name) not in functions)
    if missing:
        problems.append(f"calls to undefined functions: {', '.join(missing)}")
    if functions:
        absent = [n for n in FUNCTION_NAMES if (FUNCTION_DOMAIN, n) not in functions]
        if absent:
            problems.append(f"missing local functions: {', '.join(absent)}")
        blocks = [n for n in model.graph.node if n.domain == FUNCTION_DOMAIN and n.op_type == "Block"]
        if len(blocks) != cfg.n_layers:
            problems.append(f"{len(blocks)} gam.Block calls, expected {cfg.n_layers}")
    spec = io_spec(cfg, kind)
    for label, actual, wanted in (("input", model.graph.input, spec["inputs"]),
                                  ("output", model.graph.output, spec["outputs"])):
        got = [(v.name, _dims(v)) for v in actual]
        want = [(name, shape) for name, _, shape in wanted]
        if got != want:
            problems.append(f"graph {label}s {got}, expected {want}")
    return problems


def _checked_load(path: Path) -> onnx.ModelProto:
    """The ONNX checker with full_check (shape inference included), then the loaded model."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphError(f"{Path(path).name} fails the ONNX checker: {str(exc).splitlines()[0]}",
                         "this is a gamexport bug; please report it with --debug output") from exc
    return onnx.load(str(path))


def check_graph_file(path: Path, cfg: GAMConfig, precision: str = "fp32") -> None:
    """Run the ONNX checker (full_check), the structural, precision-plan and function-scope checks on a file;
    raise GraphError on failure."""
    model = _checked_load(path)
    problems = structure_problems(model, cfg) + precision_problems(model, precision) + scope_problems(model)
    if problems:
        raise GraphError(f"{Path(path).name} breaks the graph contract: {'; '.join(problems)}",
                         "this is a gamexport bug; please report it with --debug output")


def scope_problems(model: onnx.ModelProto) -> list[str]:
    """Names inside a local function that coincide with a name its caller can see (empty list: none).

    onnx-tensorrt imports a call of a local function by name (onnxOpImporters.cpp, ``LocalFunctionImporter``, at
    onnx/onnx-tensorrt@96e781103cfc4adf4a6bb557e94bac8e693f6f4c): for each formal input whose name differs from
    its argument it first asks whether the name is already in the importer's tensor map, which holds every
    scope the call is nested in (main-graph inputs, initializers, reserved graph outputs, values computed so
    far, and each enclosing function's formals and values). If it is, it logs "Found input: … that does not
    correspond to an outside scope name. Behavior may be incorrect." and the body then reads the *caller's*
    tensor of that name instead of the argument: the parse succeeds and the engine computes something else.
    Outputs and internal values of the body are registered in a name scope that shadows the caller's name
    until the call returns (ImporterContext.cpp, ``registerTensor`` / ``popBaseNameScope``), which is correct
    today; they are refused as well, so that no result depends on that subtlety.

    So for every call, at every depth: a formal input that is a name of the caller's scope fails unless its
    argument is that very name; an output, or any value the importer registers while importing the callee
    (recursively through nested calls), fails when it is a name of the caller's scope, unless it is an output
    bound to that very name. One line per (function, name, caller).
    """
    functions = {(f.domain, f.name): f for f in model.functions}
    g = model.graph
    scope = {v.name for v in [*g.input, *g.output, *g.initializer]} | _produced(g.node)
    problems: list[str] = []
    _check_calls("the main graph", scope, g.node, functions, problems, ())
    return list(dict.fromkeys(problems))


def _produced(nodes) -> set[str]:
    return {o for node in nodes for o in node.output if o}


def _registered(f: onnx.FunctionProto, functions: dict, stack: tuple) -> set[str]:
    """Every name onnx-tensorrt registers while importing a call of ``f``: formals, outputs, body values, and
    the same for each function ``f`` calls."""
    names = set(f.input) | set(f.output) | _produced(f.node)
    for node in f.node:
        callee = functions.get((node.domain, node.op_type))
        if callee is not None and callee.name not in stack:
            names |= _registered(callee, functions, stack + (f.name,))
    return names


def _check_calls(caller: str, scope: set[str], nodes, functions: dict, problems: list[str], stack: tuple) -> None:
    """Check the calls among ``nodes`` against ``scope`` (every name visible there), then each callee's body."""
    for node in nodes:
        f = functions.get((node.domain, node.op_type))
        if f is None or f.name in stack:  # not a local function (a recursive call fails the ONNX checker)
            continue
        where = f"{f.domain}.{f.name} called from {caller}"
        for formal, actual in zip(f.input, node.input):
            if formal != actual and formal in scope:
                problems.append(f"{where}: formal input {formal!r} is also a name in the caller's scope, so "
                                f"TensorRT would read that tensor instead of the argument {actual!r}")
        same_output = {formal for formal, actual in zip(f.output, node.output) if formal == actual}
        for name in sorted((_registered(f, functions, stack) - set(f.input) - same_output) & scope):
            problems.append(f"{where}: its output or internal value {name!r} is also a name in the caller's scope")
        inner = scope | set(f.input) | _produced(f.node)
        _check_calls(f"{f.domain}.{f.name}", inner, f.node, functions, problems, stack + (f.name,))


#: Ops that must compute in fp32 in every graph (the fp32 islands of a half-precision graph).
FP32_ISLANDS = ("LayerNormalization", "Softmax", "Sigmoid", "Mul")  # Mul: the conv taps and the gate fusion


def precision_problems(model: onnx.ModelProto, precision: str) -> list[str]:
    """Check that a graph computes the precision plan it claims, from inferred element types.

    Every MatMul must take both operands in the graph's compute precision (fp16/bf16 for half graphs, fp32
    otherwise) — so a graph that silently stayed fp32 fails — and LayerNorm, Softmax, the sigmoid gates, the
    conv's multiply-adds and the gate fusion must take fp32 — so a graph that lost an fp32 island fails. Works on
    the inlined form.
    """
    from .builder import HALF_TYPES, inline

    if model.functions:
        model = inline(model)
    if precision == "int4":
        model = _declare_contrib_outputs(model)
    typed = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]}
    types.update({init.name: init.data_type for init in typed.graph.initializer})
    want = HALF_TYPES.get(precision, onnx.TensorProto.FLOAT)
    name = onnx.helper.tensor_dtype_to_string
    problems = []
    producers = {o: node for node in typed.graph.node for o in node.output}
    for node in typed.graph.node:
        if precision == "int4" and node.op_type in ("MatMul", "MatMulNBits"):
            problems += _int4_matmul_problems(node, types)
        elif node.op_type == "MatMul" and precision == "int8":
            # Weight operand: DequantizeLinear of an int8 initializer (per-channel, zero point 0).
            dq = producers.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear" or types.get(dq.input[0]) != onnx.TensorProto.INT8:
                problems.append(f"MatMul {node.output[0]} does not take int8 weights through DequantizeLinear")
            act = producers.get(node.input[0])
            if act is not None and act.op_type == "DequantizeLinear":
                q = producers.get(act.input[0])
                if q is None or q.op_type != "QuantizeLinear" or types.get(act.input[0]) != onnx.TensorProto.INT8:
                    problems.append(f"MatMul {node.output[0]}: activation Q/DQ is not int8")
            elif act is None or act.op_type != "Softmax":
                problems.append(f"MatMul {node.output[0]} takes an unquantized activation "
                                f"({act.op_type if act else 'graph input'})")
        elif node.op_type == "MatMul":
            got = [types.get(i) for i in node.input]
            if any(t != want for t in got):
                problems.append(f"MatMul {node.name or node.output[0]} takes "
                                f"{[name(t) if t else '?' for t in got]}, expected {name(want)}")
        elif node.op_type in FP32_ISLANDS:
            t = types.get(node.input[0])
            if t != onnx.TensorProto.FLOAT:
                problems.append(f"{node.op_type} {node.name or node.output[0]} takes {name(t) if t else '?'}, "
                                "expected TensorProto.FLOAT (fp32 island)")
    return problems


def _declare_contrib_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an inlined INT4 model whose MatMulNBits outputs are declared fp32: ONNX's shape inference does not
    know ONNX Runtime's contrib ops, and would leave every type after them unknown."""
    declared = onnx.ModelProto()
    declared.CopyFrom(model)
    for node in declared.graph.node:
        if node.op_type == "MatMulNBits":
            declared.graph.value_info.append(
                onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    return declared


def _int4_matmul_problems(node: onnx.NodeProto, types: dict) -> list[str]:
    """INT4: every weight MatMul is a 4-bit MatMulNBits on an fp32 activation (its weights uint8 blocks with fp32
    scales); a plain MatMul is allowed only for the head kept fp32 (its output is the logits)."""
    from ..config import LOGITS

    if node.op_type == "MatMul":
        if node.output[0] != LOGITS:
            return [f"MatMul {node.output[0]} is not a MatMulNBits: its weights are not 4-bit"]
        return []
    bits = next((a.i for a in node.attribute if a.name == "bits"), None)
    got = [types.get(i) for i in node.input[:3]]
    want = [onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT]
    problems = [] if got == want else [f"MatMulNBits {node.output[0]} takes types {got}, expected {want}"]
    if bits != 4 and node.output[0] != LOGITS:   # the head may be 8-bit (Int4Plan.head == "int8")
        problems.append(f"MatMulNBits {node.output[0]} has bits={bits}, expected 4")
    return problems


def check_int8_dynamic_file(path: Path, cfg: GAMConfig) -> None:
    """An ``*.int8-dyn.onnx`` file: passes the checker, and every weight MatMul (five per block — memory scores,
    memory read, gate, FFN in and out — and the head) consumes int8 weights; no float MatMul is left."""
    model = _checked_load(path)
    int8 = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    inits = {t.name: t.data_type for t in model.graph.initializer}
    quantized_weights = [n for n in int8 if inits.get(n.input[1]) == onnx.TensorProto.INT8]
    floats = [n for n in model.graph.node if n.op_type == "MatMul"]
    want = 5 * cfg.n_layers + 1
    if len(quantized_weights) != want or floats:
        raise GraphError(f"{Path(path).name} quantizes {len(quantized_weights)} of {want} weight MatMuls "
                         f"({len(floats)} float MatMuls left)",
                         "this is a gamexport bug; please report it with --debug output")
