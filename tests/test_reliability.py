"""Guarantees under attack: verified folders, untrusted ONNX files, full disks, interrupts, concurrent builds."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from gamexport.engines.pipeline import STAGES
from gamexport.errors import GraphError, OutputError
from gamexport.fsutil import atomic_write_bytes

GAMEXPORT = [sys.executable, "-m", "gamexport.cli.main"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*GAMEXPORT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GAMEXPORT_DEBUG": "", **(env or {})})


def test_verify_accepts_a_build_and_names_what_changed(tiny_build, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(tiny_build, folder)
    ok = _cli("verify", str(folder))
    assert ok.returncode == 0 and "match manifest.json" in ok.stdout
    (folder / "stray.bin").write_bytes(b"x")
    proc = _cli("verify", str(folder))
    assert proc.returncode == 2 and "stray.bin is not listed in the manifest" in proc.stderr
    (folder / "stray.bin").unlink()
    with open(folder / "parity" / "feeds.json", "ab") as f:
        f.write(b" ")
    proc = _cli("verify", str(folder))
    assert proc.returncode == 2 and "feeds.json does not match its manifest entry" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runners_check_the_manifest_before_loading(tiny_build, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(tiny_build, folder)
    data = bytearray((folder / "step.onnx").read_bytes())
    data[-10] ^= 0xFF
    (folder / "step.onnx").write_bytes(bytes(data))
    proc = _cli("generate", str(folder), "--ids", "1,2")
    assert proc.returncode == 2 and "step.onnx does not match its manifest entry" in proc.stderr


def test_external_data_outside_the_folder_is_refused(tiny_build, tmp_path):
    from gamexport.engines.ort import load_session

    model = onnx.load(str(tiny_build / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if t.name == "ln_f.bias")
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "128")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "evil" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    with pytest.raises(GraphError, match="reads external data from '../../etc/passwd', outside"):
        load_session(path, threads=1)


def test_full_disk_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("previous")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write_bytes(target, b"new content")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _start_paused_build(out: Path, stage: str, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "GAMEXPORT_TEST_PAUSE_AT": stage, "GAMEXPORT_TEST_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen([*GAMEXPORT, "build", "--preset", "tiny", "--out", str(out), "--threads", "1",
                             "--no-latency"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("stage", STAGES)
def test_ctrl_c_at_every_stage_leaves_previous_output_and_says_so(tiny_build, tmp_path, stage):
    """SIGINT while the build waits at each stage (test pause hook): exit 130, one line, DIR byte-identical,
    nothing beside it but the lock file. (SIGKILL at every stage: test_build.py.)"""
    out = tmp_path / "out"
    shutil.copytree(tiny_build, out)
    before = sorted((p.relative_to(out).as_posix(), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    proc = _start_paused_build(out, stage, tmp_path / "paused")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.splitlines()[-1] == "interrupted: nothing was changed in the output folder" and "Traceback" not in err
    after = sorted((p.relative_to(out).as_posix(), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    assert after == before
    beside = {p.name for p in tmp_path.iterdir()} - {"out", "paused"}
    assert beside <= {".out.lock"}, beside  # the staging folder went on the way out


def test_two_builds_into_one_folder_cannot_mix(tmp_path):
    out = tmp_path / "out"
    first = _start_paused_build(out, "parity", tmp_path / "paused")
    try:
        second = _cli("build", "--preset", "tiny", "--out", str(out), "--no-latency")
        assert second.returncode == 2 and "another gamexport build is writing" in second.stderr
    finally:
        first.kill()
        first.wait()
    assert not out.exists()  # the first never finished; nothing partial appeared
    ok = _cli("build", "--preset", "tiny", "--out", str(out), "--no-latency", "-j", "1")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((out / "report.json").read_text())["passed"]
