"""The comparison driver behind docs/results.md (training/compare.py), run end to end at smoke size."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from gamexport.training.compare import SMOKE, run_compare, table

pytestmark = pytest.mark.slow           # the module trains, exports and times three models (minutes)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran to the big red house where a dog lived with two birds".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
                                  for _ in range(200)))
    protocol = replace(SMOKE, datasets=(str(corpus),))
    log: list[str] = []
    doc = root / "docs" / "results.md"
    result = run_compare(root / "docs" / "results", root / "runs", protocol, doc=doc, log=log.append)
    return root, protocol, result, doc, log


def test_every_model_and_seed_is_trained_exported_and_timed(smoke):
    root, protocol, result, doc, _ = smoke
    runs = result["runs"]
    assert {(r["model"], r["seed"]) for r in runs} == {(k, s) for k in protocol.kinds for s in protocol.seeds}
    gam = next(r["params"] for r in runs if r["model"] == "gam")
    for r in runs:
        assert abs(r["params"] / gam - 1) <= 0.05                     # sizes matched within ±5 %
        assert r["tokens"] == protocol.max_steps * 4 * 64             # tiny preset: batch 4 × T 64, equal budgets
        assert r["ort_prefill_ms"] > 0 and r["eager_prefill_ms"] > 0 and r["val_ppl"] > 1
        assert (root / "runs" / f"corpus-{r['model']}-seed{r['seed']}" / "model.onnx").is_file()


def test_table_is_mean_and_std_over_seeds(smoke):
    _, protocol, result, _, _ = smoke
    rows = table(result["runs"], protocol)[protocol.datasets[0]]
    assert [row["model"] for row in rows] == list(protocol.kinds)
    for row in rows:
        ppl = [r["val_ppl"] for r in result["runs"] if r["model"] == row["model"]]
        mean = sum(ppl) / len(ppl)
        std = (sum((p - mean) ** 2 for p in ppl) / (len(ppl) - 1)) ** 0.5      # sample std, by hand
        assert row["seeds"] == 2
        assert row["val_ppl_mean"] == pytest.approx(mean) and row["val_ppl_std"] == pytest.approx(std)


def test_report_holds_the_table_plots_and_analyses(smoke):
    root, protocol, result, doc, _ = smoke
    text = doc.read_text()
    for label in ("GAM", "Transformer", "Mamba"):
        assert re.search(rf"^\| {label}( \(busy\))? \| [\d,]+ \| \d+ \| .* ± .* \|$", text, re.M), label
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):           # every linked plot exists
        assert (doc.parent / image).is_file(), image
    assert len(re.findall(r"!\[", text)) == 3
    rf = result["analyses"]["receptive_field"]
    assert rf["gam"]["receptive_field"] == rf["gam"]["expected"] == 1 + 2 * 2     # tiny: 2 layers, kernel 3
    assert rf["transformer"]["receptive_field"] > rf["gam"]["receptive_field"]
    recall = result["analyses"]["recall"]["models"]
    assert set(recall) == {"gam", "transformer"} and all(0 <= m["overall"] <= 1 for m in recall.values())
    # the protocol's recall_sequences is what is scored (each sequence asks at most n_pairs queries)
    sequences, pairs = result["protocol"]["recall_sequences"], result["analyses"]["recall"]["task"]["n_pairs"]
    assert all(0 < sum(m["queries"]) <= sequences * pairs for m in recall.values())
    saved = json.loads((root / "docs" / "results" / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(result["table"]))


def test_a_second_run_reuses_finished_runs(smoke):
    root, protocol, result, doc, _ = smoke
    log: list[str] = []
    again = run_compare(root / "docs" / "results", root / "runs", protocol, doc=doc, log=log.append)
    assert sum("reusing the finished run" in line for line in log) == len(result["runs"])
    assert [r["val_ppl"] for r in again["runs"]] == [r["val_ppl"] for r in result["runs"]]
