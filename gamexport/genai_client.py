"""Generate through onnxruntime-genai: open a bundle (``gamexport.bundles.genai``) with ``og.Model`` and run its
``og.Generator`` loop — the client users of onnxruntime-genai run, with no gamexport code in the model's path.

Used by ``gamexport generate DIR --runtime genai`` and by the build's parity row through the real client. Token ids
are checked here before onnxruntime-genai sees them (an id outside the vocabulary would index past the embedding).
Without the package every entry point says the install command in one line (:func:`import_genai`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import GraphError, InputError
from .sampling import SamplingConfig

#: The install command a user without the client is told.
INSTALL = "pip install 'gamexport[genai]'  (or: pip install onnxruntime-genai)"


class GenaiMissing(InputError):
    """onnxruntime-genai is not installed."""


def import_genai():
    """The ``onnxruntime_genai`` module, or :class:`GenaiMissing` naming the install command."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise GenaiMissing("onnxruntime-genai is not installed", INSTALL) from None
    return onnxruntime_genai


def available() -> bool:
    try:
        import_genai()
    except GenaiMissing:
        return False
    return True


class GenaiModel:
    """One bundle opened with ``og.Model``; :meth:`generate` has the signature of ``Runner.generate``."""

    runtime = "onnxruntime-genai"

    def __init__(self, bundle: str | Path):
        from gamexport.bundles.genai import CONFIG_FILE
        from gamexport.jsonfile import read_json

        self.bundle = Path(bundle)
        og = import_genai()
        if not (self.bundle / CONFIG_FILE).is_file():
            raise GraphError(f"{self.bundle} has no {CONFIG_FILE}", "pass a bundle written by gamexport build")
        model = read_json(self.bundle / CONFIG_FILE, error=GraphError, fix="rebuild it with gamexport build")
        try:
            self.vocab_size = int(model["model"]["vocab_size"])
            self.context_length = int(model["model"]["context_length"])
            eos = model["model"].get("eos_token_id", [])
            self.eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos])}
        except (KeyError, TypeError, ValueError):
            raise GraphError(f"{self.bundle / CONFIG_FILE} has no model.vocab_size or model.context_length",
                             "rebuild it with gamexport build") from None
        try:
            self.model = og.Model(str(self.bundle))
        except Exception as exc:  # onnxruntime-genai raises RuntimeError (and others) with multi-line text
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GraphError(f"onnxruntime-genai cannot open {self.bundle}: {detail}",
                             "rebuild it with gamexport build") from exc

    def _check(self, prompts: np.ndarray) -> None:
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            raise InputError("pass at least one token", "e.g. --ids 1,2,3")
        bad = prompts[(prompts < 0) | (prompts >= self.vocab_size)]
        if bad.size:
            raise InputError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})",
                             "encode text with this model's tokenizer")
        if prompts.shape[1] >= self.context_length:
            raise InputError(f"the prompt has {prompts.shape[1]} tokens; the model has {self.context_length} "
                             "positions, so no token can follow it", "pass a shorter prompt")

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       sampling: SamplingConfig | None = None) -> list[list[int]]:
        """New ids after each prompt (all of one length: onnxruntime-genai feeds no attention mask for GAM, so a
        padded row would read its padding as tokens). Greedy unless ``sampling`` has a temperature > 0, then
        onnxruntime-genai's own sampler (same parameters as gamexport's, another random stream). Stops at the
        bundle's eos id (included), after ``max_new_tokens``, or when the sequence fills the model's positions."""
        og = import_genai()
        try:
            arr = np.asarray([list(p) for p in prompts], dtype=np.int64)
        except (ValueError, OverflowError):
            raise InputError("prompts of a batch must be token ids of one length",
                             "pad nothing: batch only prompts of equal length") from None
        self._check(arr)
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        sampling = sampling or SamplingConfig()
        options = {"batch_size": arr.shape[0], "max_length": min(arr.shape[1] + max_new_tokens, self.context_length)}
        if sampling.temperature > 0:
            top_k = min(int(sampling.top_k or self.vocab_size), self.vocab_size)  # gamexport's 0 = all
            options.update(do_sample=True, temperature=float(sampling.temperature), top_k=top_k,
                           top_p=float(sampling.top_p), random_seed=int(sampling.seed))
        else:
            options.update(do_sample=False)
        try:
            return self._run(og, arr, options)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError (and others) with multi-line text
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GraphError(f"onnxruntime-genai failed to generate with {self.bundle}: {detail}",
                             "rebuild the bundle with gamexport build") from exc

    def _run(self, og, arr: np.ndarray, options: dict) -> list[list[int]]:
        params = og.GeneratorParams(self.model)
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        generator.append_tokens(arr)
        # Each step's tokens as the generator returns them: a sequence that ends when every row is done does not get
        # the last eos appended (get_sequence misses it), and a row done early is padded afterwards.
        out: list[list[int]] = [[] for _ in range(arr.shape[0])]
        while not generator.is_done():
            generator.generate_next_token()
            for row, token in enumerate(generator.get_next_tokens()):
                if not out[row] or out[row][-1] not in self.eos_ids:
                    out[row].append(int(token))
        return out

    def generate(self, ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 stop_ids: Sequence[int] = ()) -> list[int]:
        """New ids after one prompt (``Runner.generate``'s signature; the stop id is the bundle's eos id, which
        gamexport writes from the same tokenizer as ``stop_ids``)."""
        return self.generate_batch([list(ids)], max_new_tokens, sampling)[0]

    def close(self) -> None:
        self.model = None


def greedy_agreement(model: GenaiModel, runner, prompts: np.ndarray, max_new_tokens: int,
                     stop_ids: Sequence[int] = ()) -> dict:
    """og.Generator greedy on ``prompts`` (rows of equal length, run two at a time: batch 2) against ``runner``'s own
    greedy decode (``Runner.generate``, one row at a time); token-exact agreement per row, and where the first row
    that differs first differs."""
    prompts = np.asarray(prompts, dtype=np.int64)
    want = [runner.generate(row.tolist(), max_new_tokens, SamplingConfig(), stop_ids=stop_ids) for row in prompts]
    got: list[list[int]] = []
    for start in range(0, len(prompts), 2):
        got += model.generate_batch(prompts[start:start + 2].tolist(), max_new_tokens)
    mismatch = None
    for row, (a, b) in enumerate(zip(got, want)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            mismatch = {"row": row, "new_token": at}
            break
    equal = sum(a == b for a, b in zip(got, want))
    return {"prompts": int(len(prompts)), "prompt_tokens": int(prompts.shape[1]), "new_tokens": int(max_new_tokens),
            "batch": 2 if len(prompts) > 1 else 1, "tokens_compared": int(sum(len(b) for b in want)),
            "rows_equal": int(equal), "first_mismatch": mismatch, "passed": equal == len(prompts)}


__all__ = ["GenaiMissing", "GenaiModel", "INSTALL", "available", "greedy_agreement", "import_genai"]
