"""The build's check of its fp32 onnxruntime-genai bundle through the real client (part of the parity stage).

og.Generator greedy on held-out prompts (random ids where the model has no text), two equal-length prompts per
batch, against gamexport's own greedy decode of the fp32 step graph by the build's baseline runner: token-exact
agreement per row. The result goes into report.json as ``genai`` — informational for now (it is not counted in the
parity verdict; a mismatch is said in the build's progress). Skipped, with the reason, when the build wrote no
fp32 bundle or onnxruntime-genai is not installed.
"""

from __future__ import annotations

import numpy as np

from gamexport.layout import TOKENIZER, genai_dir
from gamexport.parity.references import held_out

#: Prompts compared, their length, and the tokens generated after each (bounded by the model's positions).
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 16, 32


def prompts(b) -> tuple[np.ndarray, str]:
    """(ids [PROMPTS, T], what they are): the held-out rows the INT8 gate scores, or seeded random ids."""
    T = min(PROMPT_TOKENS, b.cfg.max_positions // 2)
    text = b.eval_ids if held_out(b.text_ids) else b.text_ids
    if text is not None:
        return np.asarray(text[:PROMPTS, :T], dtype=np.int64), "held-out text"
    rng = np.random.default_rng(11)
    return rng.integers(0, b.cfg.vocab_size, size=(PROMPTS, T), dtype=np.int64), "random ids"


def genai_parity(b) -> dict:
    """The ``genai`` entry of report.json for build ``b`` (its staging folder, baseline runner and held-out text)."""
    from gamexport.genai_client import INSTALL, GenaiModel, available, greedy_agreement

    bundle = genai_dir("fp32")
    if bundle not in b.bundles:
        return {"bundle": bundle, "skipped": "the build wrote no fp32 onnxruntime-genai bundle (see its bundle stage)"}
    if not available():
        b.progress(f"genai: parity skipped: onnxruntime-genai is not installed ({INSTALL})")
        return {"bundle": bundle, "skipped": f"onnxruntime-genai is not installed: {INSTALL}"}
    from importlib.metadata import version

    from gamexport.tokenizer import Tokenizer

    ids, source = prompts(b)
    new_tokens = min(NEW_TOKENS, b.cfg.max_positions - ids.shape[1])
    tokenizer = Tokenizer.from_file(b.staging / TOKENIZER) if (b.staging / TOKENIZER).is_file() else None
    stops = [tokenizer.eos_id] if tokenizer is not None and tokenizer.eos_id is not None else []
    model = GenaiModel(b.staging / bundle)
    try:
        result = greedy_agreement(model, b.runners[0], ids, new_tokens, stops)
    finally:
        model.close()
    result = {"bundle": bundle, "client": f"onnxruntime-genai {version('onnxruntime-genai')}", "input": source,
              "reference": "gamexport greedy decode, onnxruntime-cpu fp32", "gated": False, **result}
    if result["passed"]:
        b.progress(f"genai: og.Generator greedy equals gamexport's greedy decode on {result['prompts']} {source} "
                   f"prompts (batch 2, {result['tokens_compared']} tokens; informational)")
    else:
        where = result["first_mismatch"]
        b.progress(f"genai: og.Generator greedy DIFFERS from gamexport's greedy decode: {result['rows_equal']}/"
                   f"{result['prompts']} rows equal, first at row {where['row']}, new token {where['new_token']} "
                   "(informational)")
    return result
