"""``gamexport parity``: a build folder re-checked without torch, and by Polygraphy, against its references."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

@pytest.fixture
def parity_cli(blocker):
    return lambda folder, *args: _parity(blocker, folder, *args)


def _parity(blocker, folder: Path, *args: str, block_torch: bool = True) -> subprocess.CompletedProcess:
    code = (blocker({"torch"}) if block_torch else "") + textwrap.dedent(f"""
        import sys
        sys.argv = ['gamexport', 'parity', {str(folder)!r}, *{list(args)!r}]
        from gamexport.cli.main import main
        try:
            main()
        finally:
            assert 'torch' not in sys.modules or not {block_torch!r}
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_parity_recheck_without_torch(tiny_build, tmp_path, parity_cli):
    report = tmp_path / "r.json"
    proc = parity_cli(tiny_build, "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    assert result["passed"]
    checked = {(r["precision"], r["graph"]) for r in result["parity"]}
    assert {("fp32", "prefill"), ("fp32", "step"), ("fp16", "prefill"), ("int8", "step"),
            ("int8-dyn", "prefill")} <= checked
    assert any(r.get("precision") == "bf16" for r in result["skipped"])
    fp32 = [r for r in result["parity"] if r["precision"] == "fp32"]
    assert all(r["max_abs_diff"] < 1e-4 and r["state_max_abs_diff"] < 1e-4 for r in fp32)


def test_parity_fails_when_the_reference_disagrees(tiny_build, tmp_path, parity_cli):
    """Change one reference logit: the re-check must fail (exit 1) — after the manifest is updated to match."""
    from gamexport.fsutil import sha256_file
    from gamexport.polyjson import load_run_results, save_run_results

    folder = tmp_path / "b"
    shutil.copytree(tiny_build, folder)
    path = folder / "parity" / "prefill_outputs.json"
    outs = load_run_results(path)
    outs[0]["logits"] = outs[0]["logits"] + np.float32(0.5)  # a constant shift keeps KL 0 but not max abs
    outs[0]["logits"][0, 3, 7] += 5.0
    save_run_results(path, "eager-fp32", outs)
    # Unchanged manifest: refused as corrupt before anything runs.
    proc = parity_cli(folder, "--precision", "fp32", "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "does not match its manifest" in proc.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["parity/prefill_outputs.json"] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    proc = parity_cli(folder, "--precision", "fp32", "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 1, proc.stderr
    assert "FAIL" in proc.stdout
    # The last line names the failed rows and what to do, formatted as a failed build's (one function).
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: \d+ of \d+ gated parity checks failed \(first: onnxruntime\S* fp32 prefill on '\w+': "
                        r"[^)]*max_abs[^)]*\)\. Read \S*r\.json for the measured differences; .*", last), last


def test_polygraphy_verifies_the_same_claim(tiny_build):
    polygraphy = Path(sys.executable).parent / "polygraphy"
    if not polygraphy.exists():
        pytest.skip("polygraphy is not installed (pip install 'gamexport[dev]')")
    for graph in ("prefill", "step"):
        onnx_file = "model.onnx" if graph == "prefill" else "step.onnx"
        proc = subprocess.run([str(polygraphy), "run", onnx_file, "--onnxrt",
                               "--load-inputs", f"parity/{graph}_inputs.json",
                               "--load-outputs", f"parity/{graph}_outputs.json", "--atol", "1e-4", "--rtol", "1e-3"],
                              cwd=tiny_build, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "PASSED" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr
