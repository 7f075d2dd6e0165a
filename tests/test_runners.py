"""The runner interface: bounds refused in one line, the shared sampler, eager and ONNX Runtime agreeing."""

from __future__ import annotations

import numpy as np
import pytest

from gamexport.errors import InputError
from gamexport.sampling import Sampler, SamplingConfig


@pytest.fixture(scope="module")
def ort_tiny(tiny_build):
    from gamexport.engines.ort import OrtRunner

    return OrtRunner.from_folder(tiny_build, threads=1)


@pytest.fixture(params=["eager", "ort"])
def runner(request, eager_tiny, ort_tiny):
    return eager_tiny if request.param == "eager" else ort_tiny


@pytest.mark.parametrize("ids,needle", [
    ([[1, 2, 97]], "token id 97 is outside the vocabulary [0, 97)"),
    ([[-1, 2]], "token id -1 is outside"),
    ([[]], "non-empty"),
    ([[1.5, 2.0]], "must be integers"),
    ([[1, 2**70]], f"token id {2**70} is outside the vocabulary [0, 97)"),   # beyond int64: no OverflowError
])
def test_bad_ids_refused(runner, ids, needle):
    with pytest.raises(InputError) as err:
        runner.prefill(np.asarray(ids))
    assert needle in err.value.line() and "\n" not in err.value.line()


def test_positions_past_P_refused(runner, tiny_cfg):
    P = tiny_cfg.max_positions
    state = runner.empty_state(1)
    with pytest.raises(InputError, match="exceed the model's 64 learned positions"):
        runner.prefill(np.zeros((1, P + 1), np.int64))
    with pytest.raises(InputError, match="exceed"):
        runner.step(np.zeros((1, 2), np.int64), [[P - 1]], state)
    with pytest.raises(InputError, match="exceed"):
        runner.step(np.zeros((1, 1), np.int64), [[-1]], state)  # ORT's Gather would wrap -1 silently
    logits, _ = runner.step(np.zeros((1, 1), np.int64), [[P - 1]], state)  # the last position is fine
    assert logits.shape == (1, 1, tiny_cfg.vocab_size)


def test_wrong_state_shape_refused(runner):
    with pytest.raises(InputError, match="streaming state has shape"):
        runner.step(np.zeros((1, 1), np.int64), [[0]], np.zeros((1, 1, 1, 1), np.float32))


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.3, top_k=10, seed=4),
                                      SamplingConfig(temperature=0.9, top_p=0.8, seed=9)],
                         ids=["greedy", "top-k", "top-p"])
def test_runners_generate_the_same_tokens(eager_tiny, ort_tiny, sampling):
    a = eager_tiny.generate([3, 1, 4, 1, 5], 30, sampling)
    b = ort_tiny.generate([3, 1, 4, 1, 5], 30, sampling)
    assert a == b and len(a) == 30


def test_generation_stops_at_P_and_at_stop_ids(eager_tiny, tiny_cfg):
    P = tiny_cfg.max_positions
    out = eager_tiny.generate(list(range(P - 3)), 100)
    assert len(out) == 4  # tokens at positions P-3 .. P: the last one needs no feeding
    first = eager_tiny.generate([1, 2], 5)
    stopped = eager_tiny.generate([1, 2], 5, stop_ids=[first[1]])
    assert stopped == first[:2]


def test_greedy_generation_matches_prefill_argmax(eager_tiny):
    prompt = [7, 8, 9]
    out = eager_tiny.generate(prompt, 6)
    seq = prompt + out
    logits, _ = eager_tiny.prefill(np.asarray([seq[:-1]]))
    assert list(logits[0, len(prompt) - 1:].argmax(-1)) == out


def test_sampler_filters_are_exact():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    # top-k 2: only tokens 0 and 1 ever appear, in ratio 5:3.
    s = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=0))
    draws = np.array([s(logits) for _ in range(4000)])
    assert set(draws) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03
    # top-p 0.7: the smallest set with mass >= 0.7 is {0, 1}.
    s = Sampler(SamplingConfig(temperature=1.0, top_p=0.7, seed=0))
    assert set(s(logits) for _ in range(2000)) == {0, 1}
    # temperature: same seed, same draws.
    a = Sampler(SamplingConfig(temperature=0.7, seed=5))
    b = Sampler(SamplingConfig(temperature=0.7, seed=5))
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5},
                                    {"temperature": 1e-320}, {"temperature": 1e-4}, {"temperature": 101},
                                    {"temperature": float("nan")}, {"top_k": 2**20 + 1}, {"seed": -1},
                                    {"seed": 2**32}])
def test_sampler_rejects_bad_settings(kwargs):
    with pytest.raises(InputError):
        SamplingConfig(**kwargs)


def test_nonfinite_outputs_refused(runner, monkeypatch):
    """A NaN/Inf logit is one NonFiniteError naming runner, graph and position — from prefill, step and generate;
    with ``check_finite`` off (what parity does to the runner under test) the outputs come back as they are."""
    from gamexport.errors import NonFiniteError

    def poisoned(real):
        def call(*args):
            logits, state = real(*args)
            logits = logits.copy()
            logits[0, -1, 5] = np.nan
            return logits, state
        return call

    monkeypatch.setattr(runner, "_prefill", poisoned(runner._prefill))
    monkeypatch.setattr(runner, "_step", poisoned(runner._step))
    ids = np.array([[1, 2, 3, 4]])
    with pytest.raises(NonFiniteError, match=rf"{runner.runtime} fp32 prefill.* NaN logits at batch row 0, position 3"):
        runner.prefill(ids)
    with pytest.raises(NonFiniteError, match=r"step.* NaN logits at batch row 0, position 13\b"):
        runner.step(ids, np.array([[10]]), runner.empty_state(1))
    with pytest.raises(NonFiniteError, match="rebuild"):
        runner.generate([1, 2], 3)
    monkeypatch.setattr(runner, "check_finite", False)
    assert np.isnan(runner.prefill(ids)[0]).any()


def test_parity_keeps_a_nan_as_a_failing_row(ort_tiny, eager_tiny, tiny_cfg, tiny_weights, monkeypatch):
    """In a build's parity the runner under test may produce NaN (say an fp16 overflow): that is a failing row
    (exit 1, diagnostics kept), not an exception; the eager fp32 reference stays checked (a NaN there is bad
    input: exit 2)."""
    from gamexport.checkpoint import Checkpoint
    from gamexport.pipeline.stages import variant_parity_checks
    from gamexport.errors import NonFiniteError

    def nan_logits(real):
        def call(*args):
            logits, state = real(*args)
            return np.full_like(logits, np.nan), state
        return call

    ckpt = Checkpoint(config=tiny_cfg, weights=tiny_weights, source="<test>", sha256="0" * 64)
    monkeypatch.setattr(ort_tiny, "_prefill", nan_logits(ort_tiny._prefill))
    monkeypatch.setattr(ort_tiny, "_step", nan_logits(ort_tiny._step))
    monkeypatch.setattr(ort_tiny, "check_finite", True)   # restored after the test (parity turns it off)
    rows = variant_parity_checks(ckpt, eager_tiny, ort_tiny, lambda _msg: None)
    assert rows and not any(r["passed"] for r in rows)
    monkeypatch.setattr(eager_tiny, "_prefill", nan_logits(eager_tiny._prefill))
    with pytest.raises(NonFiniteError, match="eager fp32 prefill"):
        variant_parity_checks(ckpt, eager_tiny, ort_tiny, lambda _msg: None)


# ---- what a runner says about itself (the Runner interface the pipeline and the bench ask) -----------------------
def test_eager_describes_itself(eager_tiny):
    d = eager_tiny.describe()
    assert (d.runtime, d.precision, d.compute_precision) == ("eager", "fp32", "fp32")
    assert d.note == "fp32 weights and MatMuls" and d.kernels == {}
    assert d.cuda_graph is None and d.cuda_graph_note is None
    assert eager_tiny.model_path is None and eager_tiny.step_path is None
    assert d.to_dict()["runtime"] == "eager"


@pytest.mark.parametrize("precision,compute,note", [
    ("fp32", "fp32", "fp32 weights and MatMuls"),
    ("fp16", "fp32", "fp16 weights, fp32 compute (ONNX Runtime's CPU provider computes fp16 MatMuls in fp32)"),
    ("int8-dyn", "int8", "int8-dyn: ONNX Runtime's optimized graph multiplies with "),
])
def test_onnxruntime_describes_what_it_computes_in(tiny_build, precision, compute, note):
    """The note and the kernel census come from the session's optimized graph (which ops ORT fuses to varies by
    version: the test asks for their kind, not their names)."""
    from gamexport.engines.ort import INT8_COMPUTE, OrtRunner

    with OrtRunner.from_folder(tiny_build, threads=1, precision=precision) as runner:
        d = runner.describe()
        assert runner.model_path.name == ("model.onnx" if precision == "fp32" else f"model.{precision}.onnx")
        assert runner.step_path.name == runner.model_path.name.replace("model", "step")
    assert (d.runtime, d.precision, d.compute_precision) == ("onnxruntime-cpu", precision, compute)
    assert d.note.startswith(note) and d.cuda_graph is None and d.cuda_graph_note is None
    if precision == "fp32":
        assert d.kernels == {}  # fp32: nothing to relabel, the census is not taken
    elif precision == "fp16":
        assert d.kernels and all(k.endswith(":fp32") for k in d.kernels), d.kernels
    else:
        assert d.kernels and set(d.kernels) <= set(INT8_COMPUTE), d.kernels
        assert all(f"{v}× {k}" in d.note for k, v in d.kernels.items()), d.note


def _config_entries(session, keys) -> dict[str, str]:
    """The session's configuration entries among ``keys`` (ONNX Runtime raises for a key never set)."""
    options, entries = session.get_session_options(), {}
    for key in keys:
        try:
            entries[key] = options.get_session_config_entry(key)
        except RuntimeError:
            pass
    return entries


def test_which_runner_the_emulations_describe(tiny_build, eager_tiny):
    """plan_runner(): parity's emulations describe ONNX Runtime's CPU provider — the fp16 runner itself (fp16
    computed in fp32); for int8 a second runner over the same graphs with its Q/DQ pairs run as written; for
    int8-dyn one with exact integer MatMuls; both new (the caller closes them) and not refusing NaN. Eager
    PyTorch: no emulation describes it (None)."""
    from gamexport.engines.ort import QDQ_REFERENCE, OrtRunner

    assert eager_tiny.plan_runner(1) is None
    with OrtRunner.from_folder(tiny_build, threads=1, precision="fp16") as fp16:
        assert fp16.plan_runner(1) is fp16
    for precision in ("int8", "int8-dyn"):
        with OrtRunner.from_folder(tiny_build, threads=1, precision=precision) as runner:
            twin = runner.plan_runner(1)
            assert isinstance(twin, OrtRunner) and twin is not runner and not twin.check_finite
            assert (twin.precision, twin.model_path, twin.step_path) == (precision, runner.model_path,
                                                                         runner.step_path)
            assert _config_entries(twin.step_session, QDQ_REFERENCE) == (QDQ_REFERENCE if precision == "int8"
                                                                         else {})
            twin.close()


def test_which_runner_shows_its_block_outputs(tiny_build, eager_tiny, tiny_cfg):
    """block_outputs(): the residual stream after each block, from ONNX Runtime's CPU provider on an .onnx prefill
    graph — what the eager model computes there; None for eager PyTorch and for the .ort format."""
    from gamexport.engines.ort import OrtRunner

    ids = np.random.default_rng(3).integers(0, tiny_cfg.vocab_size, size=(1, 12))
    assert eager_tiny.block_outputs(ids) is None
    with OrtRunner(tiny_build / "model.ort", tiny_build / "step.ort", None, 1) as packed:
        assert packed.block_outputs(ids) is None
    with OrtRunner.from_folder(tiny_build, threads=1) as runner:
        blocks = runner.block_outputs(ids)
    captured = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: captured.append(out[0].detach().numpy()))
             for b in eager_tiny.model.blocks]
    try:
        eager_tiny.prefill(ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(blocks) == tiny_cfg.n_layers == len(captured)
    for got, want in zip(blocks, captured):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
