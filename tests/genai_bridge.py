"""BRIDGE, tests only — remove once gamexport's graphs carry the ecosystem's state convention natively (issue 14,
item 1).

Today's step graph takes one packed ``conv_state [B, L, k-1, d]`` and ``position_ids [B, 1]`` (the first token's
position) and returns ``conv_state_out``; onnxruntime-genai wants one rank-3 state per layer
(``past_key_values.{i}.conv_state`` → ``present.{i}.conv_state``) and ``position_ids [B, T]`` (every token's
absolute position). :func:`to_state_convention` rewrites a step graph into that convention by graph surgery around
the unchanged body, so the bundle writer and the real onnxruntime-genai client can be tested before item 1 lands:

- each per-layer input is Unsqueezed at axis 1 and the L of them Concatenated into the packed state the body reads;
- the packed output is Split along axis 1 and each piece Squeezed into the per-layer outputs;
- ``position_ids [B, T]`` is sliced to its first column, the ``[B, 1]`` the body reads (exact for the equal-length
  batches the tests run; the real graphs will use every column).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from gamexport.config import (CONV_STATE, CONV_STATE_OUT, POSITION_IDS, GAMConfig, past_state_name,
                              present_state_name)

_PACKED_IN, _PACKED_OUT, _FIRST_POS = "bridge/packed_state", "bridge/packed_state_out", "bridge/first_position"


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every use of value ``old`` in the graph's own nodes (and their subgraphs' inputs) renamed to ``new``."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def to_state_convention(src: str | Path, dst: str | Path, cfg: GAMConfig) -> Path:
    """Write ``dst``: the step graph ``src`` with per-layer state I/O and ``position_ids [B, T]``."""
    model = onnx.load(str(src))
    g = model.graph
    L, K, d = cfg.n_layers, cfg.state_len, cfg.d_model
    old_inputs = {v.name: v for v in g.input}
    old_outputs = {v.name: v for v in g.output}
    if CONV_STATE not in old_inputs or CONV_STATE_OUT not in old_outputs:
        raise ValueError(f"{src} is not a packed-state step graph")
    _rename(g, CONV_STATE, _PACKED_IN)
    _rename(g, POSITION_IDS, _FIRST_POS)
    _rename(g, CONV_STATE_OUT, _PACKED_OUT)

    state_type = old_inputs[CONV_STATE].type.tensor_type.elem_type
    inputs = [v for v in g.input if v.name not in (CONV_STATE, POSITION_IDS)]
    inputs.insert(1, helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, ["batch", "chunk"]))
    inputs += [helper.make_tensor_value_info(past_state_name(i), state_type, ["batch", K, d]) for i in range(L)]
    outputs = [v for v in g.output if v.name != CONV_STATE_OUT]
    outputs += [helper.make_tensor_value_info(present_state_name(i), state_type, ["batch", K, d])
                for i in range(L)]

    const = lambda name, values: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    nodes = [const("bridge/axis1", [1]), const("bridge/zero", [0]), const("bridge/one", [1]),
             helper.make_node("Slice", [POSITION_IDS, "bridge/zero", "bridge/one", "bridge/axis1"], [_FIRST_POS])]
    for i in range(L):
        nodes.append(helper.make_node("Unsqueeze", [past_state_name(i), "bridge/axis1"], [f"bridge/past{i}"]))
    nodes.append(helper.make_node("Concat", [f"bridge/past{i}" for i in range(L)], [_PACKED_IN], axis=1))
    tail = [helper.make_node("Split", [_PACKED_OUT], [f"bridge/present{i}" for i in range(L)], axis=1,
                             num_outputs=L)]
    tail += [helper.make_node("Squeeze", [f"bridge/present{i}", "bridge/axis1"], [present_state_name(i)])
             for i in range(L)]
    body = list(g.node)
    del g.node[:]
    g.node.extend(nodes + body + tail)
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(outputs)
    onnx.checker.check_model(model)
    dst = Path(dst)
    onnx.save(model, str(dst))
    return dst


def bridge_build(build_dir: Path, cfg: GAMConfig, precisions=("fp32",)) -> Path:
    """Rewrite a (copied) build folder's step graphs of ``precisions`` in place into the new convention."""
    from gamexport.layout import graph_file

    for precision in precisions:
        path = build_dir / graph_file("step", precision)
        to_state_convention(path, path, cfg)
    return build_dir


def refresh_manifest(build_dir: Path) -> None:
    """The manifest's file list recomputed after the bridge rewrote graphs (and bundles were added), so that
    commands which verify the folder accept the bridged copy; every other field is kept."""
    from gamexport.fsutil import atomic_write_json, sha256_file
    from gamexport.manifest import read_manifest
    from gamexport.layout import MANIFEST

    manifest = read_manifest(build_dir)
    manifest["files"] = {p.relative_to(build_dir).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in sorted(build_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(build_dir / MANIFEST, manifest)
