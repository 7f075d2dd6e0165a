"""What a training run's folder holds and how it is written, read and resumed: the file names, the checkpoints
(assembled under a temporary name and renamed into place; the last two kept), the trainer state with the
random-number generators in a form ``torch.load(weights_only=True)`` accepts, the metrics, and the run folder's
own safety (refused when it is not new, empty or a run; removed again when a fresh run stops before its first
checkpoint). The loop (``training/loop.py``) drives them; nothing here trains.

What one run writes into its OUT folder:

    OUT/
      model.safetensors, config.json, tokenizer.json   the latest checkpoint's model: OUT is a SOURCE for
                                                       `gamexport build OUT` and `gamexport generate OUT`
      heldout.txt                                      the validation split as text (config.json "heldout_text"):
                                                       build checks parity on it
      run.json                                         the run's arguments (what --resume continues)
      metrics.jsonl                                    one line per step: step, epoch, train_loss, val_loss,
                                                       val_ppl, tokens_per_s, lr (val_* null between evaluations)
      loss.png, perplexity.png, summary.json           written at the end
      checkpoints/step-000500/                         the last two checkpoints, each complete: model.safetensors,
                                                       config.json, tokenizer.json, heldout.txt, trainer_state.pt

``trainer_state.pt`` holds the optimizer, the learning-rate schedule, the random-number generators (torch,
numpy, python; converted to tensors and lists so that ``torch.load(weights_only=True)`` reads them) and the data
position (epoch, batch index). A checkpoint folder is assembled under a temporary name and renamed into place,
so a crash never leaves a half-written one.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gamexport.checkpoint import (CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, load_checkpoint, read_tensors,
                                  save_checkpoint)
from gamexport.errors import CheckpointError, ConfigError, GamexportError
from gamexport.fsutil import atomic_write_bytes, atomic_write_text, replace_dir
from gamexport.jsonfile import MIB, Obj, read_json
from gamexport.layout import HELD_OUT as HELD_OUT_NAME  # the validation split as text, read by `gamexport build`
from gamexport.model import state_dict_numpy
from gamexport.tokenizer import Tokenizer

from . import data
from .tokenizer import save_tokenizer

RUN_NAME = "run.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
STATE_NAME = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainingError(GamexportError):
    """A training run that cannot start or continue as asked."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C during training: the run can be continued from its last checkpoint with --resume."""


# ---- random-number generator state, in a form torch.load(weights_only=True) accepts ------------------------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()          # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    py_state = random.getstate()              # (version, tuple of 625 ints, gauss_next)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---- checkpoints -----------------------------------------------------------------------------------------------

def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under OUT/checkpoints, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def save_training_checkpoint(out: Path, step: int, model: torch.nn.Module, tokenizer: Tokenizer,
                             trainer_state: dict[str, Any], meta: dict[str, Any], held_out_text: str,
                             weights: dict[str, np.ndarray] | None = None) -> Path:
    """Write checkpoints/step-NNNNNN atomically, refresh OUT's own model files, keep the last two checkpoints.

    Any architecture: model.safetensors holds the weights with the tied head stored once (as
    ``token_embedding.weight``, which every model here ties ``head.weight`` to), config.json the model's
    ``config.to_dict()`` (a baseline's says ``"architecture"``) plus ``meta``."""
    if weights is None:
        weights = state_dict_numpy(model)
    folder = out / CHECKPOINTS
    tmp = folder / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_checkpoint(tmp, model.config, weights, meta)                     # model.safetensors + config.json
    save_tokenizer(tokenizer, tmp / TOKENIZER_NAME)
    atomic_write_text(tmp / HELD_OUT_NAME, held_out_text)
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    atomic_write_bytes(tmp / STATE_NAME, buffer.getvalue())
    final = folder / f"step-{step:06d}"
    replace_dir(tmp, final)
    # OUT itself always holds the latest model, so it can be passed as a SOURCE to build and generate.
    save_tokenizer(tokenizer, out / TOKENIZER_NAME)
    if not (out / HELD_OUT_NAME).is_file():
        atomic_write_text(out / HELD_OUT_NAME, held_out_text)
    save_checkpoint(out, model.config, weights, meta)
    for _, old in list_checkpoints(out)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_run_weights(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config dict, weights with the tied pair once) of a training checkpoint of any architecture, validated:
    a GAM's by ``load_checkpoint``; a baseline's by building it from its config and loading the weights."""
    config_path = folder / CONFIG_NAME
    try:
        config = read_json(config_path, schema=Obj(), error=CheckpointError, max_bytes=MIB,
                           fix="the checkpoint is damaged")
    except FileNotFoundError:
        config = {}                               # a GAM's shape is inferred from its tensors
    if config.get("architecture", config.get("model_type", "gam")) == "gam":
        ckpt = load_checkpoint(folder)
        return {**ckpt.meta, **ckpt.config.to_dict()}, ckpt.weights
    from .baselines import architecture_of, lm_from_config

    arch = architecture_of(config)          # ConfigError for an unknown one
    weights = read_tensors(folder / WEIGHTS_NAME)
    try:
        model = lm_from_config(config)
    except TypeError as exc:
        raise ConfigError(f"{config_path} is not a valid {arch} config: {exc}", "the checkpoint is damaged") from exc
    load_weights_into(model, weights, source=folder / WEIGHTS_NAME)
    return config, weights


def load_weights_into(model: torch.nn.Module, weights: dict[str, np.ndarray], source: Path | None = None) -> None:
    """Load weights saved with the tied pair once (``head.weight`` = ``token_embedding.weight``), strictly."""
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}
    if "token_embedding.weight" in tensors:
        tensors.setdefault("head.weight", tensors["token_embedding.weight"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"the weights in {source or 'the checkpoint'} do not fit the model: {first}",
                              "the checkpoint is damaged or from another run") from exc
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor {name} in {source or 'the checkpoint'} holds NaN or Inf values",
                                  "use an earlier checkpoint")


def tokenizer_from_json(text: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    return Tokenizer(HFTokenizer.from_str(text))


def load_trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"cannot read {path}: {first}",
                            "the checkpoint is damaged; delete that step folder to resume from the one before") from exc


def usable_checkpoint(checkpoints: list[tuple[int, Path]]) -> tuple[int, Path]:
    """The newest checkpoint that reads completely (weights, tokenizer, trainer state); a damaged newer one is
    skipped with a warning, so a corrupted last checkpoint falls back to the one before it."""
    problems = []
    for step, folder in reversed(checkpoints):
        try:
            load_run_weights(folder)
            Tokenizer.from_file(folder / TOKENIZER_NAME)
            load_trainer_state(folder)
        except GamexportError as exc:
            problems.append(exc.line())
            print(f"warning: checkpoint {folder.name} is damaged ({exc.message}); trying the one before it",
                  file=sys.stderr, flush=True)
            continue
        return step, folder
    raise TrainingError(f"no checkpoint of this run can be read ({len(problems)} damaged): {problems[0]}",
                        "start the run again without --resume, in a new --out")


# ---- metrics ---------------------------------------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_run_folder(out, resume: bool, dataset, data_dir) -> str | None:
    """Refuse an ``out`` that is not new, empty or a training run, or that is, holds or lies inside the data,
    before anything is written (``gamexport.destinations``). Returns what ``out`` was (absent or empty) when
    this run starts it afresh, else None: a fresh run that fails before its first checkpoint is removed again.
    """
    from gamexport.destinations import ABSENT, EMPTY, RUN, check_folder, classify

    named = dataset is None or data.is_named(dataset) or os.fspath(dataset).startswith("hf:")
    before = classify(out)
    check_folder(out, RUN, guards={"--dataset": None if named else dataset, "--data-dir": data_dir})
    return before if before in (ABSENT, EMPTY) and not resume else None


def remove_unfinished_run(out: Path, before: str) -> None:
    """Undo a fresh run that stopped before its first checkpoint: delete the folder it created (or empty the
    folder that was empty). A run with a checkpoint is kept: ``--resume`` continues it."""
    from gamexport.destinations import ABSENT

    if not out.is_dir() or list_checkpoints(out):
        return
    if before == ABSENT:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
