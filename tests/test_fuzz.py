"""Property-based attacks on the files gamexport reads: checkpoints, config.json, manifest.json, parity JSON
and ONNX graphs.

Whatever the bytes, reading them ends in a result or in one of gamexport's one-line errors — never another
exception, never a crash. ONNX Runtime on mutated graphs runs in a subprocess, with a bounded number of cases.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gamexport.checkpoint import load_checkpoint, save_checkpoint
from gamexport.errors import GamexportError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,  # the same cases in every CI run
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def mutations(draw, size: int):
    """A list of (kind, position, payload) edits: truncate, flip a byte, overwrite a run, insert bytes."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert"]))
        pos = draw(st.integers(0, max(0, size - 1)))
        payload = draw(st.binary(min_size=1, max_size=16))
        edits.append((kind, pos, payload))
    return edits


def mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, pos, payload in edits:
        pos = min(pos, len(buf))
        if kind == "truncate":
            del buf[pos:]
        elif kind == "flip" and pos < len(buf):
            buf[pos] ^= payload[0] or 0xFF
        elif kind == "overwrite":
            buf[pos:pos + len(payload)] = payload
        else:
            buf[pos:pos] = payload
    return bytes(buf)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, tiny_cfg, tiny_weights) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(folder, tiny_cfg, tiny_weights)
    return folder


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_load_or_fail_in_one_line(ckpt_dir, tmp_path_factory, data):
    original = (ckpt_dir / "model.safetensors").read_bytes()
    folder = tmp_path_factory.mktemp("m")
    shutil.copy(ckpt_dir / "config.json", folder)
    # Mutate mostly the header (the first few hundred bytes), where structure lives.
    edits = data.draw(mutations(min(len(original), 600)))
    (folder / "model.safetensors").write_bytes(mutate(original, edits))
    try:
        load_checkpoint(folder)
    except GamexportError as exc:
        assert "\n" not in exc.line() and exc.fix
    # Anything else propagates and fails the test.


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.sampled_from([2**31, 2**63, -(2**63), 10**300, 1e308, 5e-324])
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["vocab_size", "d_model", "n_layers", "n_slots", "kernel_size",
                                                "max_positions", "dropout", "ln_eps", "model_type", "N_EMBED"]),
                               json_values, min_size=1, max_size=3))
def test_mutated_config_loads_or_fails_in_one_line(ckpt_dir, tmp_path_factory, changes):
    folder = tmp_path_factory.mktemp("c")
    shutil.copy(ckpt_dir / "model.safetensors", folder)
    config = json.loads((ckpt_dir / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    try:
        ckpt = load_checkpoint(folder)
    except GamexportError as exc:
        assert "\n" not in exc.line()
    else:  # accepted: then it must still describe these weights
        assert ckpt.config.d_model == 32 and ckpt.config.n_layers == 2


@FUZZ
@given(raw=st.binary(max_size=64))
def test_config_json_that_is_not_json(ckpt_dir, tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("j")
    shutil.copy(ckpt_dir / "model.safetensors", folder)
    (folder / "config.json").write_bytes(raw)
    try:
        load_checkpoint(folder)
    except GamexportError as exc:
        assert "\n" not in exc.line()


# ---- the JSON reader (gamexport/jsonfile.py) and the build folder's JSON files ----------------------------------
@FUZZ
@given(opener=st.sampled_from(["[", '{"a": ']), depth=st.integers(1, 20_000))
def test_nesting_is_parsed_or_refused_by_its_depth(opener, depth):
    """Up to MAX_DEPTH levels parse; deeper is one line (Python's own parser would raise RecursionError)."""
    from gamexport.jsonfile import MAX_DEPTH, parse_json

    closer = "]" if opener == "[" else "}"
    text = opener * depth + "1" + closer * depth
    if depth <= MAX_DEPTH:
        parse_json(text, "x.json")
    else:
        with pytest.raises(GamexportError, match=f"nested more than {MAX_DEPTH} levels"):
            parse_json(text, "x.json")


@FUZZ
@given(value=json_values, where=st.sampled_from(["files", "size", "sha256", "top", "entry"]))
def test_mutated_manifest_verifies_or_fails_in_one_line(tiny_build, tmp_path_factory, value, where):
    from gamexport.manifest import verify

    folder = tmp_path_factory.mktemp("mf")
    data = json.loads((tiny_build / "manifest.json").read_text())
    entry = data["files"]["step.onnx"]
    if where == "files":
        data["files"] = value
    elif where in ("size", "sha256"):
        entry[where] = value
    elif where == "entry":
        data["files"]["step.onnx"] = value
    else:
        data = value
    (folder / "manifest.json").write_text(json.dumps(data))
    try:
        verify(folder, [])
    except GamexportError as exc:
        assert "\n" not in exc.line() and exc.fix


@FUZZ
@given(data=st.data(), name=st.sampled_from(["prefill_inputs.json", "prefill_outputs.json"]))
def test_mutated_parity_json_loads_or_fails_in_one_line(tiny_build, tmp_path_factory, data, name):
    """Bytes of a Polygraphy JSON file mutated (structure and base64 alike): arrays or one line."""
    from gamexport.polyjson import load_feeds, load_run_results

    original = (tiny_build / "parity" / name).read_bytes()
    path = tmp_path_factory.mktemp("pj") / name
    path.write_bytes(mutate(original, data.draw(mutations(len(original)))))
    try:
        (load_feeds if "inputs" in name else load_run_results)(path)
    except GamexportError as exc:
        assert "\n" not in exc.line() and exc.fix


RUNNER = textwrap.dedent("""
    import sys
    import numpy as np
    from gamexport.errors import GamexportError
    from gamexport.engines.ort import OrtRunner
    from gamexport.graph import read_graph_config
    path = sys.argv[1]
    try:
        cfg, _ = read_graph_config(path)
        runner = OrtRunner(path, sys.argv[2], cfg, threads=1)
        logits, state = runner.prefill(np.array([[1, 2, 3]]))
        assert logits.shape[-1] == cfg.vocab_size
    except GamexportError as exc:
        print('error:', exc.line())
        sys.exit(2)
""")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_onnx_is_loaded_or_refused_never_crashes(tiny_build, tmp_path_factory, data):
    """The runner's load path on a mutated graph: a result or one line (exit 2) — in a subprocess, since a
    native crash would otherwise take pytest down with it."""
    original = (tiny_build / "model.onnx").read_bytes()
    edits = data.draw(mutations(len(original)))
    folder = tmp_path_factory.mktemp("o")
    (folder / "model.onnx").write_bytes(mutate(original, edits))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(folder / "model.onnx"), str(tiny_build / "step.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 2), (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
