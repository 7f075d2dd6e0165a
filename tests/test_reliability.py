"""Guarantees under attack: interrupts at every build stage, concurrent builds into one folder, verified folders.

Bad input of every kind (corrupt files, untrusted ONNX external data, full disks, …): test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gamexport.pipeline import STAGES

GAMEXPORT = [sys.executable, "-m", "gamexport.cli.main"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*GAMEXPORT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GAMEXPORT_DEBUG": "", **(env or {})})


def test_verify_accepts_an_untouched_build(tiny_build, tmp_path):
    """(What verify refuses, and the runners' manifest check: test_bad_input.py.)"""
    folder = tmp_path / "b"
    shutil.copytree(tiny_build, folder)
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    ok = _cli("verify", str(folder))
    assert ok.returncode == 0, ok.stderr
    assert f"verified: {len(listed)} files in {folder} match manifest.json" in ok.stdout


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _start_paused_build(out: Path, stage: str, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "GAMEXPORT_TEST_PAUSE_AT": stage, "GAMEXPORT_TEST_PAUSE_FILE": str(marker)}
    # SIGINT, SIGTERM and SIGHUP at their defaults in the child: a test run started in the background (`pytest &`
    # without job control) inherits SIGINT ignored, one started under `nohup` SIGHUP ignored, and the command
    # rightly leaves an inherited ignored signal alone (Python installs no KeyboardInterrupt handler for SIGINT,
    # gamexport none for SIGHUP), so the signal could not be tested: the build would wait out its pause.
    proc = subprocess.Popen([*GAMEXPORT, "build", "--preset", "tiny", "--out", str(out), "--threads", "1",
                             "--no-latency"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("stage", STAGES)
def test_ctrl_c_at_every_stage_leaves_previous_output_and_says_so(tiny_build, tmp_path, stage):
    """SIGINT while the build waits at each stage (test pause hook): exit 130, one line, DIR byte-identical,
    nothing beside it: no staging folder, no lock file. (SIGKILL at every stage: test_build.py.)"""
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
    assert beside == set(), beside  # the staging folder and the lock file went on the way out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("stage", ["export", "parity"])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tiny_build, tmp_path, stage, sig):
    """A build stopped by SIGTERM (a service manager, `kill`) or SIGHUP (its terminal closed) cleans up as Ctrl-C
    does: DIR byte-identical, no staging folder (the build's 27 MB), no lock file; exit 128 + the signal."""
    out = tmp_path / "out"
    shutil.copytree(tiny_build, out)
    before = sorted((p.relative_to(out).as_posix(), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    proc = _start_paused_build(out, stage, tmp_path / "paused")
    assert list(tmp_path.glob(".out.staging-*")) and (tmp_path / ".out.lock").exists()  # what must go
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert err.splitlines()[-1] == "interrupted: nothing was changed in the output folder" and "Traceback" not in err
    after = sorted((p.relative_to(out).as_posix(), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    assert after == before
    assert {p.name for p in tmp_path.iterdir()} == {"out", "paused"}


def test_a_waiter_never_trusts_a_lock_file_deleted_under_it(tmp_path):
    """Why deleting the build's lock file is safe (fsutil.removable_lock): a process that waited on the old
    file and gets its lock after the holder deleted it checks that the locked file is still the one at the path;
    it is not, so it locks the new file there instead of running beside that file's holder."""
    import fcntl
    import threading

    from gamexport.fsutil import removable_lock

    path = tmp_path / ".out.lock"
    old = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(old, fcntl.LOCK_EX)                       # the first holder
    waiting, inside = threading.Event(), threading.Event()

    def second():
        with removable_lock(path, busy=waiting.set):
            inside.set()

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    assert waiting.wait(30)                               # the second opened the old file and waits on it
    os.unlink(path)                                       # the first deletes its file while it holds it ...
    new = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    fcntl.flock(new, fcntl.LOCK_EX)                       # ... a third creates a new one and holds it ...
    os.close(old)                                         # ... and the first lets go of the old one
    assert not inside.wait(0.5), "the second ran beside the third, on the lock of a deleted file"
    os.close(new)                                         # the third lets go: now the second may run
    assert inside.wait(30)
    thread.join(30)
    assert not path.exists()                              # and it deleted the lock file when done


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
