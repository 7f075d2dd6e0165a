"""``gamexport generate``: continue a prompt with a build folder (ONNX Runtime) or a checkpoint (eager)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOption, ThreadsOption, run


def parse_ids(text: str) -> list[int]:
    from gamexport.errors import InputError

    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InputError(f"--ids must be comma-separated integers, got {text!r}", "e.g. --ids 1,2,3") from None
    if not ids:
        raise InputError("--ids is empty", "pass at least one token id, e.g. --ids 1,2,3")
    return ids


def generate(
    source: Annotated[str | None, typer.Argument(
        help="A build folder (has manifest.json → ONNX Runtime) or a checkpoint (→ eager PyTorch); "
             "omitted: the embedded default.", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt text (needs a tokenizer.json beside the model).")] = None,
    ids: Annotated[str | None, typer.Option(help="Prompt as comma-separated token ids, e.g. 1,2,3.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=0, help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="Keep the k likeliest tokens (0 = all).")] = 40,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass (1 = off).")] = 0.95,
    seed: Annotated[int, typer.Option(help="Sampling seed: same seed, same tokens, on every runtime.")] = 0,
    threads: ThreadsOption = None,
    debug: DebugOption = False,
) -> None:
    """Generate a continuation. Prints the text (or ids) to stdout; stops at the model's P positions."""

    def body() -> None:
        from gamexport.errors import InputError
        from gamexport.engines.loader import open_runner, run_generation
        from gamexport.sampling import SamplingConfig

        if (prompt is None) == (ids is None):
            raise InputError("give exactly one of --prompt and --ids", 'e.g. --prompt "Once upon a time"')
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        with open_runner(source, threads) as (runner, tokenizer, label):
            text = run_generation(runner, tokenizer, prompt=prompt,
                                  ids=parse_ids(ids) if ids is not None else None,
                                  max_new_tokens=max_new_tokens, sampling=sampling)
        from .common import say
        say(f"[{label}]")
        print(text)

    run(body, debug)
