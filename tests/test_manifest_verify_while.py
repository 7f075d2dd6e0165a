"""manifest.verify_while: the cold path's load runs while the manifest check hashes the files, and the check still
decides — a changed file is refused (whatever the load returned is closed), its error wins over the load's own."""

from __future__ import annotations

import json
import threading

import pytest

from gamexport import manifest
from gamexport.fsutil import sha256_file
from gamexport.manifest import ManifestError, verify_while


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "step.onnx").write_bytes(b"graph bytes" * 1000)
    files = {"step.onnx": {"size": (tmp_path / "step.onnx").stat().st_size,
                           "sha256": sha256_file(tmp_path / "step.onnx")}}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))
    return tmp_path


class Loaded:
    closed = False

    def close(self):
        self.closed = True


def test_a_matching_folder_returns_what_was_loaded(folder):
    loaded = Loaded()
    assert verify_while(folder, ["step.onnx"], lambda: loaded) is loaded and not loaded.closed


def test_a_changed_file_is_refused_and_the_loaded_object_closed(folder):
    (folder / "step.onnx").write_bytes(b"graph bytez" * 1000)            # same size, other bytes
    loaded = Loaded()
    with pytest.raises(ManifestError, match=r"step\.onnx does not match its manifest entry"):
        verify_while(folder, ["step.onnx"], lambda: loaded)
    assert loaded.closed


def test_the_manifest_error_wins_over_the_loads_own(folder):
    """ONNX Runtime on a corrupt file raises its own error; the user is told the file changed."""
    (folder / "step.onnx").write_bytes(b"corrupt")

    def load():
        raise RuntimeError("ONNX Runtime cannot parse it")

    with pytest.raises(ManifestError, match="does not match") as caught:
        verify_while(folder, ["step.onnx"], load)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_a_load_error_on_a_matching_folder_is_the_loads(folder):
    def load():
        raise RuntimeError("no such provider")

    with pytest.raises(RuntimeError, match="no such provider"):
        verify_while(folder, ["step.onnx"], load)


def test_the_load_runs_while_the_check_does(folder, monkeypatch):
    """The point of it: the check and the load overlap. The check here waits for the load to have started — run
    one after the other, it would wait in vain."""
    started, overlapped = threading.Event(), []
    real = manifest.verify

    def slow_verify(*args, **kwargs):
        overlapped.append(started.wait(timeout=5))
        return real(*args, **kwargs)

    monkeypatch.setattr(manifest, "verify", slow_verify)
    verify_while(folder, ["step.onnx"], started.set)
    assert overlapped == [True]
