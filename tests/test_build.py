"""The build pipeline's guarantees: report schema, determinism, failing parity, and interrupted builds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from gamexport.pipeline import STAGES, BuildOptions, build
from gamexport.errors import ParityError


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_report_matches_its_schema(tiny_build):
    from gamexport.report import schema

    report = json.loads((tiny_build / "report.json").read_text())
    jsonschema.validate(report, schema())
    broken = dict(report, parity=[dict(report["parity"][0], runtime="onnxruntime-gpu")])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema())


def test_report_states_tolerance_beside_each_value(tiny_build):
    report = json.loads((tiny_build / "report.json").read_text())
    for row in report["parity"]:
        assert row["passed"]
        tol = row["tolerances"]
        if not row["gated"]:  # INT8 without real text: informational, and it says why
            assert tol["ppl_rel"] is not None and "ppl_rel_change" not in row
            continue
        if row["max_abs_limit"] is not None:
            assert row["max_abs_diff"] <= row["max_abs_limit"]
        if tol["kl"] is not None:
            assert row["kl_mean"] <= tol["kl"]
        if tol["top1"] is not None:
            assert row["top1_agreement"] >= tol["top1"]
    graphs = {(r["runtime"], r["precision"], r["graph"]) for r in report["parity"]}
    assert {("eager", "fp32", "prefill"), ("eager", "fp32", "step"), ("onnxruntime-cpu", "fp32", "prefill"),
            ("onnxruntime-cpu", "fp32", "step"), ("onnxruntime-cpu", "fp16", "prefill"),
            ("onnxruntime-cpu", "fp16", "step")} <= graphs
    ort_format = {r["artifact"] for r in report["parity"] if r["artifact"].endswith(".ort")}
    assert ort_format == {"model.ort", "step.ort"}  # the ORT-format files run and match too
    assert {"model.int8.ort", "step.int8-dyn.ort"} <= set(report["artifacts"])
    fp16 = [r for r in report["parity"] if r["precision"] == "fp16"]
    assert all(r["compute_precision"] == "fp32" and "fp16 weights, fp32 compute" in r["note"] for r in fp16)
    assert any(r["reference"] == "emulation-fp16-weights" for r in fp16)
    assert any(s.get("precision") == "bf16" and "no bf16 kernels" in s["reason"] for s in report["skipped"])
    assert {g["artifact"] for g in report["graph_checks"]} >= {"model.bf16.onnx", "step.bf16.inlined.onnx"}
    md = (tiny_build / "report.md").read_text()
    assert "float64-numpy" in md and "PASSED" in md


def test_latency_rows_are_measured_against_the_machine_limits(tiny_build, tiny_cfg):
    """Issue 6: the build's report carries the limits under ``machine`` and a fraction on every CPU row.

    FLOPs per token are recounted here from the paper's shapes (per layer h·Mᵀ and softmax·M: 2·2·S·d; gate
    d→2d: 2·2·d²; FFN d→4d→d: 2·8·d²; conv 2·k·d; the head 2·V·d), independently of gamexport/bench/flops.py.
    """
    report = json.loads((tiny_build / "report.json").read_text())
    limits = report["machine"]["limits"]
    assert limits["compute_gflops"] > 0 and limits["bandwidth_gbps"] > 0 and limits["batched_gflops"] > 0
    c = tiny_cfg
    per_layer = 2 * 2 * c.n_slots * c.d_model + 2 * 2 * c.d_model ** 2 + 2 * 8 * c.d_model ** 2 \
        + 2 * c.kernel_size * c.d_model
    per_token = c.n_layers * per_layer + 2 * c.vocab_size * c.d_model
    cpu_rows = [r for r in report["latency"] if r["runtime"] in ("eager", "onnxruntime-cpu")]
    assert cpu_rows and all("fraction" in r for r in cpu_rows)
    for r in cpu_rows:
        assert r["fraction"] == pytest.approx(r["achieved"] / r["limit_value"])
        if r["mode"] == "prefill":
            assert r["limit"] == "compute" and r["limit_value"] == limits["compute_gflops"]
            assert r["achieved"] == pytest.approx(per_token * r["seq_len"] / (r["p50_ms"] / 1e3) / 1e9)
        else:
            assert r["limit"] == "bandwidth-roofline"
            assert r["achieved"] == pytest.approx(1e3 / r["p50_ms"])
            assert r["limit_value"] == pytest.approx(r["bandwidth_gbps"] * 1e9 / r["bytes_per_step"])
    assert "of compute" in (tiny_build / "report.md").read_text()
    # Each limit is the best of several kernels, named; a row above 1.0 of its limit would mark it invalid.
    assert set(limits["best"]) == {"compute", "bandwidth", "batched"} and all(limits["best"].values())
    beaten = [r for r in cpu_rows if r["fraction"] > 1.0]
    assert limits["valid"] == (not beaten) == (limits["invalid"] == [])
    assert all(r["limit_valid"] is False and r["limit_beaten_by"] for r in beaten)


def test_report_names_a_limit_a_row_beat(tiny_build):
    """report.json accepts the invalid-limit fields and report.md says which row beat which limit."""
    from gamexport.report import render_markdown, schema

    report = json.loads((tiny_build / "report.json").read_text())
    row = next(r for r in report["latency"] if r.get("limit") == "compute")
    label = f"{row['runtime']} {row['precision']} prefill B{row['batch']}×{row['seq_len']}"
    row.update(fraction=1.2, limit_valid=False, limit_beaten_by=[label])
    report["machine"]["limits"].update(valid=False, invalid=[{"limit": "compute", "beaten_by": [label]}])
    jsonschema.validate(report, schema())
    md = render_markdown(report)
    assert f"1.20 of compute (limit invalid: beaten by {label})" in md
    assert f"Limit invalid: compute beaten by {label}" in md


def test_onnx_files_are_deterministic(tiny_build, tmp_path):
    other = tmp_path / "again"
    src = json.loads((tiny_build / "config.json").read_text())["source"]["path"]
    build(BuildOptions(source=src, out=other, threads=1, latency=False))
    for name in ("model.onnx", "step.onnx", "model.inlined.onnx", "step.inlined.onnx", "config.json"):
        assert (other / name).read_bytes() == (tiny_build / name).read_bytes(), name


def test_failing_parity_keeps_previous_output(tiny_build, tmp_path, monkeypatch):
    from gamexport import parity

    out = tmp_path / "out"
    shutil.copytree(tiny_build, out)
    before = _snapshot(out)
    monkeypatch.setitem(parity.TOLERANCES, "fp32", parity.Tolerance(max_abs=1e-12, kl=1e-6, top1=1.0, margin=1e-3,
                                                                     reason="test: impossible"))
    src = json.loads((tiny_build / "config.json").read_text())["source"]["path"]
    with pytest.raises(ParityError) as err:
        build(BuildOptions(source=src, out=out, threads=1, latency=False))
    assert "parity checks failed" in err.value.line() and "out.failed" in err.value.line()
    assert _snapshot(out) == before
    failed = json.loads((tmp_path / "out.failed" / "report.json").read_text())
    assert failed["passed"] is False
    assert not list(tmp_path.glob(".out.staging-*"))


@pytest.mark.parametrize("stage", STAGES)
def test_killed_build_leaves_previous_output_intact(tiny_build, tmp_path, stage):
    out = tmp_path / "out"
    shutil.copytree(tiny_build, out)
    before = _snapshot(out)
    marker = tmp_path / "paused"
    env = {**os.environ, "GAMEXPORT_TEST_PAUSE_AT": stage, "GAMEXPORT_TEST_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "gamexport.cli.main", "build", "--preset", "tiny", "--out",
                             str(out), "--threads", "1", "--no-latency"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "build ended before reaching the stage"
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _snapshot(out) == before
    assert (tmp_path / ".out.lock").exists() == (stage != "load")   # a killed build leaves its empty lock file ...
    # ... the next build replaces DIR completely, takes the lock file over and deletes it: nothing stray is left.
    build(BuildOptions(preset="tiny", out=out, threads=1, latency=False))
    assert json.loads((out / "report.json").read_text())["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "paused"]


def test_divergence_is_localised_to_a_block(tiny_build, tiny_cfg, tiny_weights):
    """Per-block comparison (as Polygraphy's per-layer mode): fp32 graphs track eager after every block; the INT8
    graph's residual stream drifts, and the report names the block where the drift grows most."""
    import numpy as np

    from gamexport.checkpoint import Checkpoint
    from gamexport.engines.ort import OrtRunner
    from gamexport.parity.engine import localise_divergence

    ckpt = Checkpoint(config=tiny_cfg, weights=tiny_weights)
    ids = np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, size=(1, 24))
    exact = localise_divergence(ckpt, OrtRunner.from_folder(tiny_build, threads=1), ids)
    assert len(exact["block_rel_errors"]) == tiny_cfg.n_layers and max(exact["block_rel_errors"]) < 1e-5
    quantized = localise_divergence(ckpt, OrtRunner.from_folder(tiny_build, threads=1, precision="int8"), ids)
    assert min(quantized["block_rel_errors"]) > 1e-4
    assert quantized["largest_growth_block"] in {f"blocks.{i}" for i in range(tiny_cfg.n_layers)}
    assert quantized["largest_growth_block"] in quantized["summary"]
