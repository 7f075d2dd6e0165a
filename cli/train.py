"""``gamexport train``: train a GAM language model — a thin command over ``gamexport.training.loop.train``.

    gamexport train --dataset tinystories --preset small --out runs/ts-small --max-steps 2000
    gamexport train --out runs/ts-small --resume          # after Ctrl-C: continues exactly where it stopped
    gamexport train --dataset tinystories --preset small --model transformer --out runs/ts-transformer

Data-parallel (DistributedDataParallel; gloo on CPU, NCCL with one GPU per process), the same command under
torchrun — the preset's batch is the global batch, split between the processes; rank 0 writes the run folder:

    torchrun --standalone --nproc_per_node 2 -m gamexport.cli.main train --dataset tinystories --out runs/ddp
    torchrun --standalone --nproc_per_node 2 -m gamexport.cli.main train --out runs/ddp --resume

Registered by cli/main.py as ``app.command("train")(train)``. Heavy imports (torch, tokenizers) happen inside
the command body, so ``gamexport --help`` stays fast. Problems the user can fix are GamexportErrors, printed as
one line by ``cli.common.run`` (exit code 2; the traceback with --debug); Ctrl-C exits with 130 and says which
checkpoint ``--resume`` will continue from.
"""

import os
from pathlib import Path
from typing import Annotated, Literal, Optional, get_args

import typer

from gamexport.limits import MAX_SEED, MAX_STEPS, MAX_THREADS, MAX_VOCAB, MIN_VOCAB

from .common import DebugOption, run, say

# gamexport.training.baselines.MODEL_KINDS, spelled out so that --help does not import torch (a test keeps them
# equal); a Literal, so that typer lists the choices in --help and refuses others in one line.
ModelKind = Literal["gam", "transformer", "mamba"]
MODEL_CHOICES = get_args(ModelKind)


def train(
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Run folder: checkpoints, metrics, plots; it also holds the latest model.safetensors, "
                            "config.json and tokenizer.json, so it can be passed to `gamexport build` / `generate`.")],
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", "-d", help="wikitext2 | tinystories (from --data-dir) | PATH: a text file (its last 5% of "
                                "documents is held out) or a folder with train.txt and valid.txt | hf:NAME[:CONFIG] (Hugging Face "
                                "datasets, optional, needs a reachable hub).")] = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", "-p", show_default="small", help="Model shape and recipe: paper | small | demo | compare | tiny.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", min=1, max=MAX_STEPS, show_default="the preset's epochs",
        help=f"Length of the run in optimizer steps, 1..{MAX_STEPS} (the cosine schedule ends there).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out from its latest checkpoint (bit-exact on CPU).")] = False,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", min=0, max=MAX_SEED, show_default="0",
        help=f"Seed for initialisation, data order and dropout, 0..{MAX_SEED}.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", show_default="../shared/data if it exists",
        help="Folder holding wikitext-2/ and tinystories/.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(
        "--eval-every", min=1, max=MAX_STEPS,
        help=f"Steps between validation passes, 1..{MAX_STEPS} (one also runs at every checkpoint).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        "--checkpoint-every", min=1, max=MAX_STEPS,
        help=f"Steps between checkpoints, 1..{MAX_STEPS} (one is also written at the end).")] = None,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", "-j", min=1, max=MAX_THREADS, show_default="torch's choice",
        help=f"CPU threads for torch, 1..{MAX_THREADS} (4 × this machine's CPUs).")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(
        "--vocab-size", min=MIN_VOCAB, max=MAX_VOCAB,
        help=f"Tokenizer vocabulary instead of the preset's, {MIN_VOCAB}..{MAX_VOCAB}.")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", show_default="cuda if available (bf16/fp16 autocast), else cpu", help="cpu | cuda.")] = None,
    model: Annotated[Optional[ModelKind], typer.Option(
        "--model", show_default="gam",
        help="Architecture: gam, or a baseline (transformer | mamba) whose width is chosen so that its parameter "
             "count is within ±5% of the preset's GAM (same vocabulary, layers, positions and recipe).")] = None,
    dropout: Annotated[Optional[float], typer.Option(
        "--dropout", min=0.0, max=1.0, show_default="the preset's: 0.1",
        help="Dropout probability; 0 makes a data-parallel run match a single process.")] = None,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="Show a progress bar on stderr.")] = True,
    debug: DebugOption = False,
) -> None:
    """Train a GAM language model (or a matched baseline): BPE tokenizer, AdamW with warm-up and cosine decay,
    resumable checkpoints.

    Data-parallel on several processes or GPUs: run the same command under torchrun, e.g.
    `torchrun --standalone --nproc_per_node 2 -m gamexport.cli.main train --dataset tinystories --out runs/ddp`
    (the preset's batch is split between the processes; only rank 0 writes files and prints).
    """
    if device is not None and device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{device!r} is not cpu or cuda", param_hint="--device")

    def body() -> dict:
        from gamexport.training.checkpoints import TrainingInterrupted
        from gamexport.training.loop import train as run_training

        try:
            return run_training(
                dataset=dataset, preset=preset, out=out, max_steps=max_steps, resume=resume, seed=seed,
                data_dir=data_dir, eval_every=eval_every, checkpoint_every=checkpoint_every, threads=threads,
                vocab_size=vocab_size, device=device, progress=progress, model=model, dropout=dropout,
            )
        except TrainingInterrupted as exc:   # Ctrl-C: say how to continue, exit like an interrupted program
            say(f"interrupted: {exc.line()}")
            raise typer.Exit(130) from None

    summary = run(body, debug)
    if os.environ.get("RANK", "0") not in ("", "0"):     # under torchrun: rank 0 reports for the whole run
        return
    dataset_record = summary["dataset"]
    what = "" if summary.get("model", "gam") == "gam" else f"{summary['model']} baseline, "
    procs = f", {summary['world_size']} processes" if summary.get("world_size", 1) > 1 else ""
    typer.echo(f"trained {summary['steps']} steps ({summary['epochs']:.2f} epochs) of preset {summary['preset']} "
               f"({what}{summary['params']:,} parameters) on {dataset_record['name']} [{dataset_record['flavour']}], "
               f"seed {summary['seed']}{procs}")
    typer.echo(f"validation: loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f} "
               f"({dataset_record['held_out']})")
    speed = f"{summary['tokens_per_s']:,.0f} tokens/s, " if summary["tokens_per_s"] else ""
    typer.echo(f"{speed}{summary['wall_s']:.0f} s; model: {summary['weights']}")
