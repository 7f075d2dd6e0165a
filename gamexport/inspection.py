"""Human-readable descriptions of checkpoints, ONNX files and build folders (``gamexport inspect``)."""

from __future__ import annotations

from pathlib import Path

from .config import FORMAT_VERSION, GAMConfig, past_state_name, present_state_name


def _config_lines(cfg: GAMConfig) -> list[str]:
    return [
        f"config: vocab {cfg.vocab_size}, d_model {cfg.d_model}, layers {cfg.n_layers}, slots {cfg.n_slots}, "
        f"kernel {cfg.kernel_size}, positions {cfg.max_positions}",
        f"parameters: {cfg.n_params():,} (head tied to the token embedding)",
        f"streaming: receptive field {cfg.receptive_field} tokens; state {cfg.n_layers}×{cfg.state_len}×"
        f"{cfg.d_model} floats per sequence",
    ]


def describe_onnx(path: Path) -> str:
    import onnx

    from .graph.builder import META_GRAPH, read_graph_config

    cfg, meta = read_graph_config(path)
    model = onnx.load(str(path), load_external_data=False)

    def dims(v) -> str:
        return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim) + "]"

    def dtype(v) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name

    lines = [f"{path}: ONNX {meta.get(META_GRAPH, '?')} graph, IR {model.ir_version}, opsets "
             + ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)]
    lines += _config_lines(cfg)
    lines += [f"input  {v.name}: {dtype(v)} {dims(v)}" for v in model.graph.input]
    lines += [f"output {v.name}: {dtype(v)} {dims(v)}" for v in model.graph.output]
    lines.append(f"state: {cfg.n_layers} per-layer tensors [batch, {cfg.state_len}, {cfg.d_model}], "
                 f"{past_state_name('{i}')} -> {present_state_name('{i}')} (build folder format {FORMAT_VERSION})")
    if model.functions:
        lines.append("functions: " + ", ".join(f"{f.domain}.{f.name} ({len(f.node)} nodes)" for f in model.functions))
    else:
        lines.append("functions: none (inlined)")
    ops: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    lines.append("main-graph nodes: " + ", ".join(f"{k}×{v}" for k, v in sorted(ops.items())))
    lines.append(f"source weights sha256: {meta.get('gamexport.source_sha256', '?')}")
    return "\n".join(lines)


def describe(path: str) -> str:
    from .checkpoint import load_checkpoint
    from .errors import GamexportError
    from .manifest import MANIFEST_NAME

    p = Path(path)
    if not p.exists():
        raise GamexportError(f"{p} does not exist", "pass a checkpoint, an .onnx file or a build folder")
    if p.is_file() and p.suffix == ".onnx":
        return describe_onnx(p)
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        parts = [f"{p}: build folder"]
        for name in ("model.onnx", "step.onnx"):
            if (p / name).is_file():
                parts.append(describe_onnx(p / name))
        return "\n\n".join(parts)
    ckpt = load_checkpoint(p)
    lines = [f"{ckpt.source}: checkpoint, sha256 {ckpt.sha256}"] + _config_lines(ckpt.config)
    lines.append(f"tensors: {len(ckpt.weights)} (tied head stored once)")
    lines.append(f"tokenizer: {ckpt.tokenizer_path or 'none'}")
    if "trained" in ckpt.meta:
        lines.append(f"trained: {ckpt.meta['trained']}")
    return "\n".join(lines)
