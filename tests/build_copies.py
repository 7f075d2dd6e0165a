"""Edited copies of build folders for tests: a graph rewritten to the packed-state format 1 (to plant an old
folder), and a manifest recomputed after files of a copied folder were changed."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from gamexport.config import past_state_name, present_state_name


def legacy_graph(model: onnx.ModelProto, n_layers: int) -> onnx.ModelProto:
    """``model`` with the format-1 state I/O: one packed ``conv_state`` [B, L, k-1, d] in (step), ``conv_state``
    (prefill) or ``conv_state_out`` (step) out, split and stacked around the same body; computes the same."""
    old = onnx.ModelProto()
    old.CopyFrom(model)
    g = old.graph
    step = any(v.name == past_state_name(0) for v in g.input)
    dims = [d.dim_param or d.dim_value for d in g.output[1].type.tensor_type.shape.dim]   # [batch, k-1, d]
    packed = [dims[0], n_layers, *dims[1:]]
    head = []
    if step:
        kept = [v for v in g.input if v.name in ("input_ids", "position_ids")]
        del g.input[:]
        g.input.extend(kept + [helper.make_tensor_value_info("conv_state", TensorProto.FLOAT, packed)])
        for i in range(n_layers):
            head += [helper.make_node("Constant", [], [f"legacy_layer_{i}"], value_int=i),
                     helper.make_node("Gather", ["conv_state", f"legacy_layer_{i}"], [past_state_name(i)], axis=1)]
    tail = [helper.make_node("Constant", [], ["legacy_one"],
                             value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))]
    for i in range(n_layers):
        tail.append(helper.make_node("Unsqueeze", [present_state_name(i), "legacy_one"], [f"legacy_{i}_4d"]))
    out_name = "conv_state_out" if step else "conv_state"
    tail.append(helper.make_node("Concat", [f"legacy_{i}_4d" for i in range(n_layers)], [out_name], axis=1))
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    logits = g.output[0]
    del g.output[:]
    g.output.extend([logits, helper.make_tensor_value_info(out_name, TensorProto.FLOAT, packed)])
    return old


def refresh_manifest(build_dir: Path) -> None:
    """The manifest's file list recomputed after files of a copied build folder changed; every other field kept."""
    from gamexport.fsutil import atomic_write_json, sha256_file
    from gamexport.layout import MANIFEST
    from gamexport.manifest import read_manifest

    manifest = read_manifest(build_dir)
    manifest["files"] = {p.relative_to(build_dir).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in sorted(build_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(build_dir / MANIFEST, manifest)
