"""``gamexport generate``: continue a prompt with a build folder (ONNX Runtime) or a checkpoint (eager)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gamexport.limits import MAX_NEW_TOKENS, MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE

from .common import DebugOption, ThreadsOption, run


def parse_ids(text: str) -> list[int]:
    """Comma-separated ids as Python ints (any size: the runner names an id outside the vocabulary)."""
    from gamexport.errors import InputError

    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InputError(f"--ids must be comma-separated integers, got {text!r}", "e.g. --ids 1,2,3") from None
    if not ids:
        raise InputError("--ids is empty", "pass at least one token id, e.g. --ids 1,2,3")
    return ids


def check_prompt(text: str) -> str:
    """The prompt, unless argv held bytes that are not UTF-8 (Python passes them on as surrogate escapes)."""
    from gamexport.errors import InputError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = text[exc.start].encode("utf-8", "surrogateescape")
        raise InputError(f"--prompt is not valid UTF-8 (byte 0x{byte.hex()} at character {exc.start})",
                         "pass the prompt as UTF-8 text, or token ids with --ids") from None
    return text


def generate(
    source: Annotated[str | None, typer.Argument(
        help="A build folder (has manifest.json → ONNX Runtime) or a checkpoint (→ eager PyTorch); "
             "omitted: the embedded default.", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt text (needs a tokenizer.json beside the model).")] = None,
    ids: Annotated[str | None, typer.Option(help="Prompt as comma-separated token ids, e.g. 1,2,3.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=0, max=MAX_NEW_TOKENS, help=f"Most tokens to generate, "
                                                f"0..{MAX_NEW_TOKENS} (also stops at the model's positions).")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, max=MAX_TEMPERATURE, help=f"0 = greedy, else "
                                               f"{MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}.")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, max=MAX_TOP_K, help=f"Keep the k likeliest tokens, 0..{MAX_TOP_K} "
                                                                  "(0 = all).")] = 40,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0,
                                         help="Nucleus sampling mass, in (0, 1] (1 = off).")] = 0.95,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help=f"Sampling seed, 0..{MAX_SEED}: same seed, same "
                                                                "tokens, on every runtime.")] = 0,
    runtime: Annotated[str, typer.Option(help="For a build folder: onnxruntime (gamexport's runner) or genai "
                                              "(its genai/ bundle through onnxruntime-genai; sampling with "
                                              "temperature > 0 uses onnxruntime-genai's own random stream).")
                       ] = "onnxruntime",
    threads: ThreadsOption = None,
    debug: DebugOption = False,
) -> None:
    """Generate a continuation. Prints the text (or ids) to stdout; stops at the model's P positions."""

    def body() -> None:
        from gamexport.errors import InputError
        from gamexport.generation import open_runner, run_generation
        from gamexport.sampling import SamplingConfig

        if (prompt is None) == (ids is None):
            raise InputError("give exactly one of --prompt and --ids", 'e.g. --prompt "Once upon a time"')
        if prompt is not None:
            check_prompt(prompt)
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        with open_runner(source, threads, runtime) as (runner, tokenizer, label):
            text = run_generation(runner, tokenizer, prompt=prompt,
                                  ids=parse_ids(ids) if ids is not None else None,
                                  max_new_tokens=max_new_tokens, sampling=sampling)
        from .common import exit_quickly, say
        say(f"[{label}]")
        print(text)
        exit_quickly()   # nothing left to write: the process may end without the interpreter's teardown

    run(body, debug)
