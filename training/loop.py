"""The training loop: tokenizer → token streams → AdamW, warm-up and cosine decay → checkpoints you can resume.

    from gamexport.training.loop import train
    summary = train("tinystories", "small", "runs/ts-small", max_steps=2000, seed=0)

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

Resuming is exact: the chunk order of an epoch is a pure function of (seed, epoch), and everything else that
decides the next step is in the checkpoint, so on CPU a run that is stopped and resumed produces the same losses
and the same final weights, bit for bit, as one that never stopped (tested in tests/test_training_loop.py).

Baselines: ``train(..., model="transformer"|"mamba")`` trains ``gamexport.training.baselines``' models, sized to
the preset's GAM, through the same loop; their checkpoints have the same layout, and their config.json says
``"architecture"`` (which ``gamexport.checkpoint.load_checkpoint``, and so build/generate, refuse in one line).

Data-parallel: the same function under ``torchrun`` (see ``gamexport.training.distributed`` and ``train``);
tested in tests/test_ddp.py against a single process with the same global batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from gamexport import __version__
from gamexport.config import GAMConfig
from gamexport.checkpoint import (CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, load_checkpoint, read_tensors,
                                  save_checkpoint)
from gamexport.destinations import RUN_KIND
from gamexport.errors import CheckpointError, ConfigError, GamexportError
from gamexport.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, replace_dir
from gamexport.jsonfile import MIB, Obj, read_json
from gamexport.model import build_model, state_dict_numpy
from gamexport.tokenizer import Tokenizer

from . import data, distributed
from .distributed import Dist
from .presets import TrainPreset, train_preset
from .tokenizer import save_tokenizer, train_tokenizer

HELD_OUT_NAME = "heldout.txt"        # the validation split as text, read by `gamexport build` for parity on real text
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


# ---- learning-rate schedule ------------------------------------------------------------------------------------

def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate of update number ``step`` (0-based): linear warm-up to ``peak``, then cosine to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


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


# ---- evaluation ------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int, device: torch.device,
             autocast=contextlib.nullcontext, dist: Dist | None = None) -> tuple[float, float]:
    """Mean cross-entropy over every target token of the split, and its exponential (the perplexity).

    Data-parallel (``dist`` of several ranks), rank r evaluates batches r, r+W, ...; the per-batch sums are
    gathered into one vector (each entry filled by one rank, zeros elsewhere, so the sum over ranks is exact)
    and added up in batch order on every rank: the same numbers as one process, bit for bit, in 1/W the time.
    """
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    per_batch: list[float] = []
    n_targets = 0
    for i, (x, y) in enumerate(data.eval_batches(tokens, seq_len, batch_size)):
        n_targets += y.size
        if i % dist.world_size != dist.rank:
            per_batch.append(0.0)
            continue
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with autocast():
            logits, _ = model(x)                                                     # (b, t, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        per_batch.append(nll.item())
    model.train(was_training)
    total_nll = 0.0
    for value in dist.all_reduce_sum(per_batch):
        total_nll += value
    mean = total_nll / n_targets
    return mean, math.exp(mean)


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
    _load_weights(model, weights, source=folder / WEIGHTS_NAME)
    return config, weights


def _load_weights(model: torch.nn.Module, weights: dict[str, np.ndarray], source: Path | None = None) -> None:
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


def _tokenizer_from_json(text: str) -> Tokenizer:
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


# ---- the run ---------------------------------------------------------------------------------------------------

def _pick(name: str, given, saved: dict[str, Any], key: str, default=None):
    """A run argument: on --resume the run's saved value (asking for a different one is an error)."""
    if key not in saved:
        return given if given is not None else default
    if given is not None and given != saved[key]:
        raise TrainingError(f"--resume continues a run started with {name} {saved[key]!r}, but {name} {given!r} "
                            "was passed", f"drop {name} to resume; use a new --out for a different run")
    return saved[key]


def train(
    dataset: str | os.PathLike | None = None,
    preset: str | None = None,
    out: str | os.PathLike = "runs/gam",
    max_steps: int | None = None,
    resume: bool = False,
    seed: int | None = None,
    data_dir: str | os.PathLike | None = None,
    eval_every: int | None = None,
    checkpoint_every: int | None = None,
    threads: int | None = None,
    vocab_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    model: str | None = None,
    dropout: float | None = None,
) -> dict[str, Any]:
    """Train a language model (GAM, or a baseline of matched size) and return a summary (also OUT/summary.json).

    dataset: "wikitext2", "tinystories" (looked up in ``data_dir``, default ../shared/data) or a text file/folder
    (see ``gamexport.training.data``). preset: a name in ``TRAIN_PRESETS`` (default "small"). max_steps: the
    run's length in optimizer steps (default: the preset's epochs); the cosine schedule ends there.
    resume: continue the run in ``out`` from its latest checkpoint; dataset, preset, seed, max_steps,
    vocab_size, model and dropout then default to the run's own and may not change. eval_every /
    checkpoint_every: steps between validation passes / checkpoints (preset defaults; both also happen at the
    last step). threads: torch CPU threads. vocab_size: tokenizer size instead of the preset's. device: "cpu"
    or "cuda" (default: cuda if available, with bf16 or fp16 autocast). on_step: called with each step's
    metrics record. model: "gam" (default), "transformer" or "mamba" — a baseline is sized by
    ``baselines.matched_config`` from the preset's GAM shape (same vocabulary, layers and positions, the width
    whose parameter count is within ±5 % of GAM's), and trained with the same recipe, data and seed.
    dropout: instead of the preset's (0.1); 0 makes a run deterministic given its data, which is what compares a
    data-parallel run with a single process exactly.

    Data-parallel: started by ``torchrun`` (WORLD_SIZE > 1), every worker runs this same function; see
    ``gamexport.training.distributed``. The preset's batch_size is the global batch, split between the ranks;
    rank 0 alone writes files. With dropout 0 the losses and weights equal a single process's up to float
    rounding (the gradient is summed in another order); with dropout > 0 each rank draws its own masks (rank 0
    the single process's stream, rank r > 0 a stream seeded from (seed, r)), so the run is as reproducible —
    resume included, every rank's generator is checkpointed — but not equal to a single-process run.
    """
    started = time.time()
    _check_bounds(max_steps=max_steps, seed=seed, eval_every=eval_every, checkpoint_every=checkpoint_every,
                  threads=threads, vocab_size=vocab_size, dropout=dropout)
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise TrainingError(f"unknown device {device!r}", "pass cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda was asked for, but torch sees no CUDA GPU", "pass --device cpu")
    fresh = check_run_folder(out, resume, dataset, data_dir)       # before anything is written
    with distributed.session(dev.type) as ctx:
        if ctx.enabled and dev.type == "cuda":
            dev = torch.device("cuda", ctx.local_rank)      # one GPU per worker
        try:
            return _train(ctx, dev, started, dataset=dataset, preset=preset, out=out, max_steps=max_steps,
                          resume=resume, seed=seed, data_dir=data_dir, eval_every=eval_every,
                          checkpoint_every=checkpoint_every, threads=threads, vocab_size=vocab_size,
                          progress=progress, on_step=on_step, model=model, dropout=dropout)
        except BaseException:
            if ctx.is_main and fresh is not None:
                remove_unfinished_run(Path(out), fresh)
            raise


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


def _check_bounds(**values) -> None:
    """The CLI's option ranges (``gamexport.limits``), for callers of the Python API: one line before any work."""
    from gamexport.limits import MAX_SEED, MAX_STEPS, MAX_THREADS, MAX_VOCAB, MIN_VOCAB, check_range

    ranges = {"max_steps": (1, MAX_STEPS), "seed": (0, MAX_SEED), "eval_every": (1, MAX_STEPS),
              "checkpoint_every": (1, MAX_STEPS), "threads": (1, MAX_THREADS), "vocab_size": (MIN_VOCAB, MAX_VOCAB),
              "dropout": (0.0, 1.0)}
    for name, value in values.items():
        if value is not None:
            check_range(f"--{name.replace('_', '-')}", value, *ranges[name])


def _train(ctx: Dist, dev: torch.device, started: float, *, dataset, preset, out, max_steps, resume, seed, data_dir,
           eval_every, checkpoint_every, threads, vocab_size, progress, on_step, model, dropout) -> dict[str, Any]:
    """``train`` on one rank (the only one, or one of ``ctx.world_size``)."""
    out = Path(out)
    run_path = out / RUN_NAME
    saved: dict[str, Any] = {}
    resume_from: tuple[int, Path] | None = None
    if resume:
        if not run_path.is_file():
            raise TrainingError(f"{out} holds no training run to resume ({RUN_NAME} is missing)",
                                "drop --resume to start a new run there")
        saved = read_json(run_path, schema=Obj(), error=TrainingError, max_bytes=MIB,
                          fix=f"delete {out} and start a new run, or drop --resume")
        checkpoints = list_checkpoints(out)
        if not checkpoints:
            raise TrainingError(f"{out} holds no checkpoint yet (the run stopped before its first one)",
                                "start it again with the same command without --resume")
        # Rank 0 chooses (and warns about damaged ones); every rank then reads the one it chose.
        chosen = usable_checkpoint(checkpoints) if ctx.is_main else None
        resume_step = ctx.broadcast_object(chosen[0] if chosen else None)
        resume_from = (resume_step, out / CHECKPOINTS / f"step-{resume_step:06d}")
    elif out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file", "pass a folder path (it is created if missing)")
    elif list_checkpoints(out):
        raise TrainingError(f"{out} already holds a training run",
                            "pass --resume to continue it, or choose another --out")

    if dataset is not None:
        dataset = os.fspath(dataset)
    if dataset is not None and not data.is_named(dataset):
        dataset = str(Path(dataset).expanduser().resolve())   # stored absolute, so --resume works from anywhere
    dataset = _pick("--dataset", dataset, saved, "dataset")
    if dataset is None:
        raise TrainingError("no dataset given", "pass --dataset wikitext2, tinystories or a text file/folder")
    preset_name = _pick("--preset", preset, saved, "preset", default="small")
    seed = _pick("--seed", seed, saved, "seed", default=0)
    max_steps = _pick("--max-steps", max_steps, saved, "max_steps")
    vocab_size = _pick("vocab_size", vocab_size, saved, "vocab_size")
    kind = _pick("--model", model, saved, "model", default="gam")
    dropout = _pick("--dropout", dropout, saved, "dropout")
    if kind != "gam":                        # the baselines are imported only when asked for
        from .baselines import MODEL_KINDS
        if kind not in MODEL_KINDS:
            raise TrainingError(f"unknown model {kind!r}", f"choose one of: {', '.join(MODEL_KINDS)}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise TrainingError(f"--dropout must be in [0, 1), got {dropout}", "pass a dropout such as 0 or 0.1")
    if data_dir is None:
        data_dir = saved.get("data_dir") or (data.default_data_dir() if data.is_named(dataset) else None)
    recipe: TrainPreset = train_preset(preset_name)
    # These may change on --resume (they do not alter the arithmetic); by default the run keeps its own.
    eval_every = eval_every or saved.get("eval_every") or recipe.eval_every
    checkpoint_every = checkpoint_every or saved.get("checkpoint_every") or recipe.checkpoint_every
    threads = threads or saved.get("threads")
    for name, value in (("--max-steps", max_steps), ("--eval-every", eval_every),
                        ("--checkpoint-every", checkpoint_every), ("--threads", threads)):
        if value is not None and value < 1:
            raise TrainingError(f"{name} must be at least 1, got {value}", f"pass a positive {name}")
    if recipe.batch_size % ctx.world_size:
        raise distributed.DistributedError(
            f"preset {preset_name}'s batch of {recipe.batch_size} sequences (the global batch) does not split "
            f"evenly over {ctx.world_size} processes", "start a number of processes that divides it")

    if threads:
        torch.set_num_threads(threads)
    amp_dtype = None
    if dev.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast():
        return torch.autocast(device_type=dev.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    seed_everything(seed)

    # ---- data and tokenizer ----
    corpus = data.load_corpus(dataset, data_dir)
    if resume and saved.get("files") and saved["files"] != corpus.files:
        raise TrainingError(f"the files of dataset {dataset!r} changed since the run started",
                            "restore the original files to resume, or start a new run")
    if ctx.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"cannot create {out}: {exc.strerror or exc}",
                                "choose an --out you can write to") from exc
        for stale in (out / CHECKPOINTS).glob(".tmp-step-*"):      # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    if resume:
        tokenizer = Tokenizer.from_file(resume_from[1] / TOKENIZER_NAME)
    else:
        # Rank 0 trains the tokenizer and sends it to the others: the other ranks neither spend the time (nor
        # the shared cores) nor depend on BPE training giving the same merges in every process, and need no
        # shared filesystem to see it.
        tokenizer_json = None
        if ctx.is_main:
            tokenizer = train_tokenizer(corpus.train, vocab_size or recipe.vocab_size)   # training split only
            save_tokenizer(tokenizer, out / TOKENIZER_NAME)
            tokenizer_json = tokenizer.to_json()
        tokenizer_json = ctx.broadcast_object(tokenizer_json)
        if not ctx.is_main:
            tokenizer = _tokenizer_from_json(tokenizer_json)
    # The validation split as one text that encodes to exactly the validation token stream (documents closed by
    # <|endoftext|>); saved beside every checkpoint so `gamexport build` can check parity on real held-out text.
    held_out_text = "".join(doc + data.EOS for doc in corpus.valid)
    train_tokens = data.encode_documents(tokenizer, corpus.train)
    valid_tokens = data.encode_documents(tokenizer, corpus.valid)
    T, B = recipe.seq_len, recipe.batch_size
    n_chunks = data.n_train_chunks(len(train_tokens), T)
    if n_chunks == 0:
        raise TrainingError(f"the training split has {len(train_tokens)} tokens, fewer than one sequence of {T + 1}",
                            "use more text, or a preset with a shorter sequence")
    if len(valid_tokens) < 2:
        raise TrainingError("the validation split has fewer than 2 tokens", "use a longer validation text")
    steps_per_epoch = data.batches_per_epoch(n_chunks, B)
    total_steps = max_steps or recipe.epochs * steps_per_epoch
    warmup = min(recipe.warmup_steps, max(1, total_steps // 2))

    # ---- model and optimizer ----
    gam_cfg = recipe.model.replace(vocab_size=tokenizer.vocab_size,
                                   **({"dropout": float(dropout)} if dropout is not None else {}))
    resumed_config, resumed_weights = load_run_weights(resume_from[1]) if resume else (None, None)
    if resume:                       # the shape the run was started with (even if the preset changed since)
        saved_kind = resumed_config.get("architecture", "gam")
        if saved_kind != kind:
            raise TrainingError(f"run.json says --model {kind}, but {resume_from[1]} holds a {saved_kind} model",
                                "the run folder is inconsistent; start a new run")
        if kind == "gam":
            net = build_model(GAMConfig.from_dict(resumed_config))
        else:
            from .baselines import lm_from_config
            net = lm_from_config(resumed_config)
    elif kind == "gam":
        net = build_model(gam_cfg, seed=seed)
    else:
        from .baselines import build_lm
        net = build_lm(kind, gam_cfg, seed=seed)                    # width matched to gam_cfg's parameters
    cfg = net.config
    if recipe.embedding_init_std is not None and not resume:   # see presets.py: why not the reference init
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name in ("token_embedding", "pos_embedding"):   # whichever the architecture has
                embedding = getattr(net, name, None)
                if embedding is not None:
                    embedding.weight.normal_(0.0, recipe.embedding_init_std, generator=generator)
    net = net.to(dev).train()                                  # train mode: dropout active
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, betas=recipe.betas,
                                  weight_decay=recipe.weight_decay)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    step, epoch, batch_index = 0, 0, 0
    metrics_path = out / METRICS_NAME
    if resume:
        step, folder = resume_from
        _load_weights(net, resumed_weights)
        state = load_trainer_state(folder)
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, batch_index = state["epoch"], state["batch_index"]
        by_rank = state.get("rng_by_rank")
        if by_rank and len(by_rank) == ctx.world_size:
            set_rng_state(by_rank[ctx.rank])                   # every rank continues its own dropout stream
        else:
            set_rng_state(state["rng"])
            if ctx.rank > 0:
                torch.manual_seed(distributed.derived_seed(seed, ctx.rank) ^ step)
            saved_world = len(by_rank) if by_rank else 1
            if ctx.is_main and saved_world != ctx.world_size and cfg.dropout > 0:
                print(f"warning: the run was checkpointed by {saved_world} process(es) and continues in "
                      f"{ctx.world_size}: data order and optimizer are exact, dropout masks differ from an "
                      "uninterrupted run", file=sys.stderr, flush=True)
        if ctx.is_main:
            kept = [r for r in read_metrics(metrics_path) if r["step"] <= step]   # drop steps after the checkpoint
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    else:
        if ctx.rank > 0:       # rank 0 keeps the single-process stream; the others draw their own dropout masks
            torch.manual_seed(distributed.derived_seed(seed, ctx.rank))
        if ctx.is_main:
            atomic_write_json(run_path, {
                "kind": RUN_KIND, "dataset": dataset, "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
                "preset": preset_name, "seed": seed, "max_steps": max_steps, "vocab_size": vocab_size,
                "model": kind, "dropout": dropout,
                "eval_every": eval_every, "checkpoint_every": checkpoint_every, "threads": threads,
                "files": corpus.files, "gamexport_version": __version__})
            metrics_path.write_text("", encoding="utf-8")
    if ctx.enabled:
        # Starting DDP broadcasts rank 0's parameters; they are already equal (same seed, or the same checkpoint).
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    else:
        ddp = net

    recipe_record = {
        "batch_size": B, "seq_len": T, "lr": recipe.lr, "betas": list(recipe.betas),
        "weight_decay": recipe.weight_decay, "warmup_steps": warmup, "schedule": "linear warm-up, cosine to 0",
        "grad_clip": recipe.grad_clip, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "dropout": cfg.dropout, "embedding_init_std": recipe.embedding_init_std,
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32"}
    if ctx.enabled:
        recipe_record["data_parallel"] = {"world_size": ctx.world_size, "backend": ctx.backend,
                                          "per_rank_batch": B // ctx.world_size}
    tokenizer_record = {"file": TOKENIZER_NAME, "type": "byte-level BPE (Hugging Face tokenizers)",
                        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                        "trained_on": "training split only"}

    def meta(val_loss: float | None, val_ppl: float | None) -> dict[str, Any]:
        what = "" if kind == "gam" else f"{kind} baseline, "
        label = f"trained: {what}{corpus.name}, preset {preset_name}, seed {seed}, step {step}" + (
            f", val ppl {val_ppl:.2f}" if val_ppl is not None else "")
        return {"trained": True, "label": label, "heldout_text": HELD_OUT_NAME, "preset": preset_name,
                "model": kind, "seed": seed, "step": step, "epoch": round(step / steps_per_epoch, 4),
                "val_loss": val_loss, "val_ppl": val_ppl, "dataset": corpus.record(), "tokenizer": tokenizer_record,
                "training": recipe_record, "gamexport_version": __version__}

    def trainer_state(rng_by_rank: list[dict[str, Any]], digests: list[str] | None) -> dict[str, Any]:
        state = {"step": step, "epoch": epoch, "batch_index": batch_index, "seed": seed,
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                 "scheduler": {"kind": "warmup_cosine", "peak_lr": recipe.lr, "warmup_steps": warmup,
                               "total_steps": total_steps},
                 "rng": rng_by_rank[0], "rng_by_rank": rng_by_rank, "world_size": ctx.world_size}
        if digests is not None:
            state["weights_sha256_by_rank"] = digests
        return state

    def checkpoint(last_val: tuple[float | None, float | None]) -> None:
        """Every rank takes part (generator states and weight digests are gathered); rank 0 writes."""
        weights = state_dict_numpy(net)
        rng_by_rank = ctx.all_gather_object(rng_state())
        digests = None
        if ctx.enabled:
            digests = ctx.all_gather_object(distributed.weights_digest(weights))
            if len(set(digests)) > 1:
                raise TrainingError(f"the weights of the {ctx.world_size} processes differ at step {step} "
                                    "(data-parallel ranks out of step)",
                                    "resume from the last checkpoint; report it if it happens again")
        if ctx.is_main:
            save_training_checkpoint(out, step, net, tokenizer, trainer_state(rng_by_rank, digests),
                                     meta(*last_val), held_out_text, weights=weights)
        ctx.barrier()          # the others continue only once the checkpoint is on disk (a resume must see it)

    # ---- the loop ----
    start_step = step
    last_val = (None, None)
    last_checkpoint = step if resume else None
    session_tokens, session_time = 0, 0.0
    bar = None
    if progress and ctx.is_main:
        try:
            from tqdm import tqdm
        except ImportError:          # no progress bar without tqdm; metrics.jsonl still records every step
            tqdm = None
        if tqdm is not None:
            label = "" if kind == "gam" else f"{kind} "
            bar = tqdm(total=total_steps, initial=step, file=sys.stderr, unit="step", dynamic_ncols=True,
                       desc=f"train {label}{corpus.name}/{preset_name}" + (
                           f" ×{ctx.world_size}" if ctx.enabled else ""))
    order_epoch, order = -1, None
    try:
        with (metrics_path.open("a", encoding="utf-8") if ctx.is_main else contextlib.nullcontext()) as metrics_file:
            while step < total_steps:
                if order_epoch != epoch:
                    order, order_epoch = data.epoch_order(n_chunks, seed, epoch), epoch
                x, y = data.train_batch(train_tokens, order, batch_index, B, T)       # 2 × (b, T): global batch
                n_targets = y.size
                lr = lr_at(step, recipe.lr, warmup, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                t0 = time.perf_counter()
                if ctx.enabled:
                    # This rank's rows of the global batch. Its loss is its SUMMED cross-entropy × W / (targets
                    # of the global batch): DDP averages gradients over the W ranks, so the update is the
                    # gradient of the global mean loss, also when the rows do not split evenly. A rank left
                    # without rows (a last batch smaller than W) runs row 0 with weight 0, because every rank
                    # must take part in the gradient all-reduce.
                    lo, hi = ctx.shard(len(x))
                    weight = ctx.world_size / n_targets if hi > lo else 0.0
                    if hi == lo:
                        lo, hi = 0, 1
                    xs, ys = torch.from_numpy(x[lo:hi]).to(dev), torch.from_numpy(y[lo:hi]).to(dev)
                    with autocast():
                        logits, _ = ddp(xs)
                    nll = F.cross_entropy(logits.float().flatten(0, 1), ys.flatten(), reduction="sum")
                    loss = nll * weight
                else:
                    xs, ys = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
                    with autocast():
                        _, loss = ddp(xs, ys)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if ctx.enabled:      # the global mean loss, for the log: Σ over ranks of their summed losses / targets
                    train_loss = ctx.all_reduce_sum([nll.item() if weight else 0.0])[0] / n_targets
                else:
                    train_loss = loss.item()                                           # waits for the step
                dt = time.perf_counter() - t0
                session_tokens += n_targets
                session_time += dt

                step += 1
                batch_index += 1
                if batch_index == steps_per_epoch:
                    epoch, batch_index = epoch + 1, 0
                if not math.isfinite(train_loss):
                    raise TrainingError(f"the training loss became {train_loss} at step {step}",
                                        "lower the learning rate or resume from an earlier checkpoint")

                do_checkpoint = step % checkpoint_every == 0 or step == total_steps
                do_eval = do_checkpoint or step % eval_every == 0
                val_loss = val_ppl = None
                if do_eval:
                    val_loss, val_ppl = evaluate(net, valid_tokens, T, B, dev, autocast, dist=ctx)
                    last_val = (val_loss, val_ppl)
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "train_loss": train_loss,
                          "val_loss": val_loss, "val_ppl": val_ppl, "tokens_per_s": round(n_targets / dt, 1),
                          "lr": lr}
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if do_checkpoint:
                    checkpoint(last_val)
                    last_checkpoint = step
                if bar is not None:
                    postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{session_tokens / session_time:,.0f}"}
                    if last_val[1] is not None:
                        postfix["val_ppl"] = f"{last_val[1]:.2f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                if on_step is not None:
                    on_step(record)
    except KeyboardInterrupt:
        where = (f"the last checkpoint is step {last_checkpoint}; continue with the same command and --resume"
                 if last_checkpoint is not None else "no checkpoint was written yet; start the run again")
        raise TrainingInterrupted(f"training interrupted at step {step}", where) from None
    finally:
        if bar is not None:
            bar.close()

    # ---- the end: plots and summary ----
    if last_val[0] is None:            # resumed at the last step: nothing ran, evaluate for the summary
        last_val = evaluate(net, valid_tokens, T, B, dev, autocast, dist=ctx)
    summary = None
    if ctx.is_main:
        from .plots import plot_metrics

        plots = plot_metrics(read_metrics(metrics_path), out)
        summary = {
            "out": str(out), "model": kind, "steps": step, "total_steps": total_steps,
            "epochs": round(step / steps_per_epoch, 4),
            "resumed_from": start_step if resume else None, "val_loss": last_val[0], "val_ppl": last_val[1],
            "tokens_per_s": round(session_tokens / session_time, 1) if session_time else None,
            "wall_s": round(time.time() - started, 1), "device": str(dev), "threads": torch.get_num_threads(),
            "world_size": ctx.world_size,
            "params": net.num_parameters(), "preset": preset_name, "seed": seed, "config": cfg.to_dict(),
            "dataset": corpus.record(), "tokens": {"train": int(len(train_tokens)), "valid": int(len(valid_tokens))},
            "tokenizer": tokenizer_record, "training": recipe_record,
            "weights": str(out / WEIGHTS_NAME), "config_file": str(out / CONFIG_NAME),
            "plots": [str(p) for p in plots],
        }
        atomic_write_json(out / SUMMARY_NAME, summary)
    # Every rank returns rank 0's summary, once the run folder is complete.
    return ctx.broadcast_object(summary)
