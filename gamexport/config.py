"""Model configuration (``GAMConfig``) and the I/O contract shared by export, runners and tests."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError, GraphError
from .jsonfile import short

#: Integer fields and their (lowest, highest) accepted values. The upper bounds are far above any model this tool
#: exports (the paper: V 10,000, d 512, L 6, S 512, k 3, P 256) and stop absurd values (a 5,000-digit vocabulary)
#: before they reach numpy.
INT_FIELDS = {"vocab_size": (1, 1 << 24), "d_model": (1, 65536), "n_layers": (1, 1024), "n_slots": (1, 1 << 20),
              "kernel_size": (2, 1024), "max_positions": (1, 1 << 20)}
#: Float fields: (low, high, closed): dropout in [0, 1); ln_eps in (0, 0.1].
FLOAT_FIELDS = {"dropout": (0.0, 1.0, False), "ln_eps": (0.0, 0.1, True)}


@dataclass(frozen=True)
class GAMConfig:
    """Shape of a GAM language model (arXiv 2509.00605).

    Field names follow the paper's prose; ``ModelConfig`` of the reference code calls them VOCAB_SIZE, N_EMBED,
    N_LAYER, NUM_MEMORY_SLOTS, CONV_KERNEL_SIZE and BLOCK_SIZE.
    """

    vocab_size: int = 10_000
    d_model: int = 512
    n_layers: int = 6
    n_slots: int = 512          # S: rows of each block's memory bank
    kernel_size: int = 3        # k: causal depthwise convolution width
    max_positions: int = 256    # P: learned absolute positions
    dropout: float = 0.1
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        """Every field checked for type and a sane range, so a bad config.json is one line naming the field."""
        for name, (lo, hi) in INT_FIELDS.items():
            value = getattr(self, name)
            integer = isinstance(value, int) and not isinstance(value, bool)
            if integer and value > hi:
                raise ConfigError(f"config field {name} must be at most {hi:,}, got {short(value)}",
                                  "fix config.json or the preset")
            if name == "kernel_size" and integer and value < lo:
                raise ConfigError(f"config field kernel_size must be an integer >= 2, got {value!r}",
                                  "GAM's causal convolution needs a kernel of at least 2 (the paper uses 3)")
            if not integer or value < lo:
                raise ConfigError(f"config field {name} must be a positive integer, got {short(value)}",
                                  "fix config.json or the preset")
        for name, (lo, hi, closed) in FLOAT_FIELDS.items():
            value = getattr(self, name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy floats too
            finite = number and (isinstance(value, numbers.Integral) or math.isfinite(value))  # no float(10**400)
            if not finite or not (lo <= value < hi if not closed else lo < value <= hi):
                span = f"[{lo}, {hi})" if not closed else f"({lo}, {hi}]"
                raise ConfigError(f"config field {name} must be a number in {span}, got {short(value)}",
                                  "fix config.json")

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def state_len(self) -> int:
        """Rows of streaming state per layer: the last k-1 LayerNorm-1 outputs."""
        return self.kernel_size - 1

    @property
    def receptive_field(self) -> int:
        """Tokens that can influence one output: 1 + L·(k-1)."""
        return 1 + self.n_layers * (self.kernel_size - 1)

    def n_params(self) -> int:
        """Parameter count with the head tied to the token embedding (counted once)."""
        d, k, S = self.d_model, self.kernel_size, self.n_slots
        per_block = (
            d * k + d            # depthwise conv weight (d, 1, k) + bias
            + S * d              # memory bank
            + d * 2 * d + 2 * d  # gate
            + d * 4 * d + 4 * d + 4 * d * d + d  # FFN
            + 4 * d              # two LayerNorms
        )
        return self.vocab_size * d + self.max_positions * d + self.n_layers * per_block + 2 * d

    # ---- (de)serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "gam", **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GAMConfig":
        if not isinstance(data, Mapping):
            raise ConfigError("config must be a JSON object", "fix config.json")
        if data.get("model_type", "gam") != "gam":
            raise ConfigError(f"config model_type is {short(data.get('model_type'))}, not 'gam'",
                              "point gamexport at a GAM checkpoint")
        known = {f.name for f in dataclasses.fields(cls)}
        # Accept the reference code's ModelConfig names too.
        aliases = {"VOCAB_SIZE": "vocab_size", "N_EMBED": "d_model", "N_LAYER": "n_layers",
                   "NUM_MEMORY_SLOTS": "n_slots", "CONV_KERNEL_SIZE": "kernel_size",
                   "BLOCK_SIZE": "max_positions", "DROPOUT": "dropout"}
        values = {}
        for key, value in data.items():
            key = aliases.get(key, key)
            if key in known:
                values[key] = value
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"config is not valid: {exc}", "fix config.json") from exc

    def replace(self, **changes: Any) -> "GAMConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, GAMConfig] = {
    # The paper's configuration: exactly 22,599,680 parameters.
    "paper": GAMConfig(),
    # A few-kB model for tests: every code path, milliseconds per call.
    "tiny": GAMConfig(vocab_size=97, d_model=32, n_layers=2, n_slots=16, kernel_size=3, max_positions=64),
    # A small CPU-trainable model (the training issue's demo size).
    "small": GAMConfig(vocab_size=4096, d_model=128, n_layers=4, n_slots=128, kernel_size=3, max_positions=256),
}


def preset(name: str) -> GAMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}",
                          f"choose one of: {', '.join(sorted(PRESETS))}") from None


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def infer_config(shapes: Mapping[str, tuple[int, ...]], base: GAMConfig | None = None) -> GAMConfig:
    """Infer V, d, L, S, k and P from the tensor shapes of a GAM state_dict (names as the reference code)."""
    def shape_of(*names: str) -> tuple[int, ...]:
        for name in names:
            if name in shapes:
                return tuple(shapes[name])
        raise ConfigError(f"checkpoint has no tensor {names[0]!r}",
                          "is this a GAM checkpoint with the reference code's parameter names?")

    emb = shape_of("token_embedding.weight", "head.weight")
    pos = shape_of("pos_embedding.weight")
    layers = sorted({int(m.group(1)) for name in shapes if (m := _BLOCK_KEY.match(name))})
    if not layers:
        raise ConfigError("checkpoint has no blocks.{i}.* tensors",
                          "is this a GAM checkpoint with the reference code's parameter names?")
    if layers != list(range(len(layers))):
        raise ConfigError(f"checkpoint block indices are not 0..{len(layers) - 1}: {layers}",
                          "the checkpoint is incomplete; re-save it from the model")
    mem = shape_of("blocks.0.memory_bank")
    conv = shape_of("blocks.0.causal_conv.weight")
    if len(emb) != 2 or len(pos) != 2 or len(mem) != 2 or len(conv) != 3:
        raise ConfigError("checkpoint tensors have unexpected ranks "
                          f"(token_embedding {emb}, pos_embedding {pos}, memory_bank {mem}, causal_conv {conv})",
                          "is this a GAM checkpoint?")
    base = base or GAMConfig()
    return base.replace(vocab_size=emb[0], d_model=emb[1], n_layers=len(layers), n_slots=mem[0],
                        kernel_size=conv[2], max_positions=pos[0])


def expected_shapes(cfg: GAMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the reference state_dict (both names of the tied pair) and its shape."""
    d, k = cfg.d_model, cfg.kernel_size
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedding.weight": (cfg.vocab_size, d),
        "pos_embedding.weight": (cfg.max_positions, d),
    }
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        shapes.update({
            p + "ln1.weight": (d,), p + "ln1.bias": (d,),
            p + "causal_conv.weight": (d, 1, k), p + "causal_conv.bias": (d,),
            p + "memory_bank": (cfg.n_slots, d),
            p + "gate.weight": (2 * d, d), p + "gate.bias": (2 * d,),
            p + "ln2.weight": (d,), p + "ln2.bias": (d,),
            p + "ffn.0.weight": (4 * d, d), p + "ffn.0.bias": (4 * d,),
            p + "ffn.2.weight": (d, 4 * d), p + "ffn.2.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,), "head.weight": (cfg.vocab_size, d)})
    return shapes


# ---- I/O contract of the exported graphs (names, dtypes, axes) -----------------------------------------------
# The streaming state crosses the graph boundary as one tensor per layer, named as onnxruntime-genai (model type
# lfm2), Optimum and transformers.js name a convolution cache: ``past_key_values.{i}.conv_state`` in,
# ``present.{i}.conv_state`` out, each [batch, k-1, d]. The Python Runner API keeps one packed (B, L, k-1, d)
# array (``gamexport.state`` packs and unpacks it at each session call).
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
LOGITS = "logits"
_PAST_STATE = "past_key_values.{}.conv_state"
_PRESENT_STATE = "present.{}.conv_state"
#: The build folder's format: 2 = per-layer states and position_ids [B, T]; 1 (before it) had one packed state.
FORMAT_VERSION = 2
#: The single packed state input of format-1 graphs, recognised only to refuse such a folder (``LEGACY_REFUSAL``).
LEGACY_STATE = "conv_state"
LEGACY_REFUSAL = "built by an older gamexport (packed conv_state); rebuild it with `gamexport build`"


def past_state_name(layer: int) -> str:
    """Name of layer ``layer``'s state input of the step graph: ``past_key_values.{layer}.conv_state``, shape
    [batch, k-1, d_model] (onnxruntime-genai, Optimum, transformers.js)."""
    return _PAST_STATE.format(layer)


def present_state_name(layer: int) -> str:
    """Name of layer ``layer``'s state output (prefill and step graphs): ``present.{layer}.conv_state``, fed back as
    :func:`past_state_name` of the same layer on the next call."""
    return _PRESENT_STATE.format(layer)


def past_state_names(cfg: GAMConfig) -> list[str]:
    return [past_state_name(i) for i in range(cfg.n_layers)]


def present_state_names(cfg: GAMConfig) -> list[str]:
    return [present_state_name(i) for i in range(cfg.n_layers)]


def state_layer(name: str) -> int | None:
    """The layer of a per-layer state name (past or present), None for any other name."""
    for pattern in (_PAST_STATE, _PRESENT_STATE):
        head, tail = pattern.split("{}")
        middle = name[len(head):len(name) - len(tail)] if name.startswith(head) and name.endswith(tail) else ""
        if middle.isdigit() and str(int(middle)) == middle:
            return int(middle)
    return None


def refuse_legacy(names, where: str) -> None:
    """GraphError (one line) when ``names`` — a graph's or engine's I/O names — hold the packed state of format 1."""
    if LEGACY_STATE in set(names):
        raise GraphError(f"{where} was {LEGACY_REFUSAL}")


def last_position(logits):
    """Of a chunk's logits (B, C, V), what a step graph returns: the last position's, (B, 1, V)."""
    return logits[:, -1:]


def io_spec(cfg: GAMConfig, graph: str) -> dict[str, list[tuple[str, str, list[int | str]]]]:
    """Names, element types and shapes (symbolic axes as strings) of a graph's inputs and outputs."""
    state = ["batch", cfg.state_len, cfg.d_model]
    presents = [(name, "float32", state) for name in present_state_names(cfg)]
    if graph == "prefill":
        return {"inputs": [(INPUT_IDS, "int64", ["batch", "sequence"])],
                "outputs": [(LOGITS, "float32", ["batch", "sequence", cfg.vocab_size]), *presents]}
    if graph == "step":
        return {"inputs": [(INPUT_IDS, "int64", ["batch", "chunk"]),
                           (POSITION_IDS, "int64", ["batch", "chunk"]),
                           *[(name, "float32", state) for name in past_state_names(cfg)]],
                # the last position's logits only: a static 1 (onnxruntime-genai reads it as "pruned" logits)
                "outputs": [(LOGITS, "float32", ["batch", 1, cfg.vocab_size]), *presents]}
    raise ValueError(f"unknown graph kind {graph!r}")
