"""The build's check of its onnxruntime-genai bundles through the real client (part of the parity stage).

For each bundle: og.Generator greedy on held-out prompts (random ids where the model has no text), two
equal-length prompts per batch, against gamexport's own greedy decode of the same step graph: token-exact agreement
per row. The entries go into report.json as ``genai`` and count in the parity verdict like the parity rows (gated
unless the precision's activation scales are taken per call). Skipped, with the reason, when the build wrote no
bundle or onnxruntime-genai is not installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gamexport.layout import genai_dir
from gamexport.parity.references import held_out

#: Prompts compared, their length, and the tokens generated after each (bounded by the model's positions).
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 16, 32


def build_text(b) -> np.ndarray | None:
    """The build's prompt text: the held-out rows the INT8 gate scores (or its text where none is held out)."""
    return b.eval_ids if held_out(b.text_ids) else b.text_ids


def prompt_ids(cfg, text: np.ndarray | None, end_ids=frozenset()) -> tuple[np.ndarray, str]:
    """(ids [≤ PROMPTS, T], what they are): the first rows of ``text`` (token ids, [rows, tokens]) cut to T tokens,
    without those whose last token is one of ``end_ids`` (:data:`END_ID_LAST`), where at least two remain; else
    seeded random ids, drawn without the end ids."""
    T = min(PROMPT_TOKENS, cfg.max_positions // 2)
    ends = np.asarray(sorted(end_ids), dtype=np.int64)
    if text is not None:
        text = np.asarray(text, dtype=np.int64)[:, :T]
        text = text[~np.isin(text[:, -1], ends)]
        if len(text) >= 2:
            return text[:PROMPTS], "held-out text"
    rng = np.random.default_rng(11)
    ids = rng.integers(0, cfg.vocab_size, size=(PROMPTS, T), dtype=np.int64)
    spare = np.setdiff1d(np.arange(cfg.vocab_size), ends)
    return np.where(np.isin(ids, ends), spare[ids % len(spare)], ids), "random ids"


#: Why a prompt must not end in the bundle's end id: onnxruntime-genai, in a batch of two or more, reads a trailing
#: pad id as padding (gamexport's bundles use the end id as pad id: one must be a real id), and its continuation
#: then differs from gamexport's — measured on a tiny model trained a few steps (og 0.18, batch 2): 0 of 16 prompts
#: ending in the end id agreed, 16 of 16 with it at positions 0, 5, 12, 20 or 22 of 24, 16 of 16 without it.
END_ID_LAST = "a prompt ending in the end id is read by onnxruntime-genai as padded in a batch"


def _skipped(precision: str, why: str) -> dict:
    return {"bundle": genai_dir(precision), "precision": precision, "skipped": why}


def genai_parity(b) -> list[dict]:
    """The ``genai`` entries of report.json for build ``b``: one per bundle it wrote, each bundle's step graph
    through og.Generator against gamexport's own greedy decode of the same graph (the build's runner of that
    precision on ONNX Runtime's CPU provider). Gated (counted in the verdict) unless the precision takes its
    activation scales per call (int8-dyn: og's batch of two quantizes both rows together, gamexport one row at a
    time, so a near tie may fall either way); a skipped entry says why (no bundle, or no onnxruntime-genai)."""
    from gamexport.genai_client import INSTALL, available
    from gamexport.layout import PRECISION_TABLE

    bundled = [p for p in PRECISION_TABLE if p in b.precisions and genai_dir(p) in b.bundles]
    if not bundled:
        return [_skipped("fp32", "the build wrote no onnxruntime-genai bundle (see its bundle stage)")]
    if not available():
        b.progress(f"genai: parity skipped: onnxruntime-genai is not installed ({INSTALL})")
        return [_skipped(p, f"onnxruntime-genai is not installed: {INSTALL}") for p in bundled]
    return [_bundle_parity(b, p) for p in bundled]


def _reference_runner(b, precision: str):
    """The build's own ONNX Runtime CPU runner of ``precision`` (opened for parity), or a new one (closed by the
    caller when it is not one of the build's)."""
    from gamexport.targets import BASELINE, open_runner

    runtime = BASELINE[0]   # ONNX Runtime's CPU provider: what onnxruntime-genai's CPU package runs
    for runner in b.runners:   # the build's timed runners (its structural runs are closed already)
        if (runner.runtime, runner.precision) == (runtime, precision):
            return runner
    return open_runner(runtime, precision, b.staging, b.cfg, b.options)


def _bundle_parity(b, precision: str) -> dict:
    runner = _reference_runner(b, precision)
    try:
        return bundle_parity(b.staging, precision, runner, build_text(b), b.progress)
    finally:
        if all(runner is not kept for kept in b.runners):
            runner.close()


def bundle_parity(folder: Path, precision: str, runner, text: np.ndarray | None, progress) -> dict:
    """The ``genai`` entry of one bundle of ``folder``: og.Generator greedy on :func:`prompt_ids` of ``text``
    against ``runner``'s greedy decode (gamexport's, ONNX Runtime CPU, the same ``precision``); prompts ending in
    the bundle's end id are left out (:data:`END_ID_LAST`)."""
    from importlib.metadata import version

    from gamexport.genai_client import GenaiModel, greedy_agreement
    from gamexport.layout import precision as record

    bundle = genai_dir(precision)
    model = GenaiModel(Path(folder) / bundle)
    try:   # both stop at the bundle's end id: the tokenizer's eos, or 0 without a tokenizer (bundles.genai)
        ids, source = prompt_ids(runner.config, text, model.eos_ids)
        new_tokens = min(NEW_TOKENS, runner.config.max_positions - ids.shape[1])
        result = greedy_agreement(model, runner, ids, new_tokens, sorted(model.eos_ids))
    finally:
        model.close()
    gated = not record(precision).runtime_scales
    result = {"bundle": bundle, "precision": precision, "runtime": "onnxruntime-genai",
              "client": f"onnxruntime-genai {version('onnxruntime-genai')}", "input": source,
              "reference": f"gamexport greedy decode, onnxruntime-cpu {precision}", "gated": gated, **result}
    if not gated:
        result["note"] = (f"{precision} takes its activation scales per call: og's batch of two quantizes both rows "
                          "together, gamexport's decode one row at a time")
    tag = "" if gated else " (informational)"
    if result["passed"]:
        progress(f"genai: {bundle}/ og.Generator greedy equals gamexport's greedy decode on {result['prompts']} "
                 f"{source} prompts (batch 2, {result['tokens_compared']} tokens){tag}")
    else:
        where = result["first_mismatch"]
        progress(f"genai: {bundle}/ og.Generator greedy DIFFERS from gamexport's greedy decode: "
                 f"{result['rows_equal']}/{result['prompts']} rows equal, first at row {where['row']}, new token "
                 f"{where['new_token']}{tag}")
    return result


class BundleCheck:
    """The ``genai`` entries of ``gamexport parity DIR`` (``entries``), one per precision ``run`` is called with:
    its bundle — when the folder's manifest lists one — checked against the manifest before og opens it (its
    genai_config.json names the files og reads), then run as the build runs it against ``runner`` (the ONNX
    Runtime CPU runner of that precision). Skipped entries say why: no bundle, or no onnxruntime-genai."""

    def __init__(self, folder: Path, text: np.ndarray | None, progress):
        """``text``: held-out token ids the folder keeps (``DIR/parity/`` holds one row: it is cut into windows of
        PROMPT_TOKENS, and those ending in the bundle's end id are left out when run), or None for seeded random
        ids."""
        from gamexport.manifest import read_manifest

        if text is not None:
            flat = np.asarray(text, dtype=np.int64).reshape(-1)
            rows = flat.size // PROMPT_TOKENS
            text = flat[: rows * PROMPT_TOKENS].reshape(rows, PROMPT_TOKENS) if rows >= 2 else None
        self.folder, self.text, self.progress = Path(folder), text, progress
        self.listed = read_manifest(folder)["files"]
        self.entries: list[dict] = []

    def run(self, precision: str, runner) -> None:
        from gamexport.genai_client import INSTALL, available
        from gamexport.manifest import verify

        bundle = genai_dir(precision)
        names = [n for n in self.listed if n.startswith(f"{bundle}/")]
        if not names:
            self.entries.append(_skipped(precision, "the folder has no such bundle"))
        elif not available():
            self.entries.append(_skipped(precision, f"onnxruntime-genai is not installed: {INSTALL}"))
        else:
            verify(self.folder, names)
            self.progress(f"parity: onnxruntime-genai {precision}")
            self.entries.append(bundle_parity(self.folder, precision, runner, self.text, self.progress))
