"""An onnxruntime-genai bundle of one precision's step graph (plain file writer, no onnxruntime-genai import).

Layout written under the build folder (``gamexport.layout.genai_dir``: ``genai/`` for fp32, ``genai-<precision>/``
for the others)::

    genai/model.onnx              the build's step[.<precision>].onnx (a hard link where the file system allows)
    genai/genai_config.json       model type lfm2, every layer "conv", the I/O names spelled out, search defaults
    genai/tokenizer.json          the build's tokenizer (absent when the model has none: the bundle runs on ids)
    genai/tokenizer_config.json   what onnxruntime-genai's tokenizer reads beside it (PreTrainedTokenizerFast)

Why ``lfm2``: onnxruntime-genai's ``lfm2`` model type drives a decoder whose per-layer state is a convolution state
(``[batch, k-1, d]``, zero at the start, each present fed back as the next past); a layer that is not
``"full_attention"`` is such a conv layer, so all layers ``"conv"`` is GAM: no KV cache at all. The graph must take
the ecosystem's state convention (``past_key_values.{i}.conv_state`` → ``present.{i}.conv_state`` per layer,
``position_ids [batch, sequence]``); :func:`convention_problem` says in one line why a graph does not, and
:func:`write_bundle` refuses such a graph with that line. The names are written out in ``genai_config.json``
(onnxruntime-genai's defaults for them differ between its wheel and its source).

The bundle is assembled in a staging folder beside its destination and swapped into place (``replace_dir``), so
``og.Model(path)`` never sees a half-written bundle.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gamexport.config import INPUT_IDS, LOGITS, POSITION_IDS, GAMConfig, past_state_name, present_state_name
from gamexport.errors import GraphError
from gamexport.fsutil import atomic_write_json, replace_dir
from gamexport.jsonfile import read_json
from gamexport.layout import CONFIG, TOKENIZER, genai_dir, graph_file

DECODER_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
#: The model type of onnxruntime-genai that runs a conv-state-only decoder.
MODEL_TYPE = "lfm2"
#: Sampling defaults written into the ``search`` section: greedy unless a caller turns sampling on, and then the
#: same temperature, top-k and top-p as ``gamexport generate``.
SEARCH_DEFAULTS = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "min_length": 0,
                   "temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.0,
                   "length_penalty": 1.0, "early_stopping": True, "past_present_share_buffer": False}


class BundleError(GraphError):
    """A build folder, or a graph in it, that cannot make an onnxruntime-genai bundle."""


def _value_shapes(values) -> dict[str, list]:
    """{name: [dim value or symbolic name, …]} of graph inputs or outputs."""
    shapes = {}
    for v in values:
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return shapes


def convention_problem(step_path: str | Path, cfg: GAMConfig) -> str | None:
    """None when the step graph at ``step_path`` has the I/O onnxruntime-genai drives, else one line saying why not.

    Wanted: inputs ``input_ids [B, T]``, ``position_ids [B, T]`` and ``past_key_values.{i}.conv_state [B, k-1, d]``
    for every layer; outputs ``logits`` and ``present.{i}.conv_state``. Nothing else is read than the I/O.
    """
    import onnx

    step_path = Path(step_path)
    try:
        model = onnx.load(str(step_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for corrupt files
        return f"{step_path.name} cannot be read as ONNX ({type(exc).__name__})"
    inits = {i.name for i in model.graph.initializer}
    inputs = _value_shapes(v for v in model.graph.input if v.name not in inits)
    outputs = _value_shapes(model.graph.output)
    L, state = cfg.n_layers, [cfg.state_len, cfg.d_model]
    pasts = [past_state_name(i) for i in range(L)]
    presents = [present_state_name(i) for i in range(L)]
    missing = [n for n in (INPUT_IDS, POSITION_IDS, *pasts) if n not in inputs]
    missing += [n for n in (LOGITS, *presents) if n not in outputs]
    if missing:
        have = ", ".join(inputs)
        return (f"{step_path.name} has no {missing[0]} (inputs: {have}): onnxruntime-genai needs one state per "
                f"layer, {pasts[0]} -> {presents[0]}")
    extra = sorted(set(inputs) - {INPUT_IDS, POSITION_IDS, *pasts})
    if extra:
        return f"{step_path.name} takes {extra[0]}, an input onnxruntime-genai does not feed"
    position = inputs[POSITION_IDS]
    if len(position) != 2 or position[1] == 1:
        return (f"{step_path.name}'s {POSITION_IDS} has shape {position}: onnxruntime-genai feeds the absolute "
                "position of every token, [batch, sequence]")
    for name in pasts + presents:
        shape = (inputs if name in inputs else outputs)[name]
        if len(shape) != 3 or shape[1:] != state:
            return (f"{step_path.name}'s {name} has shape {shape}: onnxruntime-genai's conv layers need a rank-3 "
                    f"state [batch, {cfg.state_len}, {cfg.d_model}]")
    return None


def special_tokens(tokenizer) -> dict[str, object]:
    """bos/eos/pad ids for ``genai_config.json``. gamexport's tokenizers have one special document token (also the
    EOS): it serves as BOS and PAD too, as in GPT-2. Without a tokenizer there is no such token, but
    onnxruntime-genai always has an end id (with no eos it stops at the pad id, which must be a real id: measured
    with 0.18.0): id 0 is written as both, so the config says what the client does — generation stops after a 0."""
    eos = tokenizer.eos_id if tokenizer is not None else None
    if eos is None:
        return {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}


def _layer_pattern(name_of) -> str:
    """The printf pattern onnxruntime-genai expands per layer (``past_key_values.%d.conv_state``), from the one
    function that names layer ``i``'s state."""
    pattern = name_of(918273).replace("918273", "%d")
    assert pattern.count("%d") == 1 and pattern % 1 == name_of(1), pattern
    return pattern


def genai_config(cfg: GAMConfig, tokenizer=None, decoder: str = DECODER_FILE) -> dict:
    """The ``genai_config.json`` of a GAM step graph in the ecosystem's convention."""
    return {
        "model": {
            "type": MODEL_TYPE,
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.max_positions,
            **special_tokens(tokenizer),
            "decoder": {
                "filename": decoder,
                "num_hidden_layers": cfg.n_layers,
                "hidden_size": cfg.d_model,
                "layer_types": ["conv"] * cfg.n_layers,
                "session_options": {"provider_options": []},
                "inputs": {"input_ids": INPUT_IDS, "position_ids": POSITION_IDS,
                           "past_conv_names": _layer_pattern(past_state_name)},
                "outputs": {"logits": LOGITS, "present_conv_names": _layer_pattern(present_state_name)},
            },
        },
        "search": {**SEARCH_DEFAULTS, "max_length": cfg.max_positions},
    }


def tokenizer_config(tokenizer, cfg: GAMConfig) -> dict:
    """``tokenizer_config.json`` for onnxruntime-genai's tokenizer (Hugging Face's fast-tokenizer fields)."""
    eos = tokenizer.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None
    unk = "<unk>" if tokenizer.token_to_id("<unk>") is not None else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_positions,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    config.update({key: value for key, value in (("bos_token", eos), ("eos_token", eos), ("pad_token", eos),
                                                 ("unk_token", unk)) if value is not None})
    return config


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def read_build(build_dir: Path):
    """(config, tokenizer or None) of a build folder, each refused in one line when unreadable."""
    from gamexport.tokenizer import Tokenizer

    if not (build_dir / CONFIG).is_file():
        raise BundleError(f"{build_dir} has no {CONFIG}", "pass a folder written by gamexport build")
    cfg = GAMConfig.from_dict(read_json(build_dir / CONFIG, error=BundleError,
                                        fix="rebuild the folder with gamexport build"))
    tokenizer = Tokenizer.from_file(build_dir / TOKENIZER) if (build_dir / TOKENIZER).is_file() else None
    return cfg, tokenizer


def write_bundle(build_dir: str | Path, precision: str = "fp32") -> Path:
    """Write ``<build_dir>/genai[-<precision>]/`` from the build's step graph of ``precision``; returns its path.

    Refused in one line (``BundleError``), before anything is written, when the build folder or its step graph is
    missing or the graph lacks the state convention. An existing bundle is replaced atomically. The build calls it
    on its staging folder, before the manifest is written; called on a finished build folder, it leaves the
    manifest as it was (``gamexport verify`` then names the bundle's files as not listed).
    """
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise BundleError(f"build folder {build_dir} does not exist", "pass a folder written by gamexport build")
    step = build_dir / graph_file("step", precision)
    if not step.is_file():
        raise BundleError(f"{step} does not exist", f"rebuild with --precision {precision}")
    cfg, tokenizer = read_build(build_dir)
    problem = convention_problem(step, cfg)
    if problem is not None:
        raise BundleError(problem, "rebuild the graphs with a gamexport that writes per-layer states")

    target = build_dir / genai_dir(precision)
    staging = build_dir / f".{target.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        _link_or_copy(step, staging / DECODER_FILE)
        atomic_write_json(staging / CONFIG_FILE, genai_config(cfg, tokenizer))
        if tokenizer is not None:
            shutil.copyfile(build_dir / TOKENIZER, staging / TOKENIZER)
            atomic_write_json(staging / TOKENIZER_CONFIG, tokenizer_config(tokenizer, cfg))
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


__all__ = ["BundleError", "CONFIG_FILE", "DECODER_FILE", "TOKENIZER_CONFIG", "convention_problem",
           "genai_config", "read_build", "special_tokens", "tokenizer_config", "write_bundle"]
