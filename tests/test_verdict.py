"""No vacuous pass: one verdict function counts parity rows; informational rows never count as passed; a run that
gated nothing has not passed; INT8 step graphs are gated by ``gamexport parity``; rows scored on the calibration
text say so and are not gated."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from gamexport.parity import CALIBRATION_TEXT, Verdict, verdict

DEMO = Path(__file__).resolve().parents[1] / "gamexport" / "demo"


def _row(precision="fp32", gated=True, passed=True, **extra):
    return {"runtime": "onnxruntime-cpu", "precision": precision, "graph": "prefill", "input": "random",
            "reference": "eager-fp32", "gated": gated, "passed": passed, **extra}


def test_verdict_counts_gated_and_informational_apart():
    int8_tol = {"ppl_rel": 0.02}
    rows = ([_row() for _ in range(12)] + [_row("int8", gated=False, tolerances=int8_tol) for _ in range(4)])
    v = verdict(rows, precisions=("fp32", "int8"))
    assert (v.gated_passed, v.gated_failed, v.informational, v.passed) == (12, 0, 4, True)
    assert v.headline() == "12 gated passed, 4 informational; no gated check of int8"
    assert v.ungated == (("int8", "informational only (gate needs held-out text)"),)
    failing = rows + [_row(passed=False), _row(passed=False)]
    v = verdict(failing, precisions=("fp32",))
    assert (v.gated_passed, v.gated_failed, v.passed) == (12, 2, False)
    assert v.headline() == "2 of 14 gated failed, 4 informational"
    assert Verdict.from_counts(json.loads(json.dumps(v.counts()))) == v  # report.json round trip


def test_a_run_with_no_gated_row_has_not_passed():
    only_info = [_row("int8", gated=False, tolerances={"ppl_rel": 0.02}) for _ in range(3)]
    skipped = [{"runtime": "onnxruntime-cpu", "precision": "bf16", "reason": "no bf16 kernels; more"}]
    v = verdict(only_info, skipped, ("int8", "bf16"))
    assert not v.passed and v.gated == 0
    assert v.nothing_checked() == ("nothing was checked: int8: informational only (gate needs held-out text); "
                                   "bf16: not run on onnxruntime-cpu (no bf16 kernels); every one of the 3 rows is "
                                   "informational")
    assert not verdict([]).passed


def test_report_headline_never_counts_informational_rows(tiny_build):
    """report.md and report.json count from the same verdict, and informational rows are never passes: the tiny
    build's counts match its rows, and the same report with two rows made informational (as rows without a gate
    are) is re-counted and re-rendered with them apart."""
    from gamexport.report import render_markdown

    from gamexport.report import checked_rows

    report = json.loads((tiny_build / "report.json").read_text())
    counts = report["parity_counts"]
    rows = checked_rows(report)   # the parity rows and the onnxruntime-genai bundles' greedy checks
    info = sum(not r.get("gated", True) for r in rows)
    assert counts["informational"] == info and counts["gated_failed"] == 0
    assert counts["gated_passed"] == len(rows) - info
    md = (tiny_build / "report.md").read_text()
    assert f"parity: {counts['gated_passed']} gated passed, {info} informational" in md

    for row in report["parity"][:2]:
        row["gated"] = False
    report.pop("parity_counts")
    n_info = sum(not r.get("gated", True) for r in checked_rows(report))
    assert n_info >= 2
    md = render_markdown(report)
    assert f"parity: {len(checked_rows(report)) - n_info} gated passed, {n_info} informational" in md


# ---- builds with real text ------------------------------------------------------------------------------------
def _text_build(tmp: Path, cfg, rows: int, precisions=("fp32", "int8")) -> Path:
    """A tiny INT8 build (vocabulary 300, for a byte-level tokenizer) from a checkpoint with a tokenizer and
    held-out text of ``rows`` rows of P tokens (and a few tokens more)."""
    from gamexport.checkpoint import save_checkpoint
    from gamexport.pipeline import BuildOptions, build
    from gamexport.model import build_model, state_dict_numpy
    from gamexport.tokenizer import Tokenizer
    from gamexport.training.tokenizer import save_tokenizer, train_tokenizer

    cfg = dataclasses.replace(cfg, vocab_size=300)
    text = (DEMO / "heldout.txt").read_text(encoding="utf-8")
    src = tmp / "ckpt"
    save_checkpoint(src, cfg, state_dict_numpy(build_model(cfg, seed=0)), meta={"trained": False})
    save_tokenizer(train_tokenizer(text[:20_000].splitlines(), vocab_size=cfg.vocab_size), src / "tokenizer.json")
    tok, held = Tokenizer.from_file(src / "tokenizer.json"), text[20_000:]
    words = held.split(" ")
    n = next(i for i in range(1, len(words)) if len(tok.encode(" ".join(words[:i]))) >= rows * cfg.max_positions + 8)
    (src / "heldout.txt").write_text(" ".join(words[:n]), encoding="utf-8")
    out = tmp / "build"
    build(BuildOptions(source=str(src), out=out, threads=1, latency=False, precisions=precisions))
    return out


@pytest.fixture(scope="module")
def text_build(tmp_path_factory, tiny_cfg) -> Path:
    return _text_build(tmp_path_factory.mktemp("text"), tiny_cfg, 4)


def test_recheck_gates_int8_step_graphs(text_build, monkeypatch):
    """A step graph that computes wrong (planted through the runner) fails ``gamexport parity``: the INT8 step
    graph is gated on the held-out text, as in the build, while its prefill rows still pass."""
    from gamexport import parity
    from gamexport import targets
    from gamexport.pipeline.recheck import recheck

    # Untrained weights on 32 tokens move perplexity by a few %: the test is of the gating, not of the 2 % value.
    monkeypatch.setitem(parity.TOLERANCES, "int8", dataclasses.replace(parity.TOLERANCES["int8"], ppl_rel=0.5))
    clean = recheck(text_build, precisions=("int8",))
    gated = {(r["graph"], r["input"]) for r in clean["parity"] if r["gated"]}
    # The text rows carry the perplexity gate (prefill, and the step graph fed in chunks); the other rows are gated
    # on the streaming state and the INT8 plan emulation.
    assert clean["passed"] and {("prefill", "text"), ("step", "text")} <= gated

    opened = targets.open_runner

    def broken_step(*args, **kwargs):
        runner = opened(*args, **kwargs)
        step = runner.step

        def wrong(ids, pos, state):
            logits, new_state = step(ids, pos, state)
            wrong_logits = logits.copy()
            wrong_logits[..., 5] += 30.0  # every position now predicts id 5
            return wrong_logits, new_state

        runner.step = wrong
        return runner

    monkeypatch.setattr(targets, "open_runner", broken_step)
    result = recheck(text_build, precisions=("int8",))
    failed = [(r["graph"], r["input"]) for r in result["parity"] if r["gated"] and not r["passed"]]
    assert not result["passed"] and ("step", "text") in failed and all(g == "step" for g, _ in failed)
    assert result["parity_counts"]["gated_failed"] == len(failed)


def test_int8_rows_scored_on_calibration_text_are_not_gated(tmp_path, tiny_cfg, monkeypatch):
    """Held-out text of one row is also the calibration text: the INT8 rows on it say so and are informational,
    calibration.json says so, and the saved reference is labelled so that ``gamexport parity`` does not gate it.
    Dynamic INT8 (not calibrated) stays gated on that text."""
    from gamexport import parity
    from gamexport.pipeline.recheck import recheck

    for p in ("int8", "int8-dyn"):  # untrained weights: the test is of the gating, not of the 2 % value
        monkeypatch.setitem(parity.TOLERANCES, p, dataclasses.replace(parity.TOLERANCES[p], ppl_rel=0.5))
    out = _text_build(tmp_path, tiny_cfg, 1, ("fp32", "int8", "int8-dyn"))
    report = json.loads((out / "report.json").read_text())
    text = [r for r in report["parity"] if r["precision"].startswith("int8") and "ppl_rel_change" in r]
    int8 = [r for r in text if r["precision"] == "int8"]
    assert int8 and all(r["input"] == CALIBRATION_TEXT and not r["gated"] for r in int8)
    assert all("scored on its own calibration text" in r["note"] for r in int8)
    assert all(r["input"] == "text" and r["gated"] for r in text if r["precision"] == "int8-dyn")
    assert "info (scored on its own calibration text)" in (out / "report.md").read_text()
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["rows"] == 1 and "scored on this calibration text" in calibration["source"]
    assert CALIBRATION_TEXT in json.loads((out / "parity" / "feeds.json").read_text())["prefill"]
    result = recheck(out, precisions=("int8",))
    assert not any(r["gated"] for r in result["parity"] if r["input"] == CALIBRATION_TEXT)
    assert all("scored on its own calibration text" in r["note"] for r in result["parity"]
               if r["input"] == CALIBRATION_TEXT)
    result = recheck(out, precisions=("int8-dyn",))
    assert {(r["graph"], r["input"]) for r in result["parity"] if r["gated"]} >= {("prefill", CALIBRATION_TEXT),
                                                                                 ("step", CALIBRATION_TEXT)}
