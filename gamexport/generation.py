"""Open a runner for a SOURCE: a build folder runs on ONNX Runtime, a checkpoint on eager PyTorch.

The build-folder path imports numpy, onnx, onnxruntime and tokenizers only — never torch.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from gamexport.errors import InputError
from gamexport.manifest import MANIFEST_NAME, verify, verify_while
from gamexport.runtime import Runner
from gamexport.sampling import SamplingConfig


def _tokenizer(path: Path | None):
    if path is None or not path.is_file():
        return None
    from gamexport.tokenizer import Tokenizer

    return Tokenizer.from_file(path)


#: What ``gamexport generate --runtime`` accepts.
GENERATE_RUNTIMES = ("onnxruntime", "genai")


def _genai_model(folder: Path):
    """The build folder's fp32 onnxruntime-genai bundle, opened with ``og.Model`` after the manifest check."""
    from gamexport.genai_client import GenaiModel
    from gamexport.layout import genai_dir

    bundle = folder / genai_dir()
    if not bundle.is_dir():
        raise InputError(f"{folder} has no {genai_dir()}/ bundle (its step graph predates the per-layer state "
                         "convention onnxruntime-genai needs, or it was built without one)",
                         "rebuild it with a gamexport that writes genai bundles, or use --runtime onnxruntime")
    from gamexport.manifest import read_manifest

    names = [name for name in read_manifest(folder)["files"] if name.startswith(f"{genai_dir()}/")]
    if not names:
        raise InputError(f"{bundle} is not listed in {folder / MANIFEST_NAME}", "rebuild the folder")
    verify(folder, names)   # before og reads anything: its genai_config.json names the files it opens
    return GenaiModel(bundle)


@contextmanager
def open_runner(source: str | None, threads: int | None = None,
                runtime: str = "onnxruntime") -> Iterator[tuple[Runner, object, str]]:
    """Yield (runner, tokenizer or None, label) for a build folder, a checkpoint, or the embedded default.

    ``runtime`` ``genai`` runs a build folder's ``genai/`` bundle through onnxruntime-genai (the "runner" is then
    a ``gamexport.genai_client.GenaiModel``: ``generate`` and ``close`` only)."""
    if runtime not in GENERATE_RUNTIMES:
        raise InputError(f"--runtime {runtime!r} is not one of {', '.join(GENERATE_RUNTIMES)}",
                         "use onnxruntime (default) or genai")
    folder = Path(source) if source is not None else None
    is_build = folder is not None and folder.is_dir() and (folder / MANIFEST_NAME).is_file()
    if runtime == "genai":
        if not is_build:
            raise InputError("--runtime genai runs a build folder's genai/ bundle, and this source is not a build "
                             "folder", "pass a folder written by gamexport build")
        runner = _genai_model(folder)
        try:
            yield runner, _tokenizer(runner.bundle / "tokenizer.json"), f"onnxruntime-genai, {runner.bundle}"
        finally:
            runner.close()
        return
    if is_build:
        from gamexport.engines.ort import OrtRunner, prepacked_for_this_machine
        from gamexport.layout import PREPACKED_FILES, graph_file
        from gamexport.manifest import read_manifest

        # the step graph pre-packed for this machine when the build made one here (parity-checked by the build
        # like every fp32 artifact), else step.onnx; one session either way: prefill is a chunk
        prepacked, why = prepacked_for_this_machine(folder, read_manifest(folder)["files"])
        step = prepacked or folder / graph_file("step")
        checked = [*(PREPACKED_FILES if prepacked else [step.name]),
                   *(["tokenizer.json"] if (folder / "tokenizer.json").exists() else [])]
        runner = verify_while(folder, checked, lambda: OrtRunner(None, step, None, threads))
        label = f"onnxruntime-cpu, {folder}" + (f", {step.name}" if prepacked else f" ({why})" if why else "")
        tok_path = folder / "tokenizer.json"
    else:
        from gamexport.engines.eager import EagerRunner
        from gamexport.sources import resolve_source

        ckpt = resolve_source(source, None)
        runner = EagerRunner(ckpt.config, ckpt.weights, threads=threads)
        label = f"eager PyTorch, {ckpt.source}" + ("" if ckpt.meta.get("trained", True) else ", UNTRAINED")
        tok_path = ckpt.tokenizer_path
    try:
        yield runner, _tokenizer(tok_path), label
    finally:
        runner.close()


def run_generation(runner: Runner, tokenizer, prompt: str | None, ids: Sequence[int] | None,
                   max_new_tokens: int, sampling: SamplingConfig) -> str:
    """Prompt → continuation text (with a tokenizer) or the generated ids joined by commas (without one)."""
    if prompt is not None:
        if tokenizer is None:
            raise InputError("this model has no tokenizer.json, so --prompt cannot be encoded",
                             "pass token ids with --ids 1,2,3, or use a model trained with gamexport train")
        prompt_ids = tokenizer.encode(prompt)
        if not prompt_ids:
            raise InputError("the prompt encodes to no tokens", "pass a non-empty --prompt")
    else:
        prompt_ids = list(ids or [])
    stops = [tokenizer.eos_id] if tokenizer is not None and tokenizer.eos_id is not None else []
    new = runner.generate(prompt_ids, max_new_tokens, sampling, stop_ids=stops)
    if tokenizer is None:
        return ",".join(str(t) for t in new)
    if stops and new and new[-1] == stops[0]:
        new = new[:-1]
    return prompt + tokenizer.decode(new) if prompt is not None else tokenizer.decode(new)
