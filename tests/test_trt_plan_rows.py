"""The half-precision plan rows (reference emulation-fp16 / emulation-bf16) on the CPU: half arithmetic from
onnx's reference evaluator passes, graphs that silently compute in fp32 fail; a TensorRT fp16 engine (the
stand-in, computing in fp32) is caught."""

from __future__ import annotations

import numpy as np

from fakes.trt import fake_checkpoint, fake_trt  # noqa: F401 (fixtures)

from gamexport.runtime import Runner


# ---- half-precision graphs against an emulation of the same precision plan ---------------------------------------
def test_half_plan_gate_passes_half_arithmetic_and_fails_fp32_compute(tiny_build, tiny_cfg, tiny_weights):
    """The gate of the emulation-{p} rows, on the CPU: the real fp16/bf16 graph executed in half arithmetic by onnx's
    reference evaluator (rounding where it rounds, not where the emulation does) passes; the same fp16 graph on
    ONNX Runtime's CPU provider, which computes it in fp32, fails as "fp32-compute", and so does fp32 compute on
    bf16-rounded weights; a gap below the fp32 noise floor makes the row informational."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    from gamexport.engines.eager import EagerRunner
    from gamexport.engines.ort import OrtRunner
    from gamexport.graph import inline
    from gamexport.graph.emulate import half_plan_metrics, half_plan_references, round_weights

    ids = np.random.default_rng(4).integers(0, tiny_cfg.vocab_size, size=(1, 12))
    for p in ("fp16", "bf16"):
        plan, fp32_compute = half_plan_references(tiny_weights, tiny_cfg, ids, p, "cpu")
        model = onnx.shape_inference.infer_shapes(inline(onnx.load(str(tiny_build / f"model.{p}.onnx"))))
        half = ReferenceEvaluator(model).run(None, {"input_ids": ids})[0]
        m = half_plan_metrics(half, plan, fp32_compute, p)
        assert m["gated"] and m["passed"], m
        assert m["fp32_compute_rms_diff"] >= m["fp32_compute_rms_limit"] > 10 * m["plan_gap_floor"] / 4
        if p == "fp16":
            silent = OrtRunner(tiny_build / "model.fp16.onnx", tiny_build / "step.fp16.onnx", tiny_cfg, 1,
                               precision="fp16").prefill(ids)[0]
        else:
            silent = EagerRunner(tiny_cfg, round_weights(tiny_weights, p), threads=1).prefill(ids)[0]
        m = half_plan_metrics(silent, plan, fp32_compute, p)
        assert m["gated"] and not m["passed"] and m["failed_checks"] == ["fp32-compute"], m
        assert m["fp32_compute_rms_diff"] < 0.01 * m["plan_gap_rms"]
        assert "must compute in " + p in m["tolerances"]["reason"]
    # references closer than fp32 noise: nothing can discriminate, so the row says so instead of gating
    m = half_plan_metrics(plan, plan, plan + 1e-7, "bf16")
    assert not m["gated"] and m["passed"] and "no tolerance can tell" in m["tolerances"]["reason"]


class _HalfRunner(Runner):
    """A runner that says it multiplies in fp16 (like ONNX Runtime's CUDA provider) and does: its prefill is the fp16
    graph run by onnx's reference evaluator; ``step_fp32=True`` makes its step graph silently compute in fp32. It
    keeps no state (parity runs it with ``check_finite`` off, so the None state of its prefill is never checked)."""

    runtime, precision = "onnxruntime-cuda", "fp16"

    def __init__(self, build, cfg, weights, step_fp32=False):
        import onnx
        from onnx.reference import ReferenceEvaluator

        from gamexport.engines.eager import EagerRunner
        from gamexport.graph import inline
        from gamexport.graph.emulate import round_weights

        super().__init__(cfg)
        self.compute_precision = "fp16"
        self.model_path, self.step_path = build / "model.fp16.onnx", build / "step.fp16.onnx"
        self.evaluator = ReferenceEvaluator(onnx.shape_inference.infer_shapes(inline(onnx.load(str(self.model_path)))))
        self.eager = EagerRunner(cfg, round_weights(weights, "fp16"), threads=1)
        self.step_fp32, self.cache = step_fp32, {}

    def _prefill(self, ids):
        key = ids.tobytes()
        if key not in self.cache:
            self.cache[key] = self.evaluator.run(None, {"input_ids": ids})[0]
        return self.cache[key], None

    def _step(self, ids, position_ids, state):  # the prefix's prefill, sliced: a chunk step in fp16
        pos = int(position_ids.reshape(-1)[0])
        if self.step_fp32:
            return self.eager.step(ids, position_ids, state)
        full = self._prefill(np.concatenate([self.prefix[:, :pos], ids], axis=1))[0]
        return full[:, pos:], state


def test_half_compute_rows_against_the_plan_emulation(monkeypatch, tiny_build, tiny_cfg, tiny_weights):
    """variant_parity_checks for a runner computing in fp16: prefill and step rows against the plan emulation
    (here on the CPU: CUDA is stood in for), which pass for half arithmetic and fail the step graph that silently
    computes in fp32."""
    from gamexport.engines.eager import EagerRunner
    from gamexport.pipeline.stages import variant_parity_checks
    from gamexport.graph import emulate
    from gamexport.parity import parity_inputs

    import jsonschema

    from gamexport.report import schema

    row_schema = {"$defs": schema()["$defs"], "$ref": "#/$defs/parity_row"}
    monkeypatch.setattr(emulate, "emulation_device", lambda: ("cpu", "the CPU, standing in for CUDA"))
    ckpt, eager = fake_checkpoint(tiny_cfg, tiny_weights), EagerRunner(tiny_cfg, tiny_weights, threads=1)
    said = []
    for step_fp32 in (False, True):
        runner = _HalfRunner(tiny_build, tiny_cfg, tiny_weights, step_fp32=step_fp32)
        runner.prefix = parity_inputs(tiny_cfg.vocab_size, tiny_cfg.max_positions)["random"]
        rows = variant_parity_checks(ckpt, eager, runner, said.append)
        plan_rows = {r["graph"]: r for r in rows if r["reference"] == "emulation-fp16"}
        assert set(plan_rows) == {"prefill", "step"}
        for r in rows:  # the rows a GPU build writes must fit the report's schema
            jsonschema.validate(r, row_schema)
        assert all(r["compute_precision"] == "fp16" and r["note"] == "fp16 weights and MatMuls" for r in rows)
        assert not any(r["reference"] == "emulation-fp16-weights" for r in rows), "that row is for fp32 compute"
        assert plan_rows["prefill"]["passed"] and plan_rows["prefill"]["gated"]
        assert plan_rows["prefill"]["artifact"] == "model.fp16.onnx" and plan_rows["step"]["chunks"]
        if step_fp32:
            assert not plan_rows["step"]["passed"] and plan_rows["step"]["failed_checks"] == ["fp32-compute"]
        else:
            assert plan_rows["step"]["passed"], plan_rows["step"]
    assert any("vs the fp16 plan emulated by eager PyTorch on the CPU, standing in for CUDA" in m for m in said)


def test_without_cuda_the_plan_rows_are_skipped_and_the_note_says_why(monkeypatch, tiny_build, tiny_cfg,
                                                                       tiny_weights):
    from gamexport.engines.eager import EagerRunner
    from gamexport.pipeline.stages import variant_parity_checks
    from gamexport.graph import emulate
    from gamexport.parity import parity_inputs

    monkeypatch.setattr(emulate, "emulation_device", lambda: (None, "torch 2.13.0+cpu sees no CUDA GPU"))
    runner = _HalfRunner(tiny_build, tiny_cfg, tiny_weights)
    runner.prefix = parity_inputs(tiny_cfg.vocab_size, tiny_cfg.max_positions)["random"]
    said = []
    rows = variant_parity_checks(fake_checkpoint(tiny_cfg, tiny_weights), EagerRunner(tiny_cfg, tiny_weights, threads=1),
                                 runner, said.append)
    assert [r["reference"] for r in rows] == ["eager-fp32", "eager-fp32"]
    why = "fp16 plan emulation not run: torch 2.13.0+cpu sees no CUDA GPU (it runs eager PyTorch in fp16 on CUDA)"
    assert all(r["note"] == f"fp16 weights and MatMuls; {why}" for r in rows)
    assert f"parity: onnxruntime-cuda fp16: {why}" in said


def test_emulation_device_names_the_reason_without_a_gpu():
    import torch

    from gamexport.graph.emulate import emulation_device

    if torch.cuda.is_available():
        assert emulation_device()[0] == "cuda"
        return
    device, why = emulation_device()
    assert device is None and why == f"torch {torch.__version__} sees no CUDA GPU"


def test_tensorrt_fp16_rows_catch_an_engine_computing_in_fp32(monkeypatch, fake_trt, tiny_build, tiny_cfg,
                                                               tiny_weights, tmp_path):
    """The stand-in runs an fp16 'TensorRT engine' with ONNX Runtime's CPU provider, i.e. in fp32 — exactly the
    engine the plan rows exist to catch. Both plan rows fail as fp32-compute; every row says the runner is
    TensorRT and whether it replayed CUDA graphs."""
    from gamexport.engines.eager import EagerRunner
    from gamexport.pipeline.stages import variant_parity_checks
    from gamexport.engines.trt import TrtRunner, build_engines
    from gamexport.graph import emulate

    folder = tmp_path / "build"
    folder.mkdir()
    for name in ("model.fp16.onnx", "step.fp16.onnx"):
        (folder / name).write_bytes((tiny_build / name).read_bytes())
    build_engines(folder, tiny_cfg, precision="fp16")
    monkeypatch.setattr(emulate, "emulation_device", lambda: ("cpu", "the CPU"))
    runner = TrtRunner.from_folder(folder, precision="fp16")
    assert (runner.precision, runner.compute_precision) == ("fp16", "fp16")
    rows = variant_parity_checks(fake_checkpoint(tiny_cfg, tiny_weights), EagerRunner(tiny_cfg, tiny_weights, threads=1),
                                 runner, lambda m: None)
    plan_rows = [r for r in rows if r["reference"] == "emulation-fp16"]
    assert [r["graph"] for r in plan_rows] == ["prefill", "step"]
    assert [r["artifact"] for r in plan_rows] == ["model.fp16.plan", "step.fp16.plan"]
    assert all(not r["passed"] and r["gated"] and "fp32-compute" in r["failed_checks"] for r in plan_rows)
    assert all(r["passed"] for r in rows if r["reference"] == "eager-fp32"), "fp32 compute passes the fp16 gate"
    for r in rows:  # step rows say whether decode replayed CUDA graphs; prefill never runs as one
        base = "fp16: TensorRT's strongly typed network computes in the graph's precision"
        assert r["runtime"] == "tensorrt"
        if r["graph"] == "step":
            assert r["cuda_graph"] is False and r["note"] == base + "; CUDA graphs: off (not requested)"
        else:
            assert "cuda_graph" not in r and r["note"] == base
