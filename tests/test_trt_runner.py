"""TrtRunner driven through the stand-in ``tensorrt`` and fake CUDA of tests/fakes/trt.py: parity with eager,
names bound like onnx-tensorrt, reused step buffers, the state kept on the device, CUDA-graph decode (capture,
replay, fall-back), reading plans under the cache lock, and ``--cuda-graph`` reaching the runner."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from gamexport.config import PRESETS, past_state_name, present_state_name
from gamexport.engines import trt as trt_mod
from gamexport.engines.trt import ProfileError

from fakes.trt import HostDevice, fake_cuda, fake_engines, fake_trt  # noqa: F401 (fixtures)


def test_runner_parity_through_the_stand_in(fake_engines, fake_trt, eager_tiny, tiny_cfg):
    from gamexport.parity.metrics import run_chunks
    from gamexport.engines.trt import TrtRunner
    from gamexport.parity import chunk_ends, chunk_plan, compare_logits, compare_state, parity_inputs, tolerance

    folder, _ = fake_engines
    _fake, calls, _ = fake_trt
    runner = TrtRunner.from_folder(folder)
    assert runner.runtime == "tensorrt" and runner.precision == "fp32" and runner.config == tiny_cfg
    ids = parity_inputs(tiny_cfg.vocab_size, tiny_cfg.max_positions)["random"]
    ref_logits, ref_state = eager_tiny.prefill(ids)
    logits, state = runner.prefill(ids)
    tol = tolerance("fp32")
    assert compare_logits(ref_logits, logits, tol)["passed"] and compare_state(ref_state, state, tol)[1]
    sizes = chunk_plan(tiny_cfg.max_positions, tiny_cfg.kernel_size)
    logits, state = run_chunks(runner, ids, sizes)   # the chunks' last positions
    assert compare_logits(ref_logits[:, chunk_ends(sizes)], logits, tol)["passed"]
    assert compare_state(ref_state, state, tol)[1]
    assert ("execute_async_v3", HostDevice.stream_handle) in calls
    assert ("set_input_shape", "position_ids", (1, 1)) in calls
    assert runner.generate([1, 2, 3], 5) == eager_tiny.generate([1, 2, 3], 5)
    # outside the profile: refused in Python before TensorRT sees the shape (the message: test_bad_input.py)
    n = len(calls)
    with pytest.raises(ProfileError):
        runner.prefill(np.zeros((3, 4), np.int64))
    assert len(calls) == n


def test_stand_in_binds_function_inputs_by_name_like_onnx_tensorrt(fake_trt, tiny_build, tiny_cfg, eager_tiny,
                                                                    names_before_scoping, tmp_path):
    """Graphs whose function formals reuse a caller's name compute wrong numbers through the stand-in, as through
    onnx-tensorrt (ONNX Runtime alone scopes them correctly); the builder's graphs compute right ones."""
    import onnx

    from gamexport.engines.trt import TrtRunner, build_engines
    from gamexport.graph.checks import scope_problems
    from gamexport.parity import compare_logits, parity_inputs, tolerance

    _fake, calls, _ = fake_trt
    ids = parity_inputs(tiny_cfg.vocab_size, tiny_cfg.max_positions)["random"]
    ref_logits, _ = eager_tiny.prefill(ids)
    logger = trt_mod.environment.trt_logger(sys.modules["tensorrt"])
    folder = tmp_path / "old"
    folder.mkdir()
    for name in ("model.onnx", "step.onnx"):
        old = names_before_scoping(onnx.load(str(tiny_build / name)))
        assert any("formal input 'x'" in p for p in scope_problems(old))
        onnx.save(old, str(folder / name))
    mark = len(logger.records)
    build_engines(folder, tiny_cfg, profiles={"prefill": {"max": "2x64"}}, inlined=False)
    assert ("WARNING", "Found input: x that does not correspond to an outside scope name. Behavior may be "
            "incorrect.") in logger.records[mark:]
    wrong = compare_logits(ref_logits, TrtRunner.from_folder(folder).prefill(ids)[0], tolerance("fp32"))
    assert not wrong["passed"] and wrong["max_abs_diff"] > 0.1, wrong

    mark = len(logger.records)
    for name in ("model.onnx", "step.onnx"):
        (folder / name).write_bytes((tiny_build / name).read_bytes())
    build_engines(folder, tiny_cfg, profiles={"prefill": {"max": "2x64"}}, inlined=False)
    assert not [m for s, m in logger.records[mark:] if "Found input" in m]
    right = compare_logits(ref_logits, TrtRunner.from_folder(folder).prefill(ids)[0], tolerance("fp32"))
    assert right["passed"], right


# ---- the step engine: buffers reused, state kept on the device, CUDA graphs for decode --------------------------
BINDING = ("set_input_shape", "set_tensor_address")
PASTS = [past_state_name(i) for i in range(PRESETS["tiny"].n_layers)]        # one state per layer, in and out
PRESENTS = [present_state_name(i) for i in range(PRESETS["tiny"].n_layers)]
STEP_IO = {"input_ids", "position_ids", *PASTS, "logits", *PRESENTS}


def _of(calls, start, *kinds):
    return [c for c in calls[start:] if c[0] in kinds]


def test_step_reuses_its_buffers_and_keeps_the_state_on_the_device(fake_engines, fake_trt, eager_tiny, tiny_cfg):
    """Decode steps of one shape: set_input_shape / set_tensor_address once, then only copies into the same
    buffers; the state comes from the device (prefill's output, then the step's own) unless the caller passes
    a state that differs, bit for bit, from the last one returned (mutated in place, older, or another)."""
    from gamexport.engines.trt import TrtRunner
    from gamexport.parity import compare_logits, tolerance

    folder, _ = fake_engines
    _fake, calls, _ = fake_trt
    tol = tolerance("fp32")
    ids = np.random.default_rng(5).integers(0, tiny_cfg.vocab_size, size=(1, 20))
    runner = TrtRunner.from_folder(folder)
    dev = runner.device

    def check(pos, size, state, ref_state):
        logits, new_state = runner.step(ids[:, pos:pos + size], pos, state)
        ref_logits, new_ref = eager_tiny.step(ids[:, pos:pos + size], pos, ref_state)
        result = compare_logits(ref_logits[:, -1:], logits, tol, states=(new_ref, new_state))   # the last position
        assert result["passed"], result
        return new_state, new_ref

    _, state = runner.prefill(ids[:, :4])
    _, ref = eager_tiny.prefill(ids[:, :4])
    addresses = {}
    for pos in range(4, 9):
        n, k = len(calls), len(dev.log)
        state, ref = check(pos, 1, state, ref)
        bound = {c[1]: c[2] for c in _of(calls, n, "set_tensor_address")}
        if pos == 4:
            assert {c[1] for c in _of(calls, n, "set_input_shape")} == {"input_ids", "position_ids", *PASTS}
            assert set(bound) == STEP_IO
            addresses = bound
        else:
            assert _of(calls, n, *BINDING) == [], "same shape: no new shapes or addresses"
        assert _of(calls, n, "execute_async_v3") == [("execute_async_v3", HostDevice.stream_handle)]
        copies = dev.log[k:]
        assert ("copy_in", addresses["input_ids"]) in copies and ("copy_in", addresses["position_ids"]) in copies
        assert not {("copy_in", addresses[p]) for p in PASTS} & set(copies), "the state did not come from the host"
        state_copy = [c for c in copies if c[0] == "copy"]
        assert [c[1] for c in state_copy] == [addresses[p] for p in PASTS]   # each layer's input buffer
        if pos > 4:  # from the previous step's output buffers; the first step from prefill's
            assert [c[2] for c in state_copy] == [addresses[p] for p in PRESENTS]
        else:
            assert not {c[2] for c in state_copy} & {addresses[p] for p in PRESENTS}
    assert runner.cuda_graph_status["state_uploads"] == 0 and runner.cuda_graph_status["state_kept_on_device"] == 5

    def uploaded(pos, size, state, ref):
        k = len(dev.log)
        out = check(pos, size, state, ref)
        assert all(("copy_in", addresses[p]) in dev.log[k:] for p in PASTS)
        assert not [c for c in dev.log[k:] if c[0] == "copy"]
        return out

    older, older_ref = state.copy(), ref.copy()
    state, ref = check(9, 1, state, ref)
    state[0, 0, 0, :] += 0.5  # mutated in place: the very array the runner returned
    ref = ref.copy()
    ref[0, 0, 0, :] += 0.5
    state, ref = uploaded(10, 1, state, ref)
    uploaded(11, 1, older, older_ref)  # an older state
    # a chunk of 3 rebinds (new shapes and buffers) and still takes the state from the device
    n = len(calls)
    state, ref = check(11, 3, state, ref)
    assert ("set_input_shape", "input_ids", (1, 3)) in calls[n:]
    assert {c[1] for c in _of(calls, n, "set_tensor_address")} == STEP_IO
    assert [c[2] for c in dev.log if c[0] == "copy"][-len(PRESENTS):] == [addresses[p] for p in PRESENTS]
    assert runner.cuda_graph_status["requested"] is False and runner.cuda_graph_note() == \
        "CUDA graphs: off (not requested)"
    assert runner.generate([1, 2, 3], 6) == eager_tiny.generate([1, 2, 3], 6)


def _decode(runner, ids, start, steps, state):
    outs = []
    for pos in range(start, start + steps):
        logits, state = runner.step(ids[:, pos:pos + 1], np.full((ids.shape[0], 1), pos, np.int64), state)
        outs.append((logits, state))
    return outs


def test_cuda_graph_captures_decode_once_per_shape_and_replays(fake_engines, fake_trt, fake_cuda, tiny_cfg):
    """cuda_graph=True over the real TorchCudaDevice and a fake torch.cuda: the first decode step at a shape binds,
    runs execute_async_v3 un-captured, then captures it on the runner's stream; later steps only copy inputs and
    replay; a new shape binds and captures again; outputs are those of the same runner without graphs."""
    from gamexport.engines.trt import TrtRunner

    folder, _ = fake_engines
    _fake, calls, _ = fake_trt
    fake_cuda()
    ids = np.random.default_rng(6).integers(0, tiny_cfg.vocab_size, size=(2, 24))
    plain = TrtRunner.from_folder(folder)

    def expected(batch_ids, start, steps, state):
        return _decode(plain, batch_ids, start, steps, state)

    runner = TrtRunner.from_folder(folder, cuda_graph=True)
    h = runner.device.stream_handle
    assert h != 0 and h != plain.device.stream_handle

    def same(got, want):
        for (a, sa), (b, sb) in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(sa, sb)

    one = ids[:1]
    _, state = runner.prefill(one[:, :5])
    want = expected(one, 5, 4, plain.prefill(one[:, :5])[1])
    n = len(calls)
    got = _decode(runner, one, 5, 1, state)
    first = calls[n:]
    order = [c for c in first if c[0] in ("execute_async_v3", "capture_begin", "capture_end", "replay")]
    assert order == [("execute_async_v3", h), ("capture_begin", h, "thread_local"),
                     ("execute_async_v3", h, "captured"), ("capture_end", h)], order
    binding = [c for c in first[:first.index(("execute_async_v3", h))] if c[0] in BINDING]
    assert sorted(c[0] for c in binding) == ["set_input_shape"] * (2 + len(PASTS)) + \
        ["set_tensor_address"] * (3 + 2 * len(PASTS))
    addresses = {c[1]: c[2] for c in binding if c[0] == "set_tensor_address"}
    for step in range(3):
        m = len(calls)
        got += _decode(runner, one, 6 + step, 1, got[-1][1])
        assert [c for c in calls[m:] if c[0] in (*BINDING, "execute_async_v3", "capture_begin", "replay")] == \
            [("replay", h)], "later steps: inputs copied into the same buffers, graph replayed"
        copies = [c for c in calls[m:] if c[0] in ("copy_in", "copy")]
        assert sorted(copies) == sorted([("copy_in", addresses["input_ids"]), ("copy_in", addresses["position_ids"]),
                                         *[("copy", addresses[a], addresses[b]) for a, b in zip(PASTS, PRESENTS)]])
    same(got, want)
    status = runner.cuda_graph_status
    assert (status["captures"], status["replays"], status["captured_shapes"]) == (1, 3, [[1, 1]])
    assert status["used"] and status["fallback_reason"] is None

    # a new shape (batch 2): bind, warm up, capture again; then replay
    _, state2 = runner.prefill(ids[:, :5])
    want2 = expected(ids, 5, 3, plain.prefill(ids[:, :5])[1])
    m = len(calls)
    got2 = _decode(runner, ids, 5, 3, state2)
    same(got2, want2)
    assert ("set_input_shape", "input_ids", (2, 1)) in calls[m:]
    assert [c[0] for c in calls[m:] if c[0] in ("execute_async_v3", "capture_begin", "replay")] == \
        ["execute_async_v3", "capture_begin", "execute_async_v3", "replay", "replay"]
    # back to batch 1 with an older state (uploaded): the batch-2 binding replaced the batch-1 one, so capture again
    m = len(calls)
    same(_decode(runner, one, 9, 2, got[-1][1]), expected(one, 9, 2, want[-1][1]))
    assert [c[0] for c in calls[m:] if c[0] in ("capture_begin", "replay")] == ["capture_begin", "replay"]
    assert ("copy_in", [c for c in calls[m:] if c[0] == "set_tensor_address" and c[1] == PASTS[0]][0][2]) \
        in calls[m:], "a state that is not the last one returned is uploaded"
    # a chunk of several tokens never captures
    chunk_state = _decode(plain, one, 9, 2, want[-1][1])[-1][1]
    m = len(calls)
    logits, _ = runner.step(one[:, 11:14], 11, chunk_state)
    assert [c for c in calls[m:] if c[0] in ("execute_async_v3", "capture_begin", "replay")] == \
        [("execute_async_v3", h)]
    np.testing.assert_array_equal(logits, plain.step(one[:, 11:14], 11, chunk_state)[0])
    status = runner.cuda_graph_status
    assert (status["captures"], status["replays"]) == (3, 6)
    assert status["captured_shapes"] == [[1, 1], [2, 1], [1, 1]]
    assert runner.cuda_graph_note().startswith("CUDA graphs: on for decode, 3 captures (1x1, 2x1), 6 replays")


def test_tensorrt_runner_describes_itself(fake_engines, fake_trt, fake_cuda, tiny_cfg):
    """describe(): TensorRT's note, no kernel census, the engine files, and the CUDA-graph status and note — off when
    not requested; used once a decode step replayed a captured graph."""
    from gamexport.engines.trt import TrtRunner

    folder, _ = fake_engines
    fake_cuda()
    plain = TrtRunner.from_folder(folder)
    d = plain.describe()
    assert (d.runtime, d.precision, d.compute_precision, d.kernels) == ("tensorrt", "fp32", "fp32", {})
    assert d.note == "fp32: TensorRT's strongly typed network computes in the graph's precision"
    assert d.cuda_graph["requested"] is False and d.cuda_graph_note == "CUDA graphs: off (not requested)"
    assert (plain.model_path.name, plain.step_path.name) == ("model.fp32.plan", "step.fp32.plan")
    runner = TrtRunner.from_folder(folder, cuda_graph=True)
    ids = np.random.default_rng(7).integers(0, tiny_cfg.vocab_size, size=(1, 8))
    _, state = runner.prefill(ids[:, :5])
    assert runner.describe().cuda_graph["used"] is False
    _decode(runner, ids, 5, 3, state)
    d = runner.describe()
    assert d.cuda_graph["used"] is True and d.cuda_graph["replays"] == 2 and d.cuda_graph["captures"] == 1
    assert d.cuda_graph_note == runner.cuda_graph_note() and "2 replays" in d.cuda_graph_note


def test_cuda_graph_capture_failure_falls_back_and_says_why(fake_engines, fake_trt, fake_cuda, tiny_cfg):
    from gamexport.engines.trt import TrtRunner

    folder, _ = fake_engines
    _fake, calls, _ = fake_trt
    fake_cuda(fail_capture="CUDA error: operation not permitted when stream is capturing")
    ids = np.random.default_rng(7).integers(0, tiny_cfg.vocab_size, size=(1, 16))
    plain = TrtRunner.from_folder(folder)
    want = _decode(plain, ids, 3, 4, plain.prefill(ids[:, :3])[1])
    runner = TrtRunner.from_folder(folder, cuda_graph=True)
    h = runner.device.stream_handle
    _, state = runner.prefill(ids[:, :3])
    n = len(calls)
    got = _decode(runner, ids, 3, 4, state)
    for (a, sa), (b, sb) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sa, sb)
    order = [c for c in calls[n:] if c[0] in ("execute_async_v3", "capture_begin", "capture_end", "replay")]
    assert order == [("execute_async_v3", h), ("capture_begin", h, "thread_local"),
                     ("execute_async_v3", h, "captured"), ("capture_end", h)] + [("execute_async_v3", h)] * 3
    status = runner.cuda_graph_status
    assert status["fallback_reason"] == "CUDA error: operation not permitted when stream is capturing"
    assert not status["used"] and status["captures"] == 0 and status["uncaptured_steps"] == 4
    assert "capture failed (CUDA error: operation not permitted" in runner.cuda_graph_note()


def test_the_stand_in_refuses_a_capture_without_the_warm_up(fake_engines, fake_trt, fake_cuda):
    """What makes the call-order test able to fail: like TensorRT, the stand-in cannot capture the deferred work of
    new input shapes, so a runner that captured without executing once first would record a fallback."""
    from gamexport.engines.trt import TrtRunner

    folder, _ = fake_engines
    fake_cuda()
    runner = TrtRunner.from_folder(folder, cuda_graph=True)
    eng = runner.engines["step"]
    c = runner.config
    shapes = {"input_ids": (1, 1), "position_ids": (1, 1), **{p: (1, c.state_len, c.d_model) for p in PASTS}}
    binding = eng.bind(runner.device, shapes)
    for name, shape in shapes.items():
        runner.device.copy_in(binding.buffers[name], np.zeros(shape, eng.dtypes[name]))
    graph, why = eng.capture(runner.device)
    assert graph is None and "previous error during capture" in why
    eng.execute(runner.device)
    graph, why = eng.capture(runner.device)
    assert graph is not None and why is None


def test_a_runner_never_reads_a_plan_while_it_is_written(fake_engines, fake_trt):
    """While a builder holds the cache lock, a runner opening the folder waits; then it loads a matching pair."""
    import threading

    from gamexport.engines.trt import TrtRunner, cache_lock

    folder, _ = fake_engines
    result = {}

    def open_runner():
        try:
            result["runner"] = TrtRunner.from_folder(folder)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    with cache_lock(folder / "tensorrt"):
        reader = threading.Thread(target=open_runner, daemon=True)
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not result, "the runner must wait for the writer"
    reader.join(60)
    assert "error" not in result, result.get("error")
    assert result["runner"].prefill(np.array([[1, 2, 3]]))[0].shape == (1, 3, 97)


def test_build_option_cuda_graph_reaches_the_tensorrt_runner(monkeypatch, tiny_cfg, tmp_path):
    """``gamexport build --cuda-graph`` opens its TensorRT runners with CUDA graphs; without it, they run
    un-captured."""
    from gamexport import targets
    from gamexport.engines import trt

    opened = []
    monkeypatch.setattr(trt, "build_engines", lambda *a, **k: None)
    monkeypatch.setattr(trt.TrtRunner, "from_folder",
                        classmethod(lambda cls, folder, precision="fp32", device=0, cuda_graph=False:
                                    opened.append((precision, cuda_graph)) or "runner"))
    for flag in (True, False):
        assert targets.open_runner("tensorrt", "fp16", tmp_path, tiny_cfg,
                                   targets.OpenOptions(threads=1, cuda_graph=flag)) == "runner"
    assert opened == [("fp16", True), ("fp16", False)]
