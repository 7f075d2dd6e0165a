"""Building TensorRT plans through the stand-in ``tensorrt`` of tests/fakes/trt.py (TensorRT 10 and 11 API):
the documented builder calls, the sidecar, the timing cache and reuse key, strong typing, parser fallback, and the
engine folder as a cache shared by processes (its lock, truncated plans rebuilt, leftovers removed)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from gamexport.config import past_state_name
from gamexport.errors import ConfigError, GraphError
from gamexport.engines.trt import TensorRTError, build_engine, sidecar_path

from fakes.trt import fake_trt, install_fake_trt, make_fake_trt  # noqa: F401 (fixtures)


def _build(build_dir, cfg, graph, out, **kw):
    onnx_name = "model.onnx" if graph == "prefill" else "step.onnx"
    return build_engine(build_dir / onnx_name, out, cfg, kw.pop("profile", None), **kw)


def test_build_uses_documented_api(fake_trt, tiny_build, tiny_cfg, tmp_path):
    fake, calls, env = fake_trt
    engine = tmp_path / "step.fp32.plan"
    meta = _build(tiny_build, tiny_cfg, "step", engine, profile={"max": "4x32"}, workspace_bytes=1 << 28)
    build = next(c[1] for c in calls if c[0] == "build")
    strongly = 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert build["flags"] == strongly == (2 if fake.__version__.startswith("10") else 1)
    assert build["cleared"] == ["TF32"] and build["set"] == [], "fp32: TF32 off, no precision flags"
    assert build["level"] == 3 and build["pools"] == {"WORKSPACE": 1 << 28}
    c = tiny_cfg
    state = [c.kernel_size - 1, c.d_model]
    assert build["profiles"] == [{"input_ids": [[1, 1], [1, 1], [4, 32]],
                                  "position_ids": [[1, 1], [1, 1], [4, 32]],
                                  **{past_state_name(i): [[1, *state], [1, *state], [4, *state]]
                                     for i in range(c.n_layers)}}]
    assert ("parse_from_file", "step.onnx") in calls and ("OnnxParser", True) in calls
    # the plan and its sidecar
    assert engine.is_file() and sidecar_path(engine) == tmp_path / "step.fp32.plan.json"
    side = json.loads(sidecar_path(engine).read_text())
    assert side == meta
    assert side["tensorrt_version"] == env["tensorrt_version"]
    assert side["gpu"] == {"name": env["gpu_name"], "compute_capability": "9.0"}
    assert side["profile"] == {"graph": "step", "axes": ["batch", "chunk"], "min": [1, 1], "opt": [1, 1],
                               "max": [4, 32]}
    from gamexport.fsutil import sha256_file
    assert side["onnx"] == {"file": "step.onnx", "sha256": sha256_file(tiny_build / "step.onnx")}
    assert side["engine"]["sha256"] == sha256_file(engine) and side["precision"] == "fp32"
    assert side["builder_settings"]["strongly_typed"] and not side["builder_settings"]["tf32"]


def test_timing_cache_and_engine_reuse(fake_trt, tiny_build, tiny_cfg, tmp_path):
    fake, calls, env = fake_trt
    engine = tmp_path / "model.fp32.plan"
    first = _build(tiny_build, tiny_cfg, "prefill", engine)
    cache_file = tmp_path / first["timing_cache"]["file"]
    assert first["timing_cache"]["status"] == "new" and cache_file.is_file()
    assert f"trt{env['tensorrt_version']}-sm90" in cache_file.name
    # same inputs: the plan is reused without building
    n_builds = sum(c[0] == "build" for c in calls)
    assert _build(tiny_build, tiny_cfg, "prefill", engine) == first
    assert sum(c[0] == "build" for c in calls) == n_builds
    # a new profile rebuilds, starting from the saved timing cache
    second = _build(tiny_build, tiny_cfg, "prefill", engine, profile={"opt": "1x16"})
    assert second["timing_cache"]["status"] == "reused" and second["key"] != first["key"]
    loaded = [c[1] for c in calls if c[0] == "create_timing_cache"]
    assert loaded[0] == b"" and loaded[-1].startswith(b"timing-cache:")


def test_precision_is_the_graphs(fake_trt, tiny_build, tiny_cfg, tmp_path):
    _fake, calls, _ = fake_trt
    with pytest.raises(ConfigError) as err:
        _build(tiny_build, tiny_cfg, "prefill", tmp_path / "m.plan", precision="fp16")
    assert "holds a fp32 graph, but a fp16 engine was asked for" in err.value.line()
    assert not any(c[0] == "build" for c in calls), "refused before building"
    with pytest.raises(GraphError, match="is a prefill graph, not a step graph"):
        build_engine(tiny_build / "model.onnx", tmp_path / "m.plan", tiny_cfg, graph="step")


def test_parser_fallback_and_errors(monkeypatch, tiny_build, tiny_cfg, tmp_path):
    calls: list = []
    fake = make_fake_trt(11, calls, refuse=("model.onnx",))
    install_fake_trt(monkeypatch, fake)
    meta = _build(tiny_build, tiny_cfg, "prefill", tmp_path / "m.plan")
    assert meta["onnx"]["file"] == "model.onnx" and meta["onnx"]["parsed_file"] == "model.inlined.onnx"
    with pytest.raises(GraphError) as err:
        _build(tiny_build, tiny_cfg, "prefill", tmp_path / "m2.plan", inlined=False)
    line = err.value.line()
    assert "parser refused model.onnx: No importer registered for op: Block (node blocks.0)" in line
    assert "\n" not in line

    fake = make_fake_trt(10, calls, fail_build=True)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(TensorRTError) as err:
        _build(tiny_build, tiny_cfg, "prefill", tmp_path / "m3.plan")
    assert "could not build m3.plan: out of memory while timing tactics." in err.value.line()
    assert not (tmp_path / "m3.plan").exists()


# ---- the engine folder as a cache shared by processes -------------------------------------------------------------
CACHE_BUILDER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])  # tests/, for the stand-in
    import pytest
    from fakes.trt import install_fake_trt, make_fake_trt
    from gamexport.config import PRESETS
    from gamexport.engines import trt as trt_mod

    role, onnx_path, engine, marker = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
    lock = engine.parent / trt_mod.CACHE_LOCK

    def hold_until_the_other_is_blocked():
        # The first builder stays inside its build until the second one is blocked on the cache lock: a '->'
        # line for the lock file's inode in /proc/locks. Without the lock it would never block (timeout).
        marker.write_text("building")
        ino, deadline = (os.stat(lock).st_ino if lock.exists() else None), time.time() + 15
        while time.time() < deadline:
            if ino is not None and any(line.split()[1] == "->" and line.split()[-3].endswith(f":{ino}")
                                       for line in open("/proc/locks")):
                return
            time.sleep(0.02)

    calls = []
    fake = make_fake_trt(10, calls, before_build=hold_until_the_other_is_blocked if role == "first" else None)
    install_fake_trt(pytest.MonkeyPatch(), fake)
    said = []
    meta = trt_mod.build_engine(onnx_path, engine, PRESETS["tiny"], progress=said.append)
    print(json.dumps({"builds": sum(c[0] == "build" for c in calls), "sha": meta["engine"]["sha256"],
                      "progress": said}))
""")


def test_two_builds_into_one_engine_cache_at_once_build_once(tiny_build, tmp_path):
    """Two processes build the same engine into one folder at the same moment: the second waits on the cache lock
    while the first is inside its build, then reuses the first's plan; the folder ends with one plan, its
    sidecar and the timing cache, and no temporaries."""
    import os

    folder = tmp_path / "cache"
    engine = folder / "model.fp32.plan"
    marker = tmp_path / "first-is-building"
    tests = str(os.path.dirname(__file__))
    argv = [sys.executable, "-c", CACHE_BUILDER, tests, "ROLE", str(tiny_build / "model.onnx"), str(engine),
            str(marker)]
    first = subprocess.Popen([a if a != "ROLE" else "first" for a in argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run([a if a != "ROLE" else "second" for a in argv], capture_output=True, text=True,
                                timeout=120)
        out_first, err_first = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and second.returncode == 0, err_first[-2000:] + second.stderr[-2000:]
    a, b = json.loads(out_first), json.loads(second.stdout)
    assert (a["builds"], b["builds"]) == (1, 0), "the second builder reused the first's plan"
    assert any("waiting for another process writing TensorRT engines" in m for m in b["progress"]), b["progress"]
    assert any("is up to date" in m for m in b["progress"])
    assert a["sha"] == b["sha"]
    side = json.loads(sidecar_path(engine).read_text())
    from gamexport.fsutil import sha256_file
    assert side["engine"]["sha256"] == sha256_file(engine) == a["sha"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([".gamexport-engines.lock", "model.fp32.plan", "model.fp32.plan.json",
                            side["timing_cache"]["file"]]), names


def test_truncated_plan_in_the_cache_is_rebuilt_and_leftovers_removed(fake_trt, tiny_build, tiny_cfg, tmp_path):
    _fake, calls, _env = fake_trt
    engine = tmp_path / "model.fp32.plan"
    first = _build(tiny_build, tiny_cfg, "prefill", engine)
    engine.write_bytes(engine.read_bytes()[:20])  # truncated in the cache
    cache_name = first["timing_cache"]["file"]
    leftovers = [tmp_path / f".model.fp32.plan.{tag}.tmp" for tag in ("k2j4_x9q",)] + [
        tmp_path / ".model.fp32.plan.json.a1b2c3d4.tmp", tmp_path / f".{cache_name}.zz99yy88.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file from a killed builder")
    unrelated = tmp_path / ".notes.txt.abcd1234.tmp"
    unrelated.write_bytes(b"someone else's")
    said = []
    n = sum(c[0] == "build" for c in calls)
    meta = _build(tiny_build, tiny_cfg, "prefill", engine, progress=said.append)
    assert sum(c[0] == "build" for c in calls) == n + 1
    assert any("model.fp32.plan does not match its sidecar (truncated or replaced): rebuilding it" in m
               for m in said), said
    from gamexport.fsutil import sha256_file
    assert meta["engine"]["sha256"] == sha256_file(engine) and meta["key"] == first["key"]
    assert not any(p.exists() for p in leftovers) and unrelated.exists()


def test_an_int4_graph_is_refused_in_one_line(fake_trt, tiny_cfg, tiny_weights, tmp_path):
    """MatMulNBits is an ONNX Runtime contrib operator: the loader names it and says what to build instead, before
    TensorRT's parser sees the graph (the target registry skips int4 for TensorRT for the same reason)."""
    from gamexport.engines.trt.loader import graph_precision
    from gamexport.graph.builder import build_graph, serialize
    from gamexport.targets import UNSUPPORTED

    model = build_graph(tiny_cfg, tiny_weights, "step", precision="int4")
    assert graph_precision(model) == "int4"
    assert graph_precision(build_graph(tiny_cfg, tiny_weights, "step")) == "fp32"
    (tmp_path / "step.int4.onnx").write_bytes(serialize(model))
    with pytest.raises(ConfigError, match="MatMulNBits, an ONNX Runtime contrib operator"):
        build_engine(tmp_path / "step.int4.onnx", tmp_path / "step.int4.plan", tiny_cfg, None)
    assert "MatMulNBits" in UNSUPPORTED[("tensorrt", "int4")]
    assert ("onnxruntime-cuda", "int4") not in UNSUPPORTED
