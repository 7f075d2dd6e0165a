"""The training loop: tokenizer → token streams → AdamW, warm-up and cosine decay → checkpoints you can resume.

    from gamexport.training.loop import train
    summary = train("tinystories", "small", "runs/ts-small", max_steps=2000, seed=0)

What one run writes into its OUT folder, and how a checkpoint is written: ``gamexport.training.checkpoints``.

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
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from gamexport import __version__
from gamexport.config import GAMConfig
from gamexport.checkpoint import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME
from gamexport.destinations import RUN_KIND
from gamexport.fsutil import atomic_write_json, atomic_write_text
from gamexport.jsonfile import MIB, Obj, read_json
from gamexport.model import build_model, state_dict_numpy
from gamexport.tokenizer import Tokenizer
from gamexport.layout import HELD_OUT as HELD_OUT_NAME  # the validation split as text, read by `gamexport build`

from . import data, distributed
from .evaluation import evaluate
from .checkpoints import (CHECKPOINTS, METRICS_NAME, RUN_NAME, SUMMARY_NAME, TrainingError, TrainingInterrupted,
                          check_run_folder, list_checkpoints, load_run_weights, load_trainer_state, load_weights_into,
                          read_metrics, remove_unfinished_run, rng_state, save_training_checkpoint, seed_everything,
                          set_rng_state, tokenizer_from_json, usable_checkpoint)
from .distributed import Dist
from .presets import TrainPreset, train_preset
from .tokenizer import save_tokenizer, train_tokenizer

# ---- learning-rate schedule ------------------------------------------------------------------------------------

def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate of update number ``step`` (0-based): linear warm-up to ``peak``, then cosine to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


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


def _check_bounds(**values) -> None:
    """The CLI's option ranges (``gamexport.limits``), for callers of the Python API: one line before any work."""
    from gamexport.limits import MAX_SEED, MAX_STEPS, MAX_THREADS, MAX_VOCAB, MIN_VOCAB, check_range

    ranges = {"max_steps": (1, MAX_STEPS), "seed": (0, MAX_SEED), "eval_every": (1, MAX_STEPS),
              "checkpoint_every": (1, MAX_STEPS), "threads": (1, MAX_THREADS), "vocab_size": (MIN_VOCAB, MAX_VOCAB),
              "dropout": (0.0, 1.0)}
    for name, value in values.items():
        if value is not None:
            check_range(f"--{name.replace('_', '-')}", value, *ranges[name])


# ---- one rank's run, step by step ------------------------------------------------------------------------------
# ``_train`` reads as the table of contents: resolve the arguments (``_resolve_run``), load the data and the
# tokenizer (``_prepare_data``), build the model and optimizer and restore or start the run (``_set_up``), run the
# optimisation steps with their evaluations and checkpoints (``_train_steps``), then write the plots and the
# summary (``_finish``). The order in which they draw random numbers is part of what makes --resume exact.

@dataclass
class _Settings:
    """The run's arguments, resolved: on --resume the run's own (run.json), else the given ones or the preset's."""

    out: Path
    dataset: str
    data_dir: str | os.PathLike | None
    preset_name: str
    recipe: TrainPreset
    seed: int
    max_steps: int | None
    vocab_size: int | None
    kind: str                       # "gam", "transformer" or "mamba"
    dropout: float | None
    eval_every: int
    checkpoint_every: int
    threads: int | None
    saved: dict[str, Any]           # run.json of the run being resumed ({} for a fresh run)
    resume_from: tuple[int, Path] | None    # (step, checkpoint folder) to continue from; None for a fresh run

    @property
    def resume(self) -> bool:
        return self.resume_from is not None


@dataclass
class _Data:
    """The corpus, its tokenizer and token streams, and the run's length in steps."""

    corpus: data.Corpus
    tokenizer: Tokenizer
    held_out_text: str
    train_tokens: np.ndarray
    valid_tokens: np.ndarray
    n_chunks: int
    steps_per_epoch: int
    total_steps: int
    warmup: int


@dataclass
class _Run:
    """Everything one rank's run holds once it is set up; the loop's steps read it and advance its position."""

    ctx: Dist
    dev: torch.device
    settings: _Settings
    data: _Data
    net: torch.nn.Module            # the model (its weights are what a checkpoint saves)
    ddp: torch.nn.Module            # the model wrapped in DistributedDataParallel, or ``net`` itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable[[], Any]
    amp_dtype: torch.dtype | None
    step: int = 0                   # optimizer updates done
    epoch: int = 0
    batch_index: int = 0            # the next batch of the epoch
    last_val: tuple[float | None, float | None] = (None, None)
    last_checkpoint: int | None = None
    session_tokens: int = 0         # this session's (not the run's) throughput, for the bar and the summary
    session_time: float = 0.0
    recipe_record: dict[str, Any] = field(default_factory=dict)
    tokenizer_record: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics_path(self) -> Path:
        return self.settings.out / METRICS_NAME


def _train(ctx: Dist, dev: torch.device, started: float, *, dataset, preset, out, max_steps, resume, seed, data_dir,
           eval_every, checkpoint_every, threads, vocab_size, progress, on_step, model, dropout) -> dict[str, Any]:
    """``train`` on one rank (the only one, or one of ``ctx.world_size``)."""
    settings = _resolve_run(ctx, Path(out), resume, dict(
        dataset=dataset, preset=preset, max_steps=max_steps, seed=seed, data_dir=data_dir, eval_every=eval_every,
        checkpoint_every=checkpoint_every, threads=threads, vocab_size=vocab_size, model=model, dropout=dropout))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    seed_everything(settings.seed)
    run = _set_up(ctx, dev, settings, _prepare_data(ctx, settings))
    start_step = run.step
    _train_steps(run, progress, on_step)
    return _finish(run, started, start_step)


def _resume_point(ctx: Dist, out: Path, resume: bool) -> tuple[dict[str, Any], tuple[int, Path] | None]:
    """(run.json, (step, checkpoint folder)) of the run to resume, or ({}, None) for a fresh run: a fresh run's
    ``out`` may not hold a run already, a resumed one must hold a run with a readable checkpoint."""
    run_path = out / RUN_NAME
    if not resume:
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--out {out} is a file", "pass a folder path (it is created if missing)")
        if list_checkpoints(out):
            raise TrainingError(f"{out} already holds a training run",
                                "pass --resume to continue it, or choose another --out")
        return {}, None
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
    return saved, (resume_step, out / CHECKPOINTS / f"step-{resume_step:06d}")


def _resolve_run(ctx: Dist, out: Path, resume: bool, given: dict[str, Any]) -> _Settings:
    """The run's settings from the arguments ``given`` (None: not given) and, on --resume, the run's run.json;
    every refusal here comes before anything is written."""
    saved, resume_from = _resume_point(ctx, out, resume)
    dataset = given["dataset"]
    if dataset is not None:
        dataset = os.fspath(dataset)
    if dataset is not None and not data.is_named(dataset):
        dataset = str(Path(dataset).expanduser().resolve())   # stored absolute, so --resume works from anywhere
    dataset = _pick("--dataset", dataset, saved, "dataset")
    if dataset is None:
        raise TrainingError("no dataset given", "pass --dataset wikitext2, tinystories or a text file/folder")
    preset_name = _pick("--preset", given["preset"], saved, "preset", default="small")
    seed = _pick("--seed", given["seed"], saved, "seed", default=0)
    max_steps = _pick("--max-steps", given["max_steps"], saved, "max_steps")
    vocab_size = _pick("vocab_size", given["vocab_size"], saved, "vocab_size")
    kind = _pick("--model", given["model"], saved, "model", default="gam")
    dropout = _pick("--dropout", given["dropout"], saved, "dropout")
    if kind != "gam":                        # the baselines are imported only when asked for
        from .baselines import MODEL_KINDS
        if kind not in MODEL_KINDS:
            raise TrainingError(f"unknown model {kind!r}", f"choose one of: {', '.join(MODEL_KINDS)}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise TrainingError(f"--dropout must be in [0, 1), got {dropout}", "pass a dropout such as 0 or 0.1")
    data_dir = given["data_dir"]
    if data_dir is None:
        data_dir = saved.get("data_dir") or (data.default_data_dir() if data.is_named(dataset) else None)
    recipe: TrainPreset = train_preset(preset_name)
    # These may change on --resume (they do not alter the arithmetic); by default the run keeps its own.
    eval_every = given["eval_every"] or saved.get("eval_every") or recipe.eval_every
    checkpoint_every = given["checkpoint_every"] or saved.get("checkpoint_every") or recipe.checkpoint_every
    threads = given["threads"] or saved.get("threads")
    for name, value in (("--max-steps", max_steps), ("--eval-every", eval_every),
                        ("--checkpoint-every", checkpoint_every), ("--threads", threads)):
        if value is not None and value < 1:
            raise TrainingError(f"{name} must be at least 1, got {value}", f"pass a positive {name}")
    if recipe.batch_size % ctx.world_size:
        raise distributed.DistributedError(
            f"preset {preset_name}'s batch of {recipe.batch_size} sequences (the global batch) does not split "
            f"evenly over {ctx.world_size} processes", "start a number of processes that divides it")
    return _Settings(out, dataset, data_dir, preset_name, recipe, seed, max_steps, vocab_size, kind, dropout,
                     eval_every, checkpoint_every, threads, saved, resume_from)


def _prepare_data(ctx: Dist, s: _Settings) -> _Data:
    """Load the corpus, create ``out`` (rank 0), get the tokenizer (trained, or the checkpoint's), encode both
    splits and derive the run's length: epochs of full chunks, in global batches of the preset's size."""
    corpus = data.load_corpus(s.dataset, s.data_dir)
    if s.resume and s.saved.get("files") and s.saved["files"] != corpus.files:
        raise TrainingError(f"the files of dataset {s.dataset!r} changed since the run started",
                            "restore the original files to resume, or start a new run")
    if ctx.is_main:
        try:
            s.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"cannot create {s.out}: {exc.strerror or exc}",
                                "choose an --out you can write to") from exc
        for stale in (s.out / CHECKPOINTS).glob(".tmp-step-*"):      # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    tokenizer = _run_tokenizer(ctx, s, corpus)
    # The validation split as one text that encodes to exactly the validation token stream (documents closed by
    # <|endoftext|>); saved beside every checkpoint so `gamexport build` can check parity on real held-out text.
    held_out_text = "".join(doc + data.EOS for doc in corpus.valid)
    train_tokens = data.encode_documents(tokenizer, corpus.train)
    valid_tokens = data.encode_documents(tokenizer, corpus.valid)
    T, B = s.recipe.seq_len, s.recipe.batch_size
    n_chunks = data.n_train_chunks(len(train_tokens), T)
    if n_chunks == 0:
        raise TrainingError(f"the training split has {len(train_tokens)} tokens, fewer than one sequence of {T + 1}",
                            "use more text, or a preset with a shorter sequence")
    if len(valid_tokens) < 2:
        raise TrainingError("the validation split has fewer than 2 tokens", "use a longer validation text")
    steps_per_epoch = data.batches_per_epoch(n_chunks, B)
    total_steps = s.max_steps or s.recipe.epochs * steps_per_epoch
    warmup = min(s.recipe.warmup_steps, max(1, total_steps // 2))
    return _Data(corpus, tokenizer, held_out_text, train_tokens, valid_tokens, n_chunks, steps_per_epoch,
                 total_steps, warmup)


def _run_tokenizer(ctx: Dist, s: _Settings, corpus: data.Corpus) -> Tokenizer:
    """The checkpoint's tokenizer on --resume; else one trained on the training split (rank 0) and saved in OUT.

    Rank 0 trains it and sends it to the others: the other ranks neither spend the time (nor the shared cores)
    nor depend on BPE training giving the same merges in every process, and need no shared filesystem to see it.
    """
    if s.resume:
        return Tokenizer.from_file(s.resume_from[1] / TOKENIZER_NAME)
    tokenizer_json = None
    if ctx.is_main:
        tokenizer = train_tokenizer(corpus.train, s.vocab_size or s.recipe.vocab_size)   # training split only
        save_tokenizer(tokenizer, s.out / TOKENIZER_NAME)
        tokenizer_json = tokenizer.to_json()
    tokenizer_json = ctx.broadcast_object(tokenizer_json)
    if not ctx.is_main:
        tokenizer = tokenizer_from_json(tokenizer_json)
    return tokenizer


def _set_up(ctx: Dist, dev: torch.device, s: _Settings, d: _Data) -> _Run:
    """Model, optimizer and gradient scaler on ``dev``; then the resumed run's state, or a fresh run's files."""
    amp_dtype = None
    if dev.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast():
        return torch.autocast(device_type=dev.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    resumed_config, resumed_weights = load_run_weights(s.resume_from[1]) if s.resume else (None, None)
    net = _build_net(s, d, resumed_config).to(dev).train()          # train mode: dropout active
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.recipe.lr, betas=s.recipe.betas,
                                  weight_decay=s.recipe.weight_decay)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    run = _Run(ctx, dev, s, d, net, net, optimizer, scaler, autocast, amp_dtype)
    if s.resume:
        _restore(run, resumed_weights)
    else:
        _start_fresh(run)
    if ctx.enabled:
        # Starting DDP broadcasts rank 0's parameters; they are already equal (same seed, or the same checkpoint).
        run.ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None)
    run.recipe_record, run.tokenizer_record = _recipe_record(run), _tokenizer_record(d.tokenizer)
    return run


def _build_net(s: _Settings, d: _Data, resumed_config: dict[str, Any] | None) -> torch.nn.Module:
    """The model: on --resume the shape the run was started with (even if the preset changed since; its weights
    are loaded by ``_restore``); else the preset's, seeded, sized to the tokenizer (a baseline matched to it)."""
    gam_cfg = s.recipe.model.replace(vocab_size=d.tokenizer.vocab_size,
                                     **({"dropout": float(s.dropout)} if s.dropout is not None else {}))
    if s.resume:
        saved_kind = resumed_config.get("architecture", "gam")
        if saved_kind != s.kind:
            raise TrainingError(f"run.json says --model {s.kind}, but {s.resume_from[1]} holds a {saved_kind} model",
                                "the run folder is inconsistent; start a new run")
        if s.kind == "gam":
            return build_model(GAMConfig.from_dict(resumed_config))
        from .baselines import lm_from_config
        return lm_from_config(resumed_config)
    if s.kind == "gam":
        net = build_model(gam_cfg, seed=s.seed)
    else:
        from .baselines import build_lm
        net = build_lm(s.kind, gam_cfg, seed=s.seed)                    # width matched to gam_cfg's parameters
    if s.recipe.embedding_init_std is not None:             # see presets.py: why not the reference init
        generator = torch.Generator().manual_seed(s.seed)
        with torch.no_grad():
            for name in ("token_embedding", "pos_embedding"):   # whichever the architecture has
                embedding = getattr(net, name, None)
                if embedding is not None:
                    embedding.weight.normal_(0.0, s.recipe.embedding_init_std, generator=generator)
    return net


def _restore(run: _Run, weights: dict[str, np.ndarray]) -> None:
    """Continue from the checkpoint: weights, optimizer, scaler, data position and random generators (each rank
    its own when the run had as many); metrics.jsonl loses the steps logged after the checkpoint."""
    ctx, s = run.ctx, run.settings
    run.step, folder = s.resume_from
    run.last_checkpoint = run.step
    load_weights_into(run.net, weights)
    state = load_trainer_state(folder)
    run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.batch_index = state["epoch"], state["batch_index"]
    by_rank = state.get("rng_by_rank")
    if by_rank and len(by_rank) == ctx.world_size:
        set_rng_state(by_rank[ctx.rank])                   # every rank continues its own dropout stream
    else:
        set_rng_state(state["rng"])
        if ctx.rank > 0:
            torch.manual_seed(distributed.derived_seed(s.seed, ctx.rank) ^ run.step)
        saved_world = len(by_rank) if by_rank else 1
        if ctx.is_main and saved_world != ctx.world_size and run.net.config.dropout > 0:
            print(f"warning: the run was checkpointed by {saved_world} process(es) and continues in "
                  f"{ctx.world_size}: data order and optimizer are exact, dropout masks differ from an "
                  "uninterrupted run", file=sys.stderr, flush=True)
    if ctx.is_main:
        kept = [r for r in read_metrics(run.metrics_path) if r["step"] <= run.step]   # drop steps after it
        atomic_write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))


def _start_fresh(run: _Run) -> None:
    """A fresh run: every rank but 0 seeds its own dropout stream; rank 0 writes run.json and metrics.jsonl."""
    ctx, s = run.ctx, run.settings
    if ctx.rank > 0:       # rank 0 keeps the single-process stream; the others draw their own dropout masks
        torch.manual_seed(distributed.derived_seed(s.seed, ctx.rank))
    if not ctx.is_main:
        return
    atomic_write_json(s.out / RUN_NAME, {
        "kind": RUN_KIND, "dataset": s.dataset,
        "data_dir": str(Path(s.data_dir).resolve()) if s.data_dir is not None else None,
        "preset": s.preset_name, "seed": s.seed, "max_steps": s.max_steps, "vocab_size": s.vocab_size,
        "model": s.kind, "dropout": s.dropout,
        "eval_every": s.eval_every, "checkpoint_every": s.checkpoint_every, "threads": s.threads,
        "files": run.data.corpus.files, "gamexport_version": __version__})
    run.metrics_path.write_text("", encoding="utf-8")


def _recipe_record(run: _Run) -> dict[str, Any]:
    """The training recipe as config.json's and summary.json's "training" record."""
    recipe, d, ctx = run.settings.recipe, run.data, run.ctx
    record = {
        "batch_size": recipe.batch_size, "seq_len": recipe.seq_len, "lr": recipe.lr, "betas": list(recipe.betas),
        "weight_decay": recipe.weight_decay, "warmup_steps": d.warmup, "schedule": "linear warm-up, cosine to 0",
        "grad_clip": recipe.grad_clip, "total_steps": d.total_steps, "steps_per_epoch": d.steps_per_epoch,
        "dropout": run.net.config.dropout, "embedding_init_std": recipe.embedding_init_std,
        "amp": str(run.amp_dtype).removeprefix("torch.") if run.amp_dtype else "fp32"}
    if ctx.enabled:
        record["data_parallel"] = {"world_size": ctx.world_size, "backend": ctx.backend,
                                   "per_rank_batch": recipe.batch_size // ctx.world_size}
    return record


def _tokenizer_record(tokenizer: Tokenizer) -> dict[str, Any]:
    return {"file": TOKENIZER_NAME, "type": "byte-level BPE (Hugging Face tokenizers)",
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "trained_on": "training split only"}


# ---- the loop ----------------------------------------------------------------------------------------------------

def _train_steps(run: _Run, progress: bool, on_step: Callable[[dict[str, Any]], None] | None) -> None:
    """Optimisation steps until the run's last: each one logged to metrics.jsonl, evaluated and checkpointed on
    schedule (both also at the last step). Ctrl-C becomes ``TrainingInterrupted``, saying how to continue."""
    ctx, d = run.ctx, run.data
    bar = _progress_bar(run) if progress and ctx.is_main else None
    order_epoch, order = -1, None
    try:
        log = run.metrics_path.open("a", encoding="utf-8") if ctx.is_main else contextlib.nullcontext()
        with log as metrics_file:
            while run.step < d.total_steps:
                if order_epoch != run.epoch:
                    order, order_epoch = data.epoch_order(d.n_chunks, run.settings.seed, run.epoch), run.epoch
                record = _optimisation_step(run, order)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if _checkpoint_due(run):
                    _checkpoint(run)
                    run.last_checkpoint = run.step
                if bar is not None:
                    _update_bar(bar, run, record)
                if on_step is not None:
                    on_step(record)
    except KeyboardInterrupt:
        where = (f"the last checkpoint is step {run.last_checkpoint}; continue with the same command and --resume"
                 if run.last_checkpoint is not None else "no checkpoint was written yet; start the run again")
        raise TrainingInterrupted(f"training interrupted at step {run.step}", where) from None
    finally:
        if bar is not None:
            bar.close()


def _optimisation_step(run: _Run, order: np.ndarray) -> dict[str, Any]:
    """One update on the next global batch, the position advanced, a validation pass when one is due; returns
    the step's metrics record."""
    s, d = run.settings, run.data
    x, y = data.train_batch(d.train_tokens, order, run.batch_index, s.recipe.batch_size, s.recipe.seq_len)
    n_targets = y.size                                                      # x, y: 2 × (b, T), the global batch
    lr = lr_at(run.step, s.recipe.lr, d.warmup, d.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    train_loss = _gradient_step(run, x, y, n_targets)
    dt = time.perf_counter() - t0
    run.session_tokens += n_targets
    run.session_time += dt

    run.step += 1
    run.batch_index += 1
    if run.batch_index == d.steps_per_epoch:
        run.epoch, run.batch_index = run.epoch + 1, 0
    if not math.isfinite(train_loss):
        raise TrainingError(f"the training loss became {train_loss} at step {run.step}",
                            "lower the learning rate or resume from an earlier checkpoint")
    val_loss = val_ppl = None
    if _checkpoint_due(run) or run.step % s.eval_every == 0:              # every checkpoint is evaluated
        val_loss, val_ppl = evaluate(run.net, d.valid_tokens, s.recipe.seq_len, s.recipe.batch_size, run.dev,
                                     run.autocast, dist=run.ctx)
        run.last_val = (val_loss, val_ppl)
    return {"step": run.step, "epoch": round(run.step / d.steps_per_epoch, 4), "train_loss": train_loss,
            "val_loss": val_loss, "val_ppl": val_ppl, "tokens_per_s": round(n_targets / dt, 1), "lr": lr}


def _checkpoint_due(run: _Run) -> bool:
    """Whether the step just done is checkpointed: every ``checkpoint_every`` steps, and the last one."""
    return run.step % run.settings.checkpoint_every == 0 or run.step == run.data.total_steps


def _gradient_step(run: _Run, x: np.ndarray, y: np.ndarray, n_targets: int) -> float:
    """Forward, backward, clip and AdamW update on the global batch ``x, y``; returns its mean training loss."""
    ctx, dev = run.ctx, run.dev
    if ctx.enabled:
        # This rank's rows of the global batch. Its loss is its SUMMED cross-entropy × W / (targets of the global
        # batch): DDP averages gradients over the W ranks, so the update is the gradient of the global mean loss,
        # also when the rows do not split evenly. A rank left without rows (a last batch smaller than W) runs
        # row 0 with weight 0, because every rank must take part in the gradient all-reduce.
        lo, hi = ctx.shard(len(x))
        weight = ctx.world_size / n_targets if hi > lo else 0.0
        if hi == lo:
            lo, hi = 0, 1
        xs, ys = torch.from_numpy(x[lo:hi]).to(dev), torch.from_numpy(y[lo:hi]).to(dev)
        with run.autocast():
            logits, _ = run.ddp(xs)
        nll = F.cross_entropy(logits.float().flatten(0, 1), ys.flatten(), reduction="sum")
        loss = nll * weight
    else:
        xs, ys = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
        with run.autocast():
            _, loss = run.ddp(xs, ys)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.net.parameters(), run.settings.recipe.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if ctx.enabled:      # the global mean loss, for the log: Σ over ranks of their summed losses / targets
        return ctx.all_reduce_sum([nll.item() if weight else 0.0])[0] / n_targets
    return loss.item()                                                      # waits for the step


def _progress_bar(run: _Run):
    """A tqdm bar on stderr (rank 0), or None without tqdm: metrics.jsonl still records every step."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    s = run.settings
    label = "" if s.kind == "gam" else f"{s.kind} "
    return tqdm(total=run.data.total_steps, initial=run.step, file=sys.stderr, unit="step", dynamic_ncols=True,
                desc=f"train {label}{run.data.corpus.name}/{s.preset_name}" + (
                    f" ×{run.ctx.world_size}" if run.ctx.enabled else ""))


def _update_bar(bar, run: _Run, record: dict[str, Any]) -> None:
    postfix = {"loss": f"{record['train_loss']:.3f}", "tok/s": f"{run.session_tokens / run.session_time:,.0f}"}
    if run.last_val[1] is not None:
        postfix["val_ppl"] = f"{run.last_val[1]:.2f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


# ---- checkpoints of the run --------------------------------------------------------------------------------------

def _checkpoint(run: _Run) -> None:
    """Every rank takes part (generator states and weight digests are gathered); rank 0 writes."""
    ctx = run.ctx
    weights = state_dict_numpy(run.net)
    rng_by_rank = ctx.all_gather_object(rng_state())
    digests = None
    if ctx.enabled:
        digests = ctx.all_gather_object(distributed.weights_digest(weights))
        if len(set(digests)) > 1:
            raise TrainingError(f"the weights of the {ctx.world_size} processes differ at step {run.step} "
                                "(data-parallel ranks out of step)",
                                "resume from the last checkpoint; report it if it happens again")
    if ctx.is_main:
        save_training_checkpoint(run.settings.out, run.step, run.net, run.data.tokenizer,
                                 _trainer_state(run, rng_by_rank, digests), _meta(run, *run.last_val),
                                 run.data.held_out_text, weights=weights)
    ctx.barrier()          # the others continue only once the checkpoint is on disk (a resume must see it)


def _meta(run: _Run, val_loss: float | None, val_ppl: float | None) -> dict[str, Any]:
    """config.json's metadata beside the model's shape: what was trained, on what, how far, how well."""
    s, d = run.settings, run.data
    what = "" if s.kind == "gam" else f"{s.kind} baseline, "
    label = f"trained: {what}{d.corpus.name}, preset {s.preset_name}, seed {s.seed}, step {run.step}" + (
        f", val ppl {val_ppl:.2f}" if val_ppl is not None else "")
    return {"trained": True, "label": label, "heldout_text": HELD_OUT_NAME, "preset": s.preset_name,
            "model": s.kind, "seed": s.seed, "step": run.step, "epoch": round(run.step / d.steps_per_epoch, 4),
            "val_loss": val_loss, "val_ppl": val_ppl, "dataset": d.corpus.record(),
            "tokenizer": run.tokenizer_record, "training": run.recipe_record, "gamexport_version": __version__}


def _trainer_state(run: _Run, rng_by_rank: list[dict[str, Any]], digests: list[str] | None) -> dict[str, Any]:
    """trainer_state.pt: what, beside the weights, decides the next step (see the module's docstring)."""
    s, d = run.settings, run.data
    state = {"step": run.step, "epoch": run.epoch, "batch_index": run.batch_index, "seed": s.seed,
             "optimizer": run.optimizer.state_dict(),
             "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
             "scheduler": {"kind": "warmup_cosine", "peak_lr": s.recipe.lr, "warmup_steps": d.warmup,
                           "total_steps": d.total_steps},
             "rng": rng_by_rank[0], "rng_by_rank": rng_by_rank, "world_size": run.ctx.world_size}
    if digests is not None:
        state["weights_sha256_by_rank"] = digests
    return state


# ---- the end: plots and summary ----------------------------------------------------------------------------------

def _finish(run: _Run, started: float, start_step: int) -> dict[str, Any]:
    """Rank 0 draws the plots and writes summary.json; every rank returns that summary, once the folder is
    complete."""
    s, d = run.settings, run.data
    last_val = run.last_val
    if last_val[0] is None:            # resumed at the last step: nothing ran, evaluate for the summary
        last_val = evaluate(run.net, d.valid_tokens, s.recipe.seq_len, s.recipe.batch_size, run.dev, run.autocast,
                            dist=run.ctx)
    summary = None
    if run.ctx.is_main:
        from .plots import plot_metrics

        plots = plot_metrics(read_metrics(run.metrics_path), s.out)
        summary = {
            "out": str(s.out), "model": s.kind, "steps": run.step, "total_steps": d.total_steps,
            "epochs": round(run.step / d.steps_per_epoch, 4),
            "resumed_from": start_step if s.resume else None, "val_loss": last_val[0], "val_ppl": last_val[1],
            "tokens_per_s": round(run.session_tokens / run.session_time, 1) if run.session_time else None,
            "wall_s": round(time.time() - started, 1), "device": str(run.dev), "threads": torch.get_num_threads(),
            "world_size": run.ctx.world_size,
            "params": run.net.num_parameters(), "preset": s.preset_name, "seed": s.seed,
            "config": run.net.config.to_dict(), "dataset": d.corpus.record(),
            "tokens": {"train": int(len(d.train_tokens)), "valid": int(len(d.valid_tokens))},
            "tokenizer": run.tokenizer_record, "training": run.recipe_record,
            "weights": str(s.out / WEIGHTS_NAME), "config_file": str(s.out / CONFIG_NAME),
            "plots": [str(p) for p in plots],
        }
        atomic_write_json(s.out / SUMMARY_NAME, summary)
    return run.ctx.broadcast_object(summary)
