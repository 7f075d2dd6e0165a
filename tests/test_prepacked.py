"""The step graph pre-packed for the build's machine (``step.prepacked.onnx``): the build writes it and checks it
like every fp32 artifact, ``gamexport generate`` opens it only on the machine it was made for, and the manifest
covers every byte of it. (Its speed is measured by ``gamexport bench``'s start-up section, never here.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from build_copies import refresh_manifest

from gamexport.layout import PREPACKED_DATA, PREPACKED_FILES, PREPACKED_MACHINE, PREPACKED_STEP

GENERATE = [sys.executable, "-m", "gamexport.cli.main", "generate"]


def _generate(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*GENERATE, str(folder), "--ids", "1,2,3", "--max-new-tokens", "8", "--seed", "5",
                           "--threads", "1"], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "GAMEXPORT_DEBUG": ""})


def _made_elsewhere(tiny_build: Path, folder: Path, key: str, value: str) -> Path:
    """A copy of the build whose prepacked graph's sidecar names another ``key`` (the manifest agreeing)."""
    shutil.copytree(tiny_build, folder)
    sidecar = json.loads((folder / PREPACKED_MACHINE).read_text())
    sidecar["valid_for"][key] = value
    (folder / PREPACKED_MACHINE).write_text(json.dumps(sidecar))
    refresh_manifest(folder)   # the manifest agreeing, as a build on that machine would write it
    return folder


def _other_weights(step: Path, folder: Path) -> Path:
    """``folder``/step.onnx: the step graph ``step`` with one LayerNorm's gain changed (the numbers a prepacked
    copy must not hold)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(step))
    for init in model.graph.initializer:
        if init.name == "ln_f.weight":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    folder.mkdir()
    onnx.save(model, str(folder / "step.onnx"))
    return folder / "step.onnx"


def test_the_build_writes_it_lists_it_and_checks_it(tiny_build):
    from gamexport.engines.ort import prepacked_fingerprint

    manifest = json.loads((tiny_build / "manifest.json").read_text())
    assert set(PREPACKED_FILES) <= set(manifest["files"])
    sidecar = json.loads((tiny_build / PREPACKED_MACHINE).read_text())
    assert sidecar["made_from"] == "step.onnx" and sidecar["valid_for"] == prepacked_fingerprint()
    report = json.loads((tiny_build / "report.json").read_text())
    rows = [r for r in report["parity"] if r["artifact"] == PREPACKED_STEP]
    assert {r["graph"] for r in rows} == {"prefill", "step"} and all(r["gated"] and r["passed"] for r in rows)
    assert PREPACKED_STEP not in {g["artifact"] for g in report["graph_checks"]}  # ORT's own graph: run, not read


def test_generate_opens_it_here_and_step_onnx_elsewhere(tiny_build, tmp_path):
    here = _generate(tiny_build)
    assert here.returncode == 0, here.stderr
    assert f", {PREPACKED_STEP}]" in here.stderr

    # made on another machine (another CPU in its sidecar, the manifest agreeing): step.onnx, saying why
    other = _made_elsewhere(tiny_build, tmp_path / "other", "cpu", "another CPU")
    elsewhere = _generate(other)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert f"({PREPACKED_STEP} is not used: it was made for another cpu)]" in elsewhere.stderr

    # another CPU's instruction sets, a data file deleted, a file the manifest does not list: step.onnx, saying why
    isa = _made_elsewhere(tiny_build, tmp_path / "isa", "instruction_sets", ["SSE", "SSE2"])
    assert "made for another instruction sets)]" in _generate(isa).stderr
    gone = tmp_path / "gone"
    shutil.copytree(tiny_build, gone)
    (gone / PREPACKED_DATA).unlink()
    unlisted = tmp_path / "unlisted"
    shutil.copytree(tiny_build, unlisted)
    manifest = json.loads((unlisted / "manifest.json").read_text())
    del manifest["files"][PREPACKED_MACHINE]
    (unlisted / "manifest.json").write_text(json.dumps(manifest))
    for folder, why in ((gone, f"{PREPACKED_DATA} is missing"), (unlisted, f"{PREPACKED_MACHINE} is not in the "
                                                                          "manifest")):
        proc = _generate(folder)
        assert proc.returncode == 0 and f"({PREPACKED_STEP} is not used: {why})]" in proc.stderr, proc.stderr
        assert proc.stdout == here.stdout

    # built with --no-prepacked (the files absent): step.onnx, silently
    plain = tmp_path / "plain"
    shutil.copytree(tiny_build, plain)
    for name in PREPACKED_FILES:
        (plain / name).unlink()
    without = _generate(plain)
    assert without.returncode == 0 and "prepacked" not in without.stderr, without.stderr
    assert here.stdout == elsewhere.stdout == without.stdout and len(here.stdout.split(",")) == 8


@pytest.mark.parametrize("name", [PREPACKED_DATA, PREPACKED_STEP])
def test_a_changed_byte_of_it_is_refused(tiny_build, tmp_path, name):
    folder = tmp_path / "b"
    shutil.copytree(tiny_build, folder)
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    proc = _generate(folder)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert name in proc.stderr.strip().splitlines()[-1]


def test_the_build_fails_a_prepacked_copy_of_other_weights(tiny_build, tmp_path, monkeypatch):
    """The bug the parity rows exist for: the prepacked file holding other numbers than step.onnx (here packed
    from the step graph with one LayerNorm's gain changed)."""
    from gamexport import engines
    from gamexport.errors import ParityError
    from gamexport.pipeline import BuildOptions, build

    real = engines.ort.write_prepacked

    def packs_other_weights(src: Path, out_dir: Path, threads=None):
        return real(_other_weights(src, tmp_path / "planted"), out_dir, threads)

    monkeypatch.setattr(engines.ort, "write_prepacked", packs_other_weights)
    src = json.loads((tiny_build / "config.json").read_text())["source"]["path"]
    with pytest.raises(ParityError):
        build(BuildOptions(source=src, out=tmp_path / "out", threads=1, latency=False))
    report = json.loads((tmp_path / "out.failed" / "report.json").read_text())
    failed = {r["artifact"] for r in report["parity"] if not r["passed"]}
    assert failed == {PREPACKED_STEP}


def test_parity_dir_rechecks_what_generate_opens_here(tiny_build, tmp_path):
    """``gamexport parity DIR`` runs the prepacked step graph where generate would open it, and only there."""
    from gamexport.engines.ort import write_prepacked
    from gamexport.pipeline.recheck import recheck

    said: list[str] = []
    report = recheck(tiny_build, precisions=("fp32",), threads=1, progress=said.append, genai=False)
    mine = [r for r in report["parity"] if r["artifact"] == PREPACKED_STEP]
    assert {r["graph"] for r in mine} == {"prefill", "step"} and all(r["passed"] for r in mine) and report["passed"]

    forged = tmp_path / "forged"   # its prepacked files packed from other weights, the manifest agreeing
    shutil.copytree(tiny_build, forged)
    planted = _other_weights(forged / "step.onnx", tmp_path / "planted")
    write_prepacked(planted, planted.parent, 1)
    for name in PREPACKED_FILES:
        shutil.copyfile(planted.parent / name, forged / name)
    refresh_manifest(forged)
    report = recheck(forged, precisions=("fp32",), threads=1, genai=False)
    assert not report["passed"]
    assert {r["artifact"] for r in report["parity"] if not r["passed"]} == {PREPACKED_STEP}

    other = _made_elsewhere(tiny_build, tmp_path / "other", "onnxruntime", "0.0.1")
    said.clear()
    report = recheck(other, precisions=("fp32",), threads=1, progress=said.append, genai=False)
    assert report["passed"] and not any(r["artifact"] == PREPACKED_STEP for r in report["parity"])
    assert any("made for another onnxruntime" in line and "not checked" in line for line in said)
    assert any("made for another onnxruntime" in s["reason"] for s in report["skipped"])   # and the report says so
