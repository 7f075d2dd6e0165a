"""Loading and saving GAM checkpoints without ever executing code from a file.

Formats read: ``.safetensors`` (with ``config.json`` beside it, or the config inferred from tensor shapes) and
``.pt``/``.pth`` files of the reference code (``torch.save(model.state_dict())``), read with
``torch.load(weights_only=True)``. A folder is accepted when it holds exactly one weights file. Written format:
safetensors with the tied embedding stored once, plus ``config.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import GAMConfig, expected_shapes, infer_config
from .errors import CheckpointError, ConfigError
from .fsutil import atomic_write_bytes, atomic_write_json, sha256_file
from .jsonfile import MIB, Obj, Str, read_json, short
from .layout import CONFIG as CONFIG_NAME
from .tokenizer import TOKENIZER_NAME

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
WEIGHTS_NAME = "model.safetensors"
#: What config.json must look like before GAMConfig checks its fields (values: GAMConfig.__post_init__).
CONFIG_SCHEMA = Obj(optional={"architecture": Str(max_len=100), "model_type": Str(max_len=100)})


@dataclass
class Checkpoint:
    """Weights (float32 numpy, reference names, tied pair as ``token_embedding.weight``) and their config."""

    config: GAMConfig
    weights: dict[str, np.ndarray]
    source: str = "<memory>"
    sha256: str = ""
    tokenizer_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # extra config.json keys (training info, labels)


def find_weights(path: Path) -> Path:
    """The weights file a SOURCE path names: the file itself, or the one weights file in a folder."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist", "pass a checkpoint file or a folder holding one")
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise CheckpointError(f"{path} is not a checkpoint ({path.suffix or 'no suffix'})",
                                  "pass a .safetensors, .pt or .pth file")
        return path
    preferred = path / WEIGHTS_NAME
    if preferred.is_file():
        return preferred
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not found:
        raise CheckpointError(f"no .safetensors, .pt or .pth file in {path}",
                              "pass a checkpoint file or a folder holding one")
    if len(found) > 1:
        raise CheckpointError(f"{path} holds several weights files ({', '.join(p.name for p in found)})",
                              "pass the file you mean")
    return found[0]


#: Weight dtypes a checkpoint may store; each is converted to float32 on reading (bfloat16 is the top half of a
#: float32, so it widens exactly). Anything else (integers, bool, complex, float8) is refused, naming the tensor.
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "bf16"}
TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _refuse_dtype(path: Path, name: str, dtype: str) -> CheckpointError:
    return CheckpointError(f"{path}: tensor {name} is stored as {dtype}; weights must be float32, float16, "
                           "bfloat16 or float64", "convert the model's weights to float32 and re-save it")


def _bf16_to_f32(data: bytes | bytearray) -> np.ndarray:
    """bfloat16 bytes (little-endian) as float32: the 16 bits are the high half of the float32's bits."""
    return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as float32 numpy arrays, read without torch (bfloat16 included)."""
    from safetensors import SafetensorError, deserialize

    try:
        items = deserialize(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read {path}: {first}",
                              "the file is truncated or not safetensors; re-save or re-download it") from exc
    out = {}
    for name, item in items:
        kind = SAFETENSORS_DTYPES.get(item["dtype"])
        if kind is None:
            raise _refuse_dtype(path, name, item["dtype"])
        flat = _bf16_to_f32(item["data"]) if kind == "bf16" else np.frombuffer(item["data"], kind)
        out[name] = flat.astype(np.float32, copy=False).reshape(item["shape"])  # float32: a view, no copy
    return out


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as exc:
        raise CheckpointError(f"reading {path.name} needs torch", "pip install torch, or convert to safetensors") from exc
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():      # torch warns about pickle protocols on stderr; the error says enough
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _pickle_imports_code(path):
            raise CheckpointError(f"{path} asks to run code or build objects beyond plain tensors; refused",
                                  "re-save it as torch.save(model.state_dict()) or as safetensors") from exc
        raise CheckpointError(f"cannot read {path}: its pickle data is damaged",
                              "the file is truncated or not a torch checkpoint; re-save it") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {path}: {first}",
                              "the file is truncated or not a torch checkpoint; re-save it") from exc
    # Training checkpoints nest the weights; accept the common wrappers.
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} does not hold a state_dict of tensors",
                              "save it with torch.save(model.state_dict())")
    out = {}
    for name, tensor in obj.items():
        out[str(name).removeprefix("module.").removeprefix("_orig_mod.")] = _torch_to_f32(path, name, tensor)
    return out


def _torch_to_f32(path: Path, name, tensor) -> np.ndarray:
    """One state_dict value as float32 numpy, under the same dtype rule as safetensors; a value that is not a
    plain dense tensor with data (a nested dict, a number, a sparse, meta or quantized tensor) is refused."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{path}: {short(name)} is a {type(tensor).__name__}, not a tensor; the file does not "
                              "hold a state_dict of tensors", "save it with torch.save(model.state_dict())")
    kind = ("sparse" if tensor.layout != torch.strided else "meta (shape only, no data)" if tensor.is_meta
            else "quantized" if tensor.is_quantized else None)
    if kind is not None:
        raise CheckpointError(f"{path}: tensor {name} is {kind}; gamexport reads dense float weights",
                              "re-save the model's dense float weights (torch.save(model.state_dict()))")
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in TORCH_DTYPES:
        raise _refuse_dtype(path, name, dtype)
    return tensor.detach().to(torch.float32).cpu().numpy()


def _pickle_imports_code(path: Path) -> bool:
    """True when the checkpoint's pickle parses and names a global (a class or function to import and call).

    ``torch.load(weights_only=True)`` refuses both such a pickle and a damaged one with the same exception; this
    tells them apart by reading the opcodes only (``pickletools`` never executes them). A ``torch.save`` zip holds
    its pickle in ``*/data.pkl``; a legacy file is one pickle stream.
    """
    import pickletools
    import zipfile

    plain = {"torch", "torch._utils", "collections"}      # what a plain state_dict pickle references
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
        strings: list[str] = []                                # string pushes: STACK_GLOBAL's module and name
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name in ("GLOBAL", "INST"):                  # arg is "module name"
                module = str(arg).split(" ")[0]
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                module = strings[-2]
            else:
                continue
            if module not in plain:                            # e.g. a whole nn.Module, os.system
                return True
        return False
    except Exception:           # not parseable: damaged, not malicious
        return False


def normalize_weights(raw: Mapping[str, np.ndarray], config: GAMConfig | None = None) -> tuple[GAMConfig, dict]:
    """Validate a reference-format state_dict and return (config, weights with the tied pair stored once)."""
    raw = dict(raw)
    if "token_embedding.weight" in raw and "head.weight" in raw:
        a, b = raw["token_embedding.weight"], raw["head.weight"]
        if a.shape != b.shape or not np.array_equal(a, b):
            raise CheckpointError("token_embedding.weight and head.weight differ, but GAM ties them",
                                  "keep one of the two, or save the model whose weights are tied")
    if "head.weight" in raw:
        raw.setdefault("token_embedding.weight", raw["head.weight"])
        del raw["head.weight"]
    inferred = infer_config({k: tuple(v.shape) for k, v in raw.items()}, base=config)
    if config is not None:
        diff = [f"{f}: config {getattr(config, f)} vs weights {getattr(inferred, f)}"
                for f in ("vocab_size", "d_model", "n_layers", "n_slots", "kernel_size", "max_positions")
                if getattr(config, f) != getattr(inferred, f)]
        if diff:
            raise ConfigError("config.json and the weights disagree (" + "; ".join(diff) + ")",
                              "use the config.json saved with these weights, or delete it to infer from shapes")
    cfg = inferred
    expected = expected_shapes(cfg)
    expected.pop("head.weight")
    missing = sorted(set(expected) - set(raw))
    extra = sorted(set(raw) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}"
                              + (" …" if len(missing) > 5 else ""), "re-save the complete model state_dict")
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensor(s): {', '.join(extra[:5])}"
                              + (" …" if len(extra) > 5 else ""),
                              "is this a GAM checkpoint? names must match the reference code")
    weights = {}
    for name, shape in expected.items():
        arr = np.asarray(raw[name])
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(arr.shape)}, expected {shape}",
                                  "the checkpoint does not match its config; re-save it")
        if not np.issubdtype(arr.dtype, np.floating):
            raise CheckpointError(f"tensor {name} has dtype {arr.dtype}, expected floating point",
                                  "re-save the model's float weights")
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise CheckpointError(f"tensor {name} holds NaN or Inf values",
                                  "the weights are corrupt or training diverged; use an earlier checkpoint")
        weights[name] = np.ascontiguousarray(arr)
    return cfg, weights


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of one weights file (.safetensors, or a .pt/.pth state_dict read without running code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist", "pass a checkpoint file or a folder holding one")
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)


def _read_config(path: Path) -> tuple[GAMConfig | None, dict]:
    if not path.is_file():
        return None, {}
    data = read_json(path, schema=CONFIG_SCHEMA, error=ConfigError, max_bytes=MIB,
                     fix="fix or delete config.json (shapes are inferred without it)")
    # `gamexport train --model transformer|mamba` writes checkpoints of the same layout whose config.json says
    # "architecture". Everything here (graph export, engines, parity, generate) is built for GAM's computation, so
    # such a checkpoint is refused in one line rather than half-read into a GAM of the same width.
    arch = data.get("architecture", "gam")
    if arch != "gam":
        raise CheckpointError(
            f"{path.parent} is a {arch} baseline checkpoint ({path.name} says architecture {arch!r}); gamexport "
            "build, generate, parity and inspect export and run GAM models only",
            "load it in PyTorch with gamexport.training.baselines.lm_from_config and export it to ONNX with "
            "gamexport.training.torch_export.export_onnx")
    cfg = GAMConfig.from_dict(data)
    meta = {k: v for k, v in data.items() if k not in cfg.to_dict()}
    return cfg, meta


def load_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file or folder; tensors are validated (names, shapes, finite values)."""
    weights_path = find_weights(Path(source))
    folder = weights_path.parent
    config, meta = _read_config(folder / CONFIG_NAME)
    raw = read_tensors(weights_path)
    cfg, weights = normalize_weights(raw, config)
    if config is not None:  # keep dropout/eps from the file
        cfg = config
    tok = folder / TOKENIZER_NAME
    if tok.is_file():
        _check_tokenizer(tok, cfg)
    return Checkpoint(config=cfg, weights=weights, source=str(weights_path), sha256=sha256_file(weights_path),
                      tokenizer_path=tok if tok.is_file() else None, meta=meta)


def _check_tokenizer(path: Path, cfg: GAMConfig) -> None:
    """A tokenizer beside the weights must load and fit the model's vocabulary, or a build would ship a
    tokenizer that cannot be used (or that emits ids the embedding does not have)."""
    from .tokenizer import Tokenizer

    n = Tokenizer.from_file(path).vocab_size
    if n > cfg.vocab_size:
        raise ConfigError(f"{path} has {n:,} ids but the model's vocabulary is {cfg.vocab_size:,}",
                          "put the tokenizer the model was trained with beside it")


def save_checkpoint(folder: str | os.PathLike, config: GAMConfig, weights: Mapping[str, np.ndarray],
                    meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (tied tensor once) and ``config.json`` atomically; returns the weights path.

    ``config`` is a GAMConfig, or any config with ``to_dict()`` (the training loop saves its baselines'
    TransformerConfig / MambaConfig here too; their dict carries "architecture", which ``load_checkpoint``
    refuses)."""
    from safetensors.numpy import save

    folder = Path(folder)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items() if k != "head.weight"}
    # One metadata key: safetensors stores the metadata map in hash order, so several keys would make the bytes
    # (and the sha256 that keys build caches) differ between saves of the same weights.
    data = save(tensors, metadata={"gamexport": "tied head.weight=token_embedding.weight"})
    path = atomic_write_bytes(folder / WEIGHTS_NAME, data)
    atomic_write_json(folder / CONFIG_NAME, {**(dict(meta) if meta else {}), **config.to_dict()})
    return path
