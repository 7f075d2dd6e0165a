"""A mutant zoo: plausible exporter bugs planted into *built graphs*, to prove that the parity gates catch them.

Each mutant edits the ONNX ``ModelProto`` of one built graph (an initializer, a node, an attribute inside a
``gam.<F>`` function body, or its inlined copies) the way a buggy exporter would have written it. :func:`plant`
applies a mutant to every graph of one precision in a hardlinked copy of a build folder (:func:`link_copy`) — the
function graphs, their inlined twins (re-inlined from the mutated graph, as the exporter derives them), the fp32
``.ort`` files (regenerated) and, for ``int8-dyn``, the quantized graph itself or, where quantization must see the
edit, the dynamic quantization of the mutated fp32 graph (:data:`INT8_DYN_DIRECT` says which) — and rewrites the
manifest entries, as a buggy exporter would write a consistent manifest. Then the build's own parity rows (:func:`build_rows`) and
``gamexport parity DIR`` (:func:`recheck_rows`) must each fail a gated row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gamexport.graph.builder import inline, serialize
from gamexport.layout import graph_file

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


def _body_nodes(model: onnx.ModelProto, function: str, op_type: str) -> tuple[object, list[onnx.NodeProto]]:
    """The ``op_type`` nodes of ``gam.<function>``'s body and the node field holding them: the function's own body
    (one node, shared by every block), or — in an inlined graph such as int8-dyn's, whose bodies were inlined into
    the main graph with their outputs named ``<function>/...`` — every block's copy."""
    f = next((f for f in model.functions if f.name == function), None)
    if f is not None:
        return f.node, _nodes(f.node, op_type)
    return model.graph.node, [n for n in _nodes(model.graph.node, op_type) if n.output[0].startswith(function + "/")]


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
    field, softmaxes = _body_nodes(model, "MemoryRead", "Softmax")
    for i, softmax in enumerate(softmaxes):
        softmax = next(n for n in field if list(n.output) == list(softmax.output))  # the insert copied the nodes
        scale = _const(f"MemoryRead/zoo_scale{i}", 1.0 / math.sqrt(cfg_d))
        scaled = helper.make_node("Mul", [softmax.input[0], f"MemoryRead/zoo_scale{i}"],
                                  [f"MemoryRead/zoo_scaled{i}"])
        softmax.input[0] = f"MemoryRead/zoo_scaled{i}"  # before inserting: the insert copies the nodes
        _insert_before(field, softmax, [scale, scaled])
    return bool(softmaxes)


def gates_swapped(model, kind, precision) -> bool:
    """The local and global gates swapped (the Split's two outputs in the wrong order)."""
    _, splits = _body_nodes(model, "GatedFusion", "Split")
    for split in splits:
        a, b = split.output
        split.output[:] = [b, a]
    return bool(splits)


def gate_bias_dropped_one_layer(model, kind, precision) -> bool:
    """One layer's gate bias dropped (blocks.1)."""
    return _edit_initializers(model, lambda n: n == "blocks.1.gate.bias", np.zeros_like) > 0


def ffn_bias_dropped_one(model, kind, precision) -> bool:
    """One FFN bias dropped (blocks.1's second Linear)."""
    return _edit_initializers(model, lambda n: n == "blocks.1.ffn.2.bias", np.zeros_like) > 0


def tanh_gelu(model, kind, precision) -> bool:
    """tanh-approximated GELU for the exact (erf) GELU."""
    _, gelus = _body_nodes(model, "FeedForward", "Gelu")
    for node in gelus:
        _attribute(node, "approximate", "tanh")
    return bool(gelus)


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


def int4_scale_wrong(model, kind, precision) -> bool:
    """One 32-value block's INT4 weight scale 3 % high (blocks.1's memory read, its first block of its first
    output): the smallest scale error an INT4 exporter can make."""
    if precision != "int4":
        return False

    def one_block(scale):
        out = scale.copy()
        out[0, 0] *= 1.03
        return out
    return _edit_initializers(model, lambda n: n == "blocks.1.memory_bank.q4T.scale", one_block) > 0


def position_off_by_one(model, kind, precision) -> bool:
    """The step graph's positions one too early (position_ids − 1 into the positional Gather; −1 gathers the last
    row, as ONNX Gather wraps negative indices, so nothing crashes — +1 would make ONNX Runtime raise at the last
    position)."""
    if kind != "step":
        return False
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "pos_embedding.weight")
    one = helper.make_node("Constant", [], ["zoo_one"], value=helper.make_tensor("zoo_one", TensorProto.INT64,
                                                                                 [], [-1]))
    shifted = helper.make_node("Add", [gather.input[1], "zoo_one"], ["zoo_position_ids"])
    gather.input[1] = "zoo_position_ids"  # before inserting: the insert copies the nodes
    _insert_before(model.graph.node, gather, [one, shifted])
    return True


def state_not_advanced(model, kind, precision) -> bool:
    """The step graph returns its input states (each layer's ``present`` = its ``past_key_values``)."""
    if kind != "step":
        return False
    from gamexport.config import past_state_name, present_state_name

    layers = [o.name for o in model.graph.output if o.name != "logits"]
    for i, name in enumerate(layers):
        assert name == present_state_name(i)
        producer = next(n for n in model.graph.node if name in n.output)   # gam.Block, or its inlined Slice
        producer.output[list(producer.output).index(name)] = f"zoo_present_{i}"   # computed, then dropped
        model.graph.node.append(helper.make_node("Identity", [past_state_name(i)], [name]))
    return bool(layers)


def head_wrong_tensor(model, kind, precision) -> bool:
    """The tied head reads a stale copy of the embedding whose rows are one token off (rows rolled by one)."""
    if precision == "int4":  # the head is a MatMulNBits of the embedding's packed rows and their block scales
        head = next(n for n in model.graph.node if n.op_type == "MatMulNBits"
                    and n.input[1].startswith("token_embedding.weight.q"))
        for i in (1, 2):
            value = numpy_helper.to_array(_initializer(model, head.input[i]))
            model.graph.initializer.append(numpy_helper.from_array(np.roll(value, 1, axis=0), "zoo_" + head.input[i]))
            head.input[i] = "zoo_" + head.input[i]
        return True
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
    position_off_by_one, state_not_advanced, head_wrong_tensor, int4_scale_wrong)}

#: Precisions whose graphs gamexport's builder writes itself (int8-dyn is derived from the fp32 inlined graph).
BUILT = ("fp32", "fp16", "bf16", "int8", "int4")


def applies(mutant: str, precision: str) -> bool:
    """Whether a mutant makes sense at a precision (INT8 scales exist only in int8 graphs, INT4 block scales only
    in int4 graphs)."""
    own = {"int8_scale_wrong": "int8", "int4_scale_wrong": "int4"}
    return mutant not in own or precision == own[mutant]


# ---- planting into a build folder -----------------------------------------------------------------------------
#: Mutants planted straight into the int8-dyn graphs: node and attribute edits, and biases, which ONNX Runtime's
#: ``quantize_dynamic`` leaves as they are (it quantizes the weight MatMuls only; the biases stay fp32 ``Add``
#: initializers under their own names), so an exporter could equally have written them into the quantized graph.
#: The others edit weights that quantization must see — the conv weights, folded into other constants by the
#: optimization before quantizing (the int8-dyn graph has no ``causal_conv.weight``), and the tied head, quantized —
#: so they are planted into the fp32 inlined graph and re-quantized by ``write_int8_dynamic``, as the build does.
INT8_DYN_DIRECT = ("memory_scaled", "gates_swapped", "tanh_gelu", "layernorm_eps", "position_off_by_one",
                   "state_not_advanced", "conv_bias_dropped", "gate_bias_dropped_one_layer", "ffn_bias_dropped_one")


def _write_new(path: Path, data: bytes) -> None:
    """Write ``path`` as a new file: the zoo's build copies are hardlinks of the demo build (:func:`link_copy`), so
    writing through an existing name would change the demo build itself."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of the build folder ``src`` whose files are hardlinks (no bytes copied); :func:`plant` writes every
    file it changes as a new file, so ``src`` stays as it was."""
    import os
    import shutil

    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def mutate_file(src: Path, dst: Path, mutant: str, kind: str, precision: str, twin: bool = True) -> bool:
    """Write the mutated graph of ``src`` to ``dst`` and (``twin``) its inlined twin beside it; whether anything
    changed."""
    model = onnx.load(str(src))
    changed = MUTANTS[mutant](model, kind, precision)
    if changed:
        _write_new(dst, serialize(model))
        if twin:
            _write_new(dst.with_name(graph_file(kind, precision, inlined=True)), serialize(inline(model)))
    return changed


def _requantized(folder: Path, mutant: str, kind: str) -> list[str]:
    """Plant ``mutant`` into the fp32 graph of ``kind`` (in a scratch folder) and write the dynamic quantization of
    its inlined twin as the folder's int8-dyn graph, as the exporter derives it; the files changed."""
    import tempfile

    from gamexport.engines.ort import write_int8_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / graph_file(kind)
        if not mutate_file(folder / graph_file(kind), scratch, mutant, kind, "fp32"):
            return []
        dst = folder / graph_file(kind, "int8-dyn")
        dst.unlink()  # a new file, never through the hardlink (write_int8_dynamic renames over it anyway)
        write_int8_dynamic(scratch.with_name(graph_file(kind, inlined=True)), dst)
    return [dst.name]


def _planted(folder: Path, mutant: str, kind: str, precision: str) -> list[str]:
    """Plant ``mutant`` into the graph of ``kind`` at ``precision`` (and its inlined twin; int8-dyn has none); the
    files changed."""
    path = folder / graph_file(kind, precision)
    twin = precision != "int8-dyn"
    if not mutate_file(path, path, mutant, kind, precision, twin=twin):
        return []
    return [path.name] + ([graph_file(kind, precision, inlined=True)] if twin else [])


def plant(folder: Path, mutant: str, precision: str) -> list[str]:
    """Plant ``mutant`` into every graph of ``precision`` in the build ``folder`` (in place); the files changed.

    The fp32 ``.ort`` files are regenerated from the mutated graphs (the build's fp32 rows run them); the int8 and
    int8-dyn ``.ort`` files, which neither judge reads, are removed rather than regenerated, so no stale graph is
    left behind. The manifest's entries are rewritten to match, as a buggy exporter's manifest would read.
    """
    from gamexport.engines.ort import write_ort_format

    folder = Path(folder)
    changed: list[str] = []
    removed: list[str] = []
    for kind in ("prefill", "step"):
        if precision == "int8-dyn" and mutant not in INT8_DYN_DIRECT:
            names = _requantized(folder, mutant, kind)
        else:
            names = _planted(folder, mutant, kind, precision)
        if not names:
            continue
        ort = folder / names[0].replace(".onnx", ".ort")
        if ort.is_file() and precision == "fp32":
            write_ort_format(folder / names[0], folder)  # atomic: a new file, the hardlink is left alone
            names.append(ort.name)
        elif ort.is_file():
            ort.unlink()
            removed.append(ort.name)
        changed += names
    rewrite_manifest(folder, changed, removed)
    return changed


def rewrite_manifest(folder: Path, names: list[str], removed: list[str] = ()) -> None:
    """Rewrite the manifest entries of ``names`` (size, sha256) and drop those of ``removed``, as a buggy
    exporter's manifest would read."""
    import json

    from gamexport.fsutil import sha256_file

    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for name in names:
        manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    for name in removed:
        del manifest["files"][name]
    _write_new(path, json.dumps(manifest, indent=2).encode())


# ---- the two judges -------------------------------------------------------------------------------------------
def recheck_rows(folder: Path, precision: str) -> list[dict]:
    """``gamexport parity DIR --precision P`` in process: its rows (the graphs' rows: the mutants are planted in the
    graphs, and og.Generator's check of the bundles has its own test in test_genai.py)."""
    from gamexport.pipeline.recheck import recheck

    return recheck(folder, precisions=(precision,), threads=1, genai=False)["parity"]


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
