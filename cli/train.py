"""``gamexport train``: train a GAM language model — a thin command over ``gamexport.training.loop.train``.

    gamexport train --dataset tinystories --preset small --out runs/ts-small --max-steps 2000
    gamexport train --out runs/ts-small --resume          # after Ctrl-C: continues exactly where it stopped

Registered by cli/main.py as ``app.command("train")(train)``. Heavy imports (torch, tokenizers) happen inside
the command body, so ``gamexport --help`` stays fast. Problems the user can fix are GamexportErrors, printed as
one line by ``cli.common.run`` (exit code 2; the traceback with --debug); Ctrl-C exits with 130 and says which
checkpoint ``--resume`` will continue from.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import DebugOption, run, say


def train(
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Run folder: checkpoints, metrics, plots; it also holds the latest model.safetensors, "
                            "config.json and tokenizer.json, so it can be passed to `gamexport build` / `generate`.")],
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", "-d", help="wikitext2 | tinystories (from --data-dir) | PATH: a text file (its last 5% of "
                                "documents is held out) or a folder with train.txt and valid.txt | hf:NAME[:CONFIG] (Hugging Face "
                                "datasets, optional, needs a reachable hub).")] = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", "-p", show_default="small", help="Model shape and recipe: paper | small | tiny | demo.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", min=1, show_default="the preset's epochs",
        help="Length of the run in optimizer steps (the cosine schedule ends there).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out from its latest checkpoint (bit-exact on CPU).")] = False,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", show_default="0", help="Seed for initialisation, data order and dropout.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", show_default="../shared/data if it exists",
        help="Folder holding wikitext-2/ and tinystories/.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(
        "--eval-every", min=1, help="Steps between validation passes (one also runs at every checkpoint).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        "--checkpoint-every", min=1, help="Steps between checkpoints (one is also written at the end).")] = None,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", "-j", min=1, show_default="torch's choice", help="CPU threads for torch.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(
        "--vocab-size", min=258, help="Tokenizer vocabulary instead of the preset's.")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", show_default="cuda if available (bf16/fp16 autocast), else cpu", help="cpu | cuda.")] = None,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="Show a progress bar on stderr.")] = True,
    debug: DebugOption = False,
) -> None:
    """Train a GAM language model: BPE tokenizer, AdamW with warm-up and cosine decay, resumable checkpoints."""
    if device is not None and device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{device!r} is not cpu or cuda", param_hint="--device")

    def body() -> dict:
        from gamexport.training.loop import TrainingInterrupted
        from gamexport.training.loop import train as run_training

        try:
            return run_training(
                dataset=dataset, preset=preset, out=out, max_steps=max_steps, resume=resume, seed=seed,
                data_dir=data_dir, eval_every=eval_every, checkpoint_every=checkpoint_every, threads=threads,
                vocab_size=vocab_size, device=device, progress=progress,
            )
        except TrainingInterrupted as exc:   # Ctrl-C: say how to continue, exit like an interrupted program
            say(f"interrupted: {exc.line()}")
            raise typer.Exit(130) from None

    summary = run(body, debug)
    dataset_record = summary["dataset"]
    typer.echo(f"trained {summary['steps']} steps ({summary['epochs']:.2f} epochs) of preset {summary['preset']} "
               f"on {dataset_record['name']} [{dataset_record['flavour']}], seed {summary['seed']}")
    typer.echo(f"validation: loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f} "
               f"({dataset_record['held_out']})")
    speed = f"{summary['tokens_per_s']:,.0f} tokens/s, " if summary["tokens_per_s"] else ""
    typer.echo(f"{speed}{summary['wall_s']:.0f} s; model: {summary['weights']}")
