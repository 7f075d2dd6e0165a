"""The gamexport command end to end, as a user runs it: build, generate, inspect, and failing cases."""

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
    m = re.search(r"parity: (\d+)/(\d+) checks passed", proc.stdout)
    assert m and m.group(1) == m.group(2), proc.stdout
    assert "[7/7]" in proc.stderr  # progress is shown
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
    from gamexport.engines.pipeline import seeded_checkpoint

    ck = seeded_checkpoint("tiny")
    save_checkpoint(tmp_path, ck.config, ck.weights)
    eager = run_cli("generate", str(tmp_path), "--ids", "1,2,3", "--max-new-tokens", "12", "--seed", "3")
    assert eager.returncode == 0, eager.stderr
    assert "eager" in eager.stderr and eager.stdout == ort_out.stdout


def test_inspect(cli_build):
    proc = run_cli("inspect", str(cli_build / "step.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "gam.CausalConv" in proc.stdout and "input  position_ids: int64 [batch, 1]" in proc.stdout
    assert "parameters: 27,680" in proc.stdout


@pytest.mark.parametrize("args,needle,code", [
    (["build", "does-not-exist.pt"], "does-not-exist.pt does not exist", 2),
    (["build", "--preset", "huge"], "unknown preset 'huge'. Choose one of: paper, small, tiny", 2),
    (["generate", "--ids", "1,x"], "--ids must be comma-separated integers", 2),
    (["generate", "BUILD", "--ids", "5,97"], "token id 97 is outside the vocabulary [0, 97)", 2),
    (["generate", "BUILD", "--prompt", "hello"], "has no tokenizer.json", 2),
    (["inspect", "nowhere"], "nowhere does not exist", 2),
    (["build", "--preset", "tiny", "--engines", "tensorrt"], "TensorRT runs on NVIDIA GPUs only", 2),
    (["build", "--preset", "tiny", "--engines", "tvm"], "unknown engine 'tvm'", 2),
    (["build", "--preset", "tiny", "--precision", "fp8"], "unknown precision 'fp8'", 2),
])
def test_bad_input_is_one_line(cli_build, args, needle, code):
    args = [str(cli_build) if a == "BUILD" else a for a in args]
    proc = run_cli(*args)
    assert proc.returncode == code, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine with no GPU")
def test_asking_for_a_gpu_without_one(tmp_path):
    proc = run_cli("build", "--preset", "tiny", "--device", "cuda", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--device cuda needs an NVIDIA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
    proc = run_cli("build", "--preset", "tiny", "--device", "cuda", "--engines", "tensorrt",
                   "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1


def test_debug_shows_the_traceback():
    proc = run_cli("build", "does-not-exist.pt", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = run_cli("build", "does-not-exist.pt", env={"GAMEXPORT_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_output_path_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    proc = run_cli("build", "--preset", "tiny", "--out", str(target), "--no-latency")
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr
    assert target.read_text() == "keep me"


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
    bad = run_cli("build", str(tmp_path / "ckpt"), "--out", str(out), "--prefill-len", "25")
    assert bad.returncode == 2 and "prefill length 25 is outside 1..24" in bad.stderr and not out.exists()
    proc = run_cli("build", str(tmp_path / "ckpt"), "--out", str(out), "--prefill-len", "4", "--prefill-len", "24",
                   "-j", "1", "--triton", str(tmp_path / "triton"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "triton" / "gam_step" / "config.pbtxt").is_file()
    assert (tmp_path / "triton" / "gam_prefill" / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["config"]["vocab_size"] == 53 and report["parameters"] == cfg.n_params()
    assert sorted(r["seq_len"] for r in report["latency"]
                  if r["mode"] == "prefill" and r["precision"] == "fp32") == [4, 4, 24, 24]
