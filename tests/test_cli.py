"""The gamexport command end to end, as a user runs it: build, generate, inspect (bad input: test_bad_input.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GAMEXPORT = [sys.executable, "-m", "gamexport.cli.main"]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "GAMEXPORT_DEBUG": "", **(env or {})}
    return subprocess.run([*GAMEXPORT, *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "build"
    proc = run_cli("build", "--preset", "tiny", "--out", str(out), "--threads", "1",
                   "--precision", "fp32,fp16,bf16,int8,int8-dyn")
    assert proc.returncode == 0, proc.stderr
    import re
    m = re.search(r"parity: (\d+) gated passed, (\d+) informational", proc.stdout)
    assert m and int(m.group(1)) > 0 and "failed" not in m.group(0), proc.stdout
    assert "[8/8]" in proc.stderr  # progress is shown
    return out


def test_build_writes_every_artifact(cli_build):
    names = {p.name for p in cli_build.iterdir()}
    assert {"model.onnx", "step.onnx", "model.inlined.onnx", "step.inlined.onnx", "config.json", "report.json",
            "report.md", "manifest.json", "latency.png", "model.fp16.onnx", "step.fp16.onnx", "model.bf16.onnx",
            "step.bf16.onnx", "model.bf16.inlined.onnx", "model.int8.onnx", "step.int8.onnx", "model.int8-dyn.onnx",
            "calibration.json"} <= names
    report = json.loads((cli_build / "report.json").read_text())
    assert report["passed"] and report["source"]["trained"] is False
    assert any(r["reference"] == "float64-numpy" and r["passed"] for r in report["parity"])
    modes = {(r["runtime"], r["mode"]) for r in report["latency"]}
    assert modes == {("eager", "prefill"), ("eager", "decode"), ("onnxruntime-cpu", "prefill"),
                     ("onnxruntime-cpu", "decode")}
    assert {r["precision"] for r in report["latency"] if r["runtime"] == "onnxruntime-cpu"} == {
        "fp32", "fp16", "int8", "int8-dyn"}
    manifest = json.loads((cli_build / "manifest.json").read_text())
    files = {p.relative_to(cli_build).as_posix() for p in cli_build.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files - {"manifest.json"}
    assert {"parity/prefill_inputs.json", "parity/step_outputs.json", "model.ort", "step.int8.ort"} <= files
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])


def test_generate_from_build_folder_and_checkpoint_agree(cli_build, tmp_path):
    ort_out = run_cli("generate", str(cli_build), "--ids", "1,2,3", "--max-new-tokens", "12", "--seed", "3")
    assert ort_out.returncode == 0, ort_out.stderr
    assert "onnxruntime-cpu" in ort_out.stderr
    tokens = [int(t) for t in ort_out.stdout.strip().split(",")]
    assert len(tokens) == 12 and all(0 <= t < 97 for t in tokens)
    # The same weights through eager PyTorch give the same tokens for the same seed.
    from gamexport.checkpoint import save_checkpoint
    from gamexport.sources import seeded_checkpoint

    ck = seeded_checkpoint("tiny")
    save_checkpoint(tmp_path, ck.config, ck.weights)
    eager = run_cli("generate", str(tmp_path), "--ids", "1,2,3", "--max-new-tokens", "12", "--seed", "3")
    assert eager.returncode == 0, eager.stderr
    assert "eager" in eager.stderr and eager.stdout == ort_out.stdout


def test_inspect(cli_build):
    proc = run_cli("inspect", str(cli_build / "step.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "gam.CausalConv" in proc.stdout and "input  position_ids: int64 [batch, chunk]" in proc.stdout
    assert "input  past_key_values.1.conv_state: float32 [batch, 2, 32]" in proc.stdout
    assert "output present.1.conv_state: float32 [batch, 2, 32]" in proc.stdout
    assert "state: 2 per-layer tensors [batch, 2, 32], past_key_values.{i}.conv_state -> present.{i}.conv_state" \
        in proc.stdout
    assert "parameters: 27,680" in proc.stdout


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("build", "generate", "inspect"):
        assert command in proc.stdout


def test_build_from_reference_pt_with_prefill_lengths(tmp_path):
    """A reference-format .pt (both tied names, no config.json) builds with every artifact and parity passing."""
    import torch

    from gamexport.config import GAMConfig
    from gamexport.model import build_model

    cfg = GAMConfig(vocab_size=53, d_model=16, n_layers=2, n_slots=8, kernel_size=3, max_positions=24)
    (tmp_path / "ckpt").mkdir()
    torch.save(build_model(cfg, seed=5).state_dict(), tmp_path / "ckpt" / "gam_model.pt")
    out = tmp_path / "out"
    proc = run_cli("build", str(tmp_path / "ckpt"), "--out", str(out), "--prefill-len", "4", "--prefill-len", "24",
                   "-j", "1", "--triton", str(tmp_path / "triton"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "triton" / "gam_step" / "config.pbtxt").is_file()
    assert (tmp_path / "triton" / "gam_prefill" / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["config"]["vocab_size"] == 53 and report["parameters"] == cfg.n_params()
    assert sorted(r["seq_len"] for r in report["latency"]
                  if r["mode"] == "prefill" and r["precision"] == "fp32") == [4, 4, 24, 24]
