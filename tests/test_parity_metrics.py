"""The parity metrics themselves (``gamexport/parity/metrics.py``), each against an independent float64 computation
written here: ``compare_logits``' differences, top-1 margins, KL and perplexity gate, ``gated: false`` rows, and
``compare_state``. The build and ``gamexport parity`` only ever see these numbers, so a wrong metric is a gate
that passes what it should fail (or the reverse)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gamexport.parity import INT8_PLAN, Tolerance, compare_logits, compare_state, tolerance

# A tolerance that gates nothing but what a test turns on.
OPEN = Tolerance(max_abs=None, kl=None, top1=None, margin=0.0, reason="test")


def _logits(seed: int, positions: int = 6, vocab: int = 7, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, size=(1, positions, vocab))


def _log_probs(row) -> list[float]:
    """log softmax of one position, in plain Python floats (no NumPy reductions)."""
    top = max(row)
    total = math.fsum(math.exp(z - top) for z in row)
    return [z - top - math.log(total) for z in row]


def _kl(ref_row, test_row) -> float:
    lp, lq = _log_probs(ref_row), _log_probs(test_row)
    return math.fsum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def _positions(x: np.ndarray) -> list[list[float]]:
    return [list(map(float, row)) for row in x.reshape(-1, x.shape[-1])]


def test_differences_and_cosine_match_a_direct_computation():
    ref = _logits(0)
    test = ref + _logits(1, scale=0.01)
    tol = Tolerance(max_abs=1e-3, kl=None, top1=None, margin=0.0, reason="test")
    m = compare_logits(ref, test, tol)
    flat_ref, flat_test = ref.ravel().tolist(), test.ravel().tolist()
    max_abs = max(abs(a - b) for a, b in zip(flat_ref, flat_test))
    ref_scale = max(abs(a) for a in flat_ref)
    dot = math.fsum(a * b for a, b in zip(flat_ref, flat_test))
    norms = math.sqrt(math.fsum(a * a for a in flat_ref)) * math.sqrt(math.fsum(b * b for b in flat_test))
    assert m["max_abs_diff"] == pytest.approx(max_abs, rel=1e-12)
    assert m["max_rel_diff"] == pytest.approx(max_abs / ref_scale, rel=1e-12)
    assert m["max_abs_limit"] == pytest.approx(1e-3 * max(1.0, ref_scale), rel=1e-12)
    assert m["cosine"] == pytest.approx(dot / norms, rel=1e-12)
    assert m["positions"] == 6
    # max |diff| ~0.03 is over the limit (~5e-3): the abs check fails, and only it.
    assert max_abs > m["max_abs_limit"] and m["failed_checks"] == ["max_abs"] and not m["passed"]
    within = compare_logits(ref, ref + 1e-4, tol)
    assert within["passed"] and within["failed_checks"] == []


def test_top1_counts_only_positions_with_a_clear_reference_margin():
    """A near-tie in the reference may flip legitimately: not counted. A clear winner that flips is a failure."""
    ref = np.array([[[5.0, 1.0, 0.0],      # margin 4: counted
                     [2.0, 1.99, 0.0],     # margin 0.01: a near-tie, not counted
                     [0.0, 3.0, 1.0],      # margin 2: counted
                     [1.0, 0.0, 0.96]]])   # margin 0.04: not counted at margin 0.05
    tol = Tolerance(max_abs=None, kl=None, top1=1.0, margin=0.05, reason="test")
    flip_ties = ref.copy()
    flip_ties[0, 1] = [1.99, 2.0, 0.0]
    flip_ties[0, 3] = [0.96, 0.0, 1.0]
    m = compare_logits(ref, flip_ties, tol)
    assert m["top1_counted"] == 2 and m["top1_agreement"] == 1.0 and m["passed"]
    flip_clear = ref.copy()
    flip_clear[0, 2] = [0.0, 1.0, 3.0]
    m = compare_logits(ref, flip_clear, tol)
    assert m["top1_counted"] == 2 and m["top1_agreement"] == 0.5
    assert m["failed_checks"] == ["top1"] and not m["passed"]


def test_kl_is_mean_kl_of_reference_to_test_in_nats():
    ref, test = _logits(2), _logits(2) + _logits(3, scale=0.3)
    kls = [_kl(r, t) for r, t in zip(_positions(ref), _positions(test))]
    m = compare_logits(ref, test, OPEN)
    assert m["kl_mean"] == pytest.approx(math.fsum(kls) / len(kls), rel=1e-9)
    assert m["kl_max"] == pytest.approx(max(kls), rel=1e-9)
    # KL is not symmetric: the direction is KL(ref ‖ test), the reference's distribution weighting.
    backwards = [_kl(t, r) for r, t in zip(_positions(ref), _positions(test))]
    assert abs(math.fsum(backwards) - math.fsum(kls)) > 1e-3 * math.fsum(kls)
    kl_mean = math.fsum(kls) / len(kls)
    just_over = Tolerance(max_abs=None, kl=kl_mean * 0.99, top1=None, margin=0.0, reason="test")
    just_under = Tolerance(max_abs=None, kl=kl_mean * 1.01, top1=None, margin=0.0, reason="test")
    assert compare_logits(ref, test, just_over)["failed_checks"] == ["kl"]
    assert compare_logits(ref, test, just_under)["passed"]


def _perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    nll = [-_log_probs(row)[int(t)] for row, t in zip(_positions(logits), targets.ravel())]
    return math.exp(math.fsum(nll) / len(nll))


def test_perplexity_gate_on_real_text():
    """The INT8 gate: |ppl_test / ppl_ref − 1| ≤ 2 % of the true next tokens' perplexity."""
    ref = _logits(4, positions=8)
    targets = np.random.default_rng(5).integers(0, 7, size=(1, 8))
    tol = tolerance("int8")
    # Nudging every target's logit down by d raises perplexity by a factor close to exp(d · (1 − p)): pick two nudges.
    for nudge, should_pass in ((0.005, True), (0.2, False)):
        test = ref.copy()
        test[0, np.arange(8), targets[0]] -= nudge
        m = compare_logits(ref, test, tol, targets)
        ppl_ref, ppl_test = _perplexity(ref, targets), _perplexity(test, targets)
        assert m["ppl_ref"] == pytest.approx(ppl_ref, rel=1e-12)
        assert m["ppl_test"] == pytest.approx(ppl_test, rel=1e-12)
        assert m["ppl_rel_change"] == pytest.approx(abs(ppl_test / ppl_ref - 1), rel=1e-9)
        assert (abs(ppl_test / ppl_ref - 1) <= 0.02) == should_pass
        assert m["gated"] and m["passed"] == should_pass
        assert m["failed_checks"] == ([] if should_pass else ["ppl_rel"])


def test_a_gate_that_needs_text_and_gets_none_makes_the_row_informational():
    """INT8 without held-out text has no perplexity: the row is measured but `gated: false` — it passes nothing
    and fails nothing (the verdict counts it apart). A state, when given, gates it again."""
    ref = _logits(6)
    garbage = ref[:, ::-1, ::-1].copy()
    m = compare_logits(ref, garbage, tolerance("int8"))
    assert m["gated"] is False and m["passed"] is True and "ppl_ref" not in m
    state = np.ones((1, 2, 3, 4))
    m = compare_logits(ref, garbage, tolerance("int8"), states=(state, state + 1.0))
    assert m["gated"] is True and m["failed_checks"] == ["state"] and not m["passed"]
    m = compare_logits(ref, garbage, tolerance("int8"), states=(state, state + 0.01))
    assert m["gated"] is True and m["passed"]
    # fp32 gates without text: its row is gated and fails on the same garbage.
    m = compare_logits(ref, garbage, tolerance("fp32"))
    assert m["gated"] is True and not m["passed"]


def test_abs_quantile_gates_the_median_position():
    """INT8_PLAN: a few positions may round to the neighbouring quantization step; the median position may not."""
    ref = _logits(7, positions=9)
    test = ref.copy()
    limit = INT8_PLAN.max_abs * max(1.0, float(np.abs(ref).max()))
    test[0, :4, 0] += 10 * limit           # four of nine positions off: the median position is exact
    m = compare_logits(ref, test, INT8_PLAN)
    assert m["positions_over_abs_limit"] == 4 and m["abs_diff_quantile"] == 0.0 and m["passed"]
    test[0, 4, 0] += 10 * limit            # five of nine: the median is off
    m = compare_logits(ref, test, INT8_PLAN)
    per_position = sorted(max(abs(a - b) for a, b in zip(r, t)) for r, t in zip(_positions(ref), _positions(test)))
    assert m["abs_diff_quantile"] == pytest.approx(per_position[4], rel=1e-12)
    assert m["failed_checks"] == ["max_abs"] and not m["passed"]


def test_compare_state_limit_scales_with_the_reference():
    ref = np.full((1, 2, 3, 4), 0.5)
    ref[0, 0, 0, 0] = 8.0                  # max |ref| 8: the limit is tol × 8
    fp32 = tolerance("fp32")               # max_abs 1e-4 applies to the state too
    assert compare_state(ref, ref + 7e-4, fp32) == (pytest.approx(7e-4), True)    # 7e-4 ≤ 8e-4
    assert compare_state(ref, ref + 9e-4, fp32) == (pytest.approx(9e-4), False)   # 9e-4 > 8e-4
    fp16 = tolerance("fp16")               # no logits abs gate: state_abs 5e-3 × 8 = 0.04
    assert compare_state(ref, ref + 0.039, fp16)[1] and not compare_state(ref, ref + 0.041, fp16)[1]
    small = np.full((1, 2, 3, 4), 0.25)    # max |ref| below 1: the limit is the tolerance itself
    assert compare_state(small, small + 0.9e-4, fp32)[1] and not compare_state(small, small + 1.1e-4, fp32)[1]
    both = Tolerance(max_abs=1e-4, kl=None, top1=None, margin=0.0, state_abs=1.0, reason="test")
    assert not compare_state(ref, ref + 9e-4, both)[1]  # state_abs applies only when there is no logits abs gate
    assert compare_state(ref, ref + 5.0, OPEN) == (pytest.approx(5.0), True)    # not gated: measured only
    assert compare_state(ref, ref[..., :3], fp32) == (float("inf"), False)       # shape differs
    nan = ref.copy()
    nan[0, 1, 1, 1] = np.nan
    assert compare_state(ref, nan, fp32) == (float("inf"), False)


def test_shape_mismatch_and_non_finite_output_fail_the_row():
    ref = _logits(8)
    assert compare_logits(ref, ref[:, :-1], tolerance("fp32"))["passed"] is False
    bad = ref.copy()
    bad[0, 0, 0] = np.inf
    m = compare_logits(ref, bad, tolerance("int8"))  # even where the gate would be informational
    assert m["passed"] is False and "NaN or Inf" in m["error"]
