"""With a GPU and TensorRT (``-m gpu``): a real engine for the tiny preset matches eager fp32 within 1e-3 max abs
(TF32 off) for prefill and chunked step; CUDA-graph decode equals un-captured decode; a real fp16 engine passes its
rows against the plan emulated on CUDA. With CUDA and no TensorRT: the plan emulated on CUDA separates half
arithmetic from fp32 compute. Everything here skips with its reason elsewhere."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from gamexport.engines.trt import ProfileError, check_engine_compatible

from fakes.trt import fake_checkpoint


# ---- (d) a real GPU with TensorRT -----------------------------------------------------------------------------
def _gpu_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'gamexport[tensorrt]' on an NVIDIA machine)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


_GPU_SKIP = _gpu_reason()


@pytest.fixture(scope="module")
def real_engines(tiny_build, tiny_cfg, tmp_path_factory):
    from gamexport.engines.trt import build_engines

    folder = tmp_path_factory.mktemp("trt_build")
    for name in ("model.onnx", "step.onnx", "model.inlined.onnx", "step.inlined.onnx"):
        (folder / name).write_bytes((tiny_build / name).read_bytes())
    return folder, build_engines(folder, tiny_cfg, progress=print)  # TF32 off (the default)


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_gpu_engine_parity_prefill_and_step(real_engines, eager_tiny, tiny_cfg):
    """fp32 engine built with TF32 disabled vs eager fp32 on CPU: max abs ≤ 1e-3 (and state too)."""
    from gamexport.parity.metrics import run_chunks
    from gamexport.engines.trt import TrtRunner
    from gamexport.parity import chunk_plan, parity_inputs

    folder, metas = real_engines
    assert all(not m["builder_settings"]["tf32"] for m in metas.values())
    with TrtRunner.from_folder(folder) as runner:
        inputs = parity_inputs(tiny_cfg.vocab_size, tiny_cfg.max_positions)
        batch = np.concatenate([inputs["random"], inputs["ngram"]], axis=0)
        for ids in (inputs["random"], inputs["repeat"], batch):
            ref_logits, ref_state = eager_tiny.prefill(ids)
            logits, state = runner.prefill(ids)
            assert np.abs(logits - ref_logits).max() <= 1e-3 and np.abs(state - ref_state).max() <= 1e-3
            logits, state = run_chunks(runner, ids, chunk_plan(tiny_cfg.max_positions, tiny_cfg.kernel_size))
            assert np.abs(logits - ref_logits).max() <= 1e-3 and np.abs(state - ref_state).max() <= 1e-3
        assert runner.generate([3, 1, 4], 20) == eager_tiny.generate([3, 1, 4], 20)
        with pytest.raises(ProfileError):
            runner.prefill(np.zeros((9, 4), np.int64))


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_gpu_sidecar_describes_this_machine(real_engines):
    from gamexport.engines.trt import runtime_environment

    _folder, metas = real_engines
    env = runtime_environment()
    for meta in metas.values():
        check_engine_compatible(meta, env)


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_gpu_cuda_graph_decode_matches_uncaptured_decode(real_engines, eager_tiny, tiny_cfg):
    """cuda_graph=True on a real engine: decode steps captured once and replayed give the un-captured outputs."""
    from gamexport.engines.trt import TrtRunner

    folder, _ = real_engines
    ids = np.random.default_rng(8).integers(0, tiny_cfg.vocab_size, size=(2, 24))
    with TrtRunner.from_folder(folder) as plain, TrtRunner.from_folder(folder, cuda_graph=True) as graphed:
        for batch in (ids[:1], ids):
            a, sa = plain.prefill(batch[:, :6])
            b, sb = graphed.prefill(batch[:, :6])
            for pos in range(6, 20):
                a, sa = plain.step(batch[:, pos:pos + 1], pos, sa)
                b, sb = graphed.step(batch[:, pos:pos + 1], pos, sb)
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
                np.testing.assert_allclose(sb, sa, rtol=0, atol=1e-5)
        status = graphed.cuda_graph_status
        assert status["fallback_reason"] is None, status
        assert status["used"] and status["captures"] == 2 and status["replays"] == 2 * 13
        assert graphed.generate([3, 1, 4], 20) == eager_tiny.generate([3, 1, 4], 20)


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_gpu_fp16_engine_against_the_plan_emulation(tiny_build, tiny_cfg, tiny_weights, eager_tiny,
                                                    tmp_path_factory):
    """A real fp16 engine computes in fp16: its prefill and step rows against the plan emulated on CUDA pass."""
    from gamexport.pipeline.stages import variant_parity_checks
    from gamexport.engines.trt import TrtRunner, build_engines

    folder = tmp_path_factory.mktemp("trt_fp16")
    for name in ("model.fp16.onnx", "step.fp16.onnx", "model.fp16.inlined.onnx", "step.fp16.inlined.onnx"):
        (folder / name).write_bytes((tiny_build / name).read_bytes())
    build_engines(folder, tiny_cfg, precision="fp16", progress=print)
    with TrtRunner.from_folder(folder, precision="fp16") as runner:
        rows = variant_parity_checks(fake_checkpoint(tiny_cfg, tiny_weights), eager_tiny, runner, print)
    plan_rows = [r for r in rows if r["reference"] == "emulation-fp16"]
    assert [r["graph"] for r in plan_rows] == ["prefill", "step"]
    for row in rows:
        assert row["passed"], row


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU (torch.cuda.is_available() is False)"


_CUDA_SKIP = _cuda_reason()


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_gpu_half_plan_emulated_on_cuda(tiny_cfg, tiny_weights):
    """The plan emulated on CUDA: the CPU's half arithmetic passes its gate, fp32 compute fails it."""
    from gamexport.engines.eager import EagerRunner
    from gamexport.graph.emulate import emulate_logits, half_plan_metrics, half_plan_references, round_weights

    ids = np.random.default_rng(9).integers(0, tiny_cfg.vocab_size, size=(2, tiny_cfg.max_positions))
    for p in ("fp16", "bf16"):
        plan, fp32_compute = half_plan_references(tiny_weights, tiny_cfg, ids, p, "cuda")
        m = half_plan_metrics(emulate_logits(tiny_weights, tiny_cfg, ids, p, "cpu"), plan, fp32_compute, p)
        assert m["gated"] and m["passed"], m
        silent = EagerRunner(tiny_cfg, round_weights(tiny_weights, p), threads=1).prefill(ids)[0]
        m = half_plan_metrics(silent, plan, fp32_compute, p)
        assert not m["passed"] and m["failed_checks"] == ["fp32-compute"], m
