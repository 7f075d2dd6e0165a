"""A mutant zoo: plausible exporter bugs planted into *built graphs*, to prove that the parity gates catch them.

Each mutant edits the ONNX ``ModelProto`` of one built graph (an initializer, a node, an attribute inside a
``gam.<F>`` function body) the way a buggy exporter would have written it. :func:`plant` applies a mutant to
every graph of one precision in a copied build folder — the function graphs, their inlined twins (re-inlined
from the mutated graph, as the exporter derives them), the ``.ort`` files (regenerated) and, for ``int8-dyn``,
the dynamic quantization of the mutated fp32 graph — and rewrites the manifest entries, as a buggy exporter
would write a consistent manifest. Then the build's own parity rows (:func:`build_rows`) and
``gamexport parity DIR`` (:func:`recheck_rows`) must each fail a gated row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gamexport.graph.builder import graph_file_name, inline, serialize

# ---- helpers on a ModelProto ----------------------------------------------------------------------------------


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in model.graph.initializer if t.name == name), None)


def _edit_initializers(model: onnx.ModelProto, match: Callable[[str], bool],
                       edit: Callable[[np.ndarray], np.ndarray]) -> int:
    """Replace every initializer whose name matches by ``edit(value)`` (same dtype); how many were edited."""
    n = 0
    for i, t in enumerate(model.graph.initializer):
        if match(t.name):
            value = numpy_helper.to_array(t)
            new = np.asarray(edit(value.astype(np.float32) if value.dtype.kind == "f" else value))
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(new.astype(value.dtype), t.name))
            n += 1
    return n


def _function(model: onnx.ModelProto, name: str) -> onnx.FunctionProto:
    return next(f for f in model.functions if f.name == name)


def _nodes(nodes, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in nodes if n.op_type == op_type]


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))


def _insert_before(nodes, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    """Insert ``new`` right before ``node`` in a repeated node field (the field's nodes are copied: edit
    ``node`` before, not after)."""
    index = list(nodes).index(node)
    kept = list(nodes)
    del nodes[:]
    nodes.extend(kept[:index] + new + kept[index:])


def _attribute(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


# ---- the mutants ----------------------------------------------------------------------------------------------
# Each takes (model, kind, precision), edits the model in place, and returns False when it does not apply to
# that graph (e.g. position ids in the prefill graph, which has none).


def conv_taps_reversed(model, kind, precision) -> bool:
    """The depthwise conv's k taps in reverse order (a flipped kernel: cross-correlation vs convolution)."""
    return _edit_initializers(model, lambda n: n.endswith("causal_conv.weight"), lambda w: w[..., ::-1]) > 0


def conv_shifted(model, kind, precision) -> bool:
    """The conv reads one position too early: every tap moved one step older, the newest tap lost."""
    def shift(w):
        out = np.zeros_like(w)
        out[..., :-1] = w[..., 1:]
        return out
    return _edit_initializers(model, lambda n: n.endswith("causal_conv.weight"), shift) > 0


def conv_bias_dropped(model, kind, precision) -> bool:
    """Every block's conv bias left out (zero)."""
    return _edit_initializers(model, lambda n: n.endswith("causal_conv.bias"), np.zeros_like) > 0


def memory_scaled(model, kind, precision) -> bool:
    """The memory read's scores scaled by 1/√d (attention habit; GAM's memory read has no scaling)."""
    cfg_d = _d_model(model)
    f = _function(model, "MemoryRead")
    softmax = _nodes(f.node, "Softmax")[0]
    scale = _const("MemoryRead/zoo_scale", 1.0 / math.sqrt(cfg_d))
    scaled = helper.make_node("Mul", [softmax.input[0], "MemoryRead/zoo_scale"], ["MemoryRead/zoo_scaled"])
    softmax.input[0] = "MemoryRead/zoo_scaled"  # before inserting: the insert copies the nodes
    _insert_before(f.node, softmax, [scale, scaled])
    return True


def gates_swapped(model, kind, precision) -> bool:
    """The local and global gates swapped (the Split's two outputs in the wrong order)."""
    split = _nodes(_function(model, "GatedFusion").node, "Split")[0]
    a, b = split.output
    split.output[:] = [b, a]
    return True


def gate_bias_dropped_one_layer(model, kind, precision) -> bool:
    """One layer's gate bias dropped (blocks.1)."""
    return _edit_initializers(model, lambda n: n == "blocks.1.gate.bias", np.zeros_like) > 0


def ffn_bias_dropped_one(model, kind, precision) -> bool:
    """One FFN bias dropped (blocks.1's second Linear)."""
    return _edit_initializers(model, lambda n: n == "blocks.1.ffn.2.bias", np.zeros_like) > 0


def tanh_gelu(model, kind, precision) -> bool:
    """tanh-approximated GELU for the exact (erf) GELU."""
    for node in _nodes(_function(model, "FeedForward").node, "Gelu"):
        _attribute(node, "approximate", "tanh")
    return True


def layernorm_eps(model, kind, precision) -> bool:
    """Every LayerNorm's ε written as 1e-3 instead of the model's (1e-5)."""
    nodes = [*_nodes(model.graph.node, "LayerNormalization")]
    for f in model.functions:
        nodes += _nodes(f.node, "LayerNormalization")
    for node in nodes:
        _attribute(node, "epsilon", 1e-3)
    return bool(nodes)


def int8_scale_wrong(model, kind, precision) -> bool:
    """One per-channel INT8 weight scale tensor 3 % low (the memory banks' read-side scales × 0.97)."""
    if precision != "int8":
        return False
    return _edit_initializers(model, lambda n: n.endswith("memory_bank.q.scale"), lambda s: s * 0.97) > 0


def position_off_by_one(model, kind, precision) -> bool:
    """The step graph's positions one too early (position_ids − 1 + offsets; −1 gathers the last row, as
    ONNX Gather wraps negative indices, so nothing crashes — +1 would make ONNX Runtime raise at the last
    position)."""
    if kind != "step":
        return False
    add = next(n for n in model.graph.node if n.op_type == "Add" and list(n.output) == ["positions"])
    one = helper.make_node("Constant", [], ["zoo_one"], value=helper.make_tensor("zoo_one", TensorProto.INT64,
                                                                                 [], [-1]))
    shifted = helper.make_node("Add", [add.input[0], "zoo_one"], ["zoo_position_ids"])
    add.input[0] = "zoo_position_ids"  # before inserting: the insert copies the nodes
    _insert_before(model.graph.node, add, [one, shifted])
    return True


def state_not_advanced(model, kind, precision) -> bool:
    """The step graph returns its input state (``conv_state_out`` = ``conv_state``)."""
    if kind != "step":
        return False
    concat = next(n for n in model.graph.node if list(n.output) == ["conv_state_out"])
    concat.CopyFrom(helper.make_node("Identity", ["conv_state"], ["conv_state_out"]))
    return True


def head_wrong_tensor(model, kind, precision) -> bool:
    """The tied head reads a stale copy of the embedding whose rows are one token off (rows rolled by one)."""
    if precision == "int8":
        names = ("token_embedding.weight.qT", "token_embedding.weight.qT.scale")
        head = next(n for n in model.graph.node if list(n.output) == ["head_t"])
        for name, axis in zip(names, (1, 0)):
            value = numpy_helper.to_array(_initializer(model, name))
            model.graph.initializer.append(numpy_helper.from_array(np.roll(value, 1, axis=axis), "zoo_" + name))
        head.input[:] = ["zoo_" + n for n in names]
        return True
    head = next(n for n in model.graph.node if list(n.output) == ["head_t"])
    value = numpy_helper.to_array(_initializer(model, "token_embedding.weight"))
    model.graph.initializer.append(numpy_helper.from_array(np.roll(value, 1, axis=0), "zoo_head.weight"))
    head.input[0] = "zoo_head.weight"
    return True


def _d_model(model: onnx.ModelProto) -> int:
    from gamexport.graph.builder import read_graph_config

    return read_graph_config(model)[0].d_model


#: name → mutant. The issue's list (issue 12 item 1).
MUTANTS: dict[str, Callable] = {f.__name__: f for f in (
    conv_taps_reversed, conv_shifted, conv_bias_dropped, memory_scaled, gates_swapped,
    gate_bias_dropped_one_layer, ffn_bias_dropped_one, tanh_gelu, layernorm_eps, int8_scale_wrong,
    position_off_by_one, state_not_advanced, head_wrong_tensor)}

#: Precisions whose graphs gamexport's builder writes itself (int8-dyn is derived from the fp32 inlined graph).
BUILT = ("fp32", "fp16", "bf16", "int8")


def applies(mutant: str, precision: str) -> bool:
    """Whether a mutant makes sense at a precision (INT8 scales exist only in int8 graphs)."""
    return mutant != "int8_scale_wrong" or precision == "int8"


# ---- planting into a build folder -----------------------------------------------------------------------------
def mutate_file(src: Path, dst: Path, mutant: str, kind: str, precision: str) -> bool:
    """Write the mutated graph of ``src`` to ``dst`` and its inlined twin beside it; whether anything changed."""
    model = onnx.load(str(src))
    changed = MUTANTS[mutant](model, kind, precision)
    if changed:
        dst.write_bytes(serialize(model))
        dst.with_name(graph_file_name(kind, precision, inlined=True)).write_bytes(serialize(inline(model)))
    return changed


def plant(folder: Path, mutant: str, precision: str) -> list[str]:
    """Plant ``mutant`` into every graph of ``precision`` in the build ``folder`` (in place); the files changed.

    ``.ort`` files are regenerated from the mutated graphs; the manifest's entries are rewritten to match.
    """
    from gamexport.engines.ort import write_int8_dynamic, write_ort_format

    folder = Path(folder)
    changed: list[str] = []
    for kind in ("prefill", "step"):
        if precision == "int8-dyn":  # what the exporter quantizes: the (mutated) fp32 inlined graph
            scratch = folder / f".zoo-{kind}.onnx"
            if not mutate_file(folder / graph_file_name(kind), scratch, mutant, kind, "fp32"):
                scratch.unlink(missing_ok=True)
                continue
            inlined = scratch.with_name(graph_file_name(kind, "fp32", inlined=True))
            fp32_inlined = folder / graph_file_name(kind, inlined=True)
            saved = fp32_inlined.read_bytes()
            fp32_inlined.write_bytes(inlined.read_bytes())
            try:
                write_int8_dynamic(fp32_inlined, folder / graph_file_name(kind, "int8-dyn"))
            finally:
                fp32_inlined.write_bytes(saved)
                scratch.unlink()
            names = [graph_file_name(kind, "int8-dyn")]
        else:
            path = folder / graph_file_name(kind, precision)
            if not mutate_file(path, path, mutant, kind, precision):
                continue
            names = [path.name, graph_file_name(kind, precision, inlined=True)]
        ort = folder / names[0].replace(".onnx", ".ort")
        if ort.is_file():
            write_ort_format(folder / names[0], folder)
            names.append(ort.name)
        changed += names
    rewrite_manifest(folder, changed)
    return changed


def rewrite_manifest(folder: Path, names: list[str]) -> None:
    """Rewrite the manifest entries of ``names`` (size, sha256), as a buggy exporter's manifest would read."""
    import json

    from gamexport.fsutil import sha256_file

    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for name in names:
        manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    path.write_text(json.dumps(manifest, indent=2))


# ---- the two judges -------------------------------------------------------------------------------------------
def recheck_rows(folder: Path, precision: str) -> list[dict]:
    """``gamexport parity DIR --precision P`` in process: its rows."""
    from gamexport.pipeline.recheck import recheck

    return recheck(folder, precisions=(precision,), threads=1)["parity"]


def build_rows(ckpt, eager, folder: Path, precision: str, text_ids, eval_ids, emulate: dict) -> list[dict]:
    """The rows the build computes for ``precision`` over the graphs in ``folder`` (the build's own functions);
    ``emulate``: ``gamexport.parity.emulation.emulators`` of the build (the references depend on the checkpoint alone)."""
    from gamexport.engines.ort import OrtRunner
    from gamexport.pipeline.stages import parity_checks, variant_parity_checks
    from gamexport.targets import OpenOptions, open_runner

    cfg = ckpt.config
    if precision == "fp32":
        runners = {artifact: (lambda m=m, st=st: OrtRunner(folder / m, folder / st, cfg, 1))
                   for artifact, m, st in (("functions", "model.onnx", "step.onnx"),
                                           ("inlined", "model.inlined.onnx", "step.inlined.onnx"),
                                           ("ort-format", "model.ort", "step.ort"))}
        rows, kept = parity_checks(ckpt, eager, runners, lambda m: None, text_ids)
        kept.close()
        return [r for r in rows if r["runtime"] != "eager"]
    # bf16: the build's structural run on the CPU (gamexport.targets: Target.structural)
    runner = open_runner("onnxruntime-cpu", precision, folder, cfg, OpenOptions(threads=1),
                         structural=precision == "bf16")
    try:
        return variant_parity_checks(ckpt, eager, runner, lambda m: None, eval_ids, emulate, 1)
    finally:
        runner.close()


def caught_by(rows: list[dict]) -> list[str]:
    """The gated rows that failed, as 'graph/input/reference: checks'."""
    return [f"{r['graph']}/{r['input']}/{r['reference']}: {','.join(r.get('failed_checks') or ['error'])}"
            for r in rows if not r["passed"] and r.get("gated", True)]
