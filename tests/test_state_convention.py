"""The ecosystem's state convention at the graph boundary (issue 14, item 1): per-layer
``past_key_values.{i}.conv_state`` → ``present.{i}.conv_state`` and ``position_ids`` [B, T], packed back into the
Runner API's (B, L, k-1, d) state; a build folder of the packed format (1) is refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from gamexport.config import LEGACY_REFUSAL
from gamexport.errors import GamexportError, InputError

from build_copies import legacy_graph, refresh_manifest


@pytest.fixture(scope="module")
def ort_tiny(tiny_build):
    from gamexport.engines.ort import OrtRunner

    with OrtRunner.from_folder(tiny_build, threads=1) as runner:
        yield runner


def test_streaming_decode_through_onnxruntime_equals_eager(ort_tiny, eager_tiny, tiny_cfg):
    """Two rows at different positions, a prompt chunk then token-by-token decode and odd chunks, every position
    passed explicitly as [B, T]: ONNX Runtime's step graph matches eager PyTorch in logits and state."""
    rng = np.random.default_rng(11)
    ids = rng.integers(0, tiny_cfg.vocab_size, size=(2, 40))
    starts = np.array([0, 9])                                        # row 1 is 9 tokens further on
    rows = np.stack([ids[0, :31], ids[1, 9:40]])
    _, state_e = eager_tiny.prefill(ids[1:, :9])                      # row 1's state after its first 9 tokens
    state_e = np.concatenate([eager_tiny.empty_state(1), state_e])
    state_o = state_e.copy()
    pos = 0
    for size in (5, 1, 1, 1, 2, 3, 1, 7, 1, 1, 8):
        chunk = rows[:, pos:pos + size]
        positions = starts[:, None] + pos + np.arange(size)[None, :]  # (2, size)
        lo, state_o = ort_tiny.step(chunk, positions, state_o)
        le, state_e = eager_tiny.step(chunk, positions, state_e)
        assert lo.shape == (2, 1, tiny_cfg.vocab_size)                 # the chunk's last position
        np.testing.assert_allclose(lo, le[:, -1:], rtol=0, atol=1e-5)
        np.testing.assert_allclose(state_o, state_e, rtol=0, atol=1e-5)
        pos += size
    assert pos == rows.shape[1]
    # and the whole stream equals one prefill of each row
    np.testing.assert_allclose(state_o[:1], eager_tiny.prefill(ids[:1, :31])[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(state_o[1:], eager_tiny.prefill(ids[1:, :40])[1], rtol=0, atol=1e-5)


def test_first_positions_and_every_position_give_the_same_step(ort_tiny, tiny_cfg):
    ids = np.array([[3, 4, 5]])
    state = ort_tiny.empty_state(1)
    a = ort_tiny.step(ids, [[6]], state)[0]
    b = ort_tiny.step(ids, np.array([[6, 7, 8]]), state)[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("positions,needle", [
    ([[4, 5, 7]], "do not increase by one along the chunk"),
    ([[4, 4, 5]], "do not increase by one along the chunk"),
    ([[4, 5]], r"position ids have shape \(1, 2\), expected \(1, 3\)"),
    ([[62, 63, 64]], "exceed the model's 64 learned positions"),
    ([[-1, 0, 1]], "exceed"),
    ([[0.0, 1.0, 2.0]], "position ids must be integers"),
])
def test_bad_positions_refused_in_one_line(ort_tiny, eager_tiny, positions, needle):
    for runner in (ort_tiny, eager_tiny):
        with pytest.raises(InputError, match=needle) as err:
            runner.step(np.array([[1, 2, 3]]), np.asarray(positions), runner.empty_state(1))
        assert "\n" not in err.value.line()


# ---- a format-1 build folder --------------------------------------------------------------------------------------
@pytest.fixture
def old_folder(tiny_build, tiny_cfg, tmp_path):
    """The tiny build with its fp32 graphs rewritten to the packed format and the manifest rehashed (its
    schema_version kept at 2, so the graphs themselves must be recognised)."""
    from gamexport.layout import PREPACKED_FILES

    folder = tmp_path / "old"
    shutil.copytree(tiny_build, folder)
    for name in PREPACKED_FILES:   # format 1 predates the prepacked step graph
        (folder / name).unlink()
    for name in ("model.onnx", "step.onnx"):
        path = folder / name
        onnx.save(legacy_graph(onnx.load(str(path)), tiny_cfg.n_layers), str(path))
    refresh_manifest(folder)
    return folder


def test_the_planted_old_graph_really_runs(old_folder, tiny_cfg, eager_tiny):
    """The plant is a working format-1 graph (it would run), so the refusal below is about its I/O only."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(old_folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 2, 3, 4]])
    logits, state = sess.run(None, {"input_ids": ids})
    ref_logits, ref_state = eager_tiny.prefill(ids)
    np.testing.assert_allclose(state, ref_state, atol=1e-5, rtol=0)
    assert [i.name for i in ort.InferenceSession(str(old_folder / "step.onnx"),
                                                 providers=["CPUExecutionProvider"]).get_inputs()][-1] == "conv_state"


def _one_line(err: GamexportError, where: str) -> None:
    line = err.line()
    assert "\n" not in line and where in line and LEGACY_REFUSAL in line, line


def test_old_folder_refused_by_every_opener(old_folder, tmp_path):
    from gamexport.bundles.triton import write_model_repository
    from gamexport.engines.ort import OrtRunner
    from gamexport.inspection import describe
    from gamexport.parity.references import load_references

    with pytest.raises(GamexportError) as err:
        OrtRunner.from_folder(old_folder, threads=1)
    _one_line(err.value, "step.onnx")
    with pytest.raises(GamexportError) as err:   # a config given: the session's inputs are still looked at
        OrtRunner(old_folder / "model.onnx", old_folder / "step.onnx", None, 1)
    _one_line(err.value, "step.onnx")
    with pytest.raises(GamexportError) as err:
        load_references(old_folder, ("fp32",))
    _one_line(err.value, "model.onnx")
    with pytest.raises(GamexportError) as err:
        write_model_repository(old_folder, tmp_path / "models")
    assert not (tmp_path / "models").exists()
    _one_line(err.value, "onnx")
    with pytest.raises(GamexportError) as err:
        describe(str(old_folder))
    _one_line(err.value, "model.onnx")


def test_old_manifest_and_engine_sidecar_refused(tiny_build, tmp_path):
    """A format-1 manifest (schema_version 1) and a format-1 TensorRT sidecar: refused before any graph or GPU."""
    from gamexport.engines.trt import read_sidecar, sidecar_path
    from gamexport.manifest import verify

    folder = tmp_path / "old"
    shutil.copytree(tiny_build, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["schema_version"] == 2
    (folder / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    with pytest.raises(GamexportError) as err:
        verify(folder)
    _one_line(err.value, str(folder))
    plan = tmp_path / "step.fp32.plan"
    plan.write_bytes(b"plan")
    sidecar_path(plan).write_text(json.dumps({"schema_version": 1, "graph": "step"}))
    with pytest.raises(GamexportError) as err:
        read_sidecar(plan)
    _one_line(err.value, "step.fp32.plan")


@pytest.mark.parametrize("args", [["generate", "{dir}", "--ids", "1,2"], ["parity", "{dir}"],
                                  ["inspect", "{dir}"]])
def test_cli_refuses_an_old_folder_in_one_line(old_folder, args):
    cmd = [a.replace("{dir}", str(old_folder)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "gamexport.cli.main", *cmd], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "GAMEXPORT_DEBUG": ""})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and LEGACY_REFUSAL in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
