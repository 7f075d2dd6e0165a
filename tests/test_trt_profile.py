"""Optimization profiles: defaults, parsing BATCHxTOKENS, bounds, the per-call check (pure Python)."""

from __future__ import annotations

import pytest

from gamexport.config import past_state_name

from gamexport.errors import InputError
from gamexport.engines.trt import ProfileError, TrtProfile, default_profile, make_profile


# ---- (b) profiles -------------------------------------------------------------------------------------------------
def test_default_profiles(tiny_cfg):
    P = tiny_cfg.max_positions
    pre, step = default_profile(tiny_cfg, "prefill"), default_profile(tiny_cfg, "step")
    assert (pre.min, pre.opt, pre.max) == ((1, 1), (1, min(256, P)), (8, P))
    assert (step.min, step.opt, step.max) == ((1, 1), (1, 1), (8, P))
    assert make_profile(tiny_cfg, "step") == step


def test_profile_input_shapes(tiny_cfg):
    c = tiny_cfg
    prof = make_profile(c, "step", {"min": "1x1", "opt": "2x4", "max": (4, 16)})
    shapes = prof.input_shapes(c)
    assert shapes["input_ids"] == ((1, 1), (2, 4), (4, 16))
    assert shapes["position_ids"] == ((1, 1), (2, 4), (4, 16))   # every token's position
    s = (c.kernel_size - 1, c.d_model)
    states = [past_state_name(i) for i in range(c.n_layers)]    # one profile entry per layer's state input
    assert list(shapes) == ["input_ids", "position_ids", *states]
    for name in states:
        assert shapes[name] == ((1, *s), (2, *s), (4, *s))
    assert set(make_profile(c, "prefill").input_shapes(c)) == {"input_ids"}
    assert TrtProfile.from_dict(prof.to_dict()) == prof


@pytest.mark.parametrize("spec,needle", [
    ({"min": "2x1", "opt": "1x1"}, "batch must satisfy 1 <= min <= opt <= max"),
    ({"opt": "1x70", "max": "8x70"}, "exceeds the model's 64 learned positions"),
    ({"max": "8x0"}, "sequence must satisfy"),
    ({"max": "eight"}, "is not BATCHxTOKENS"),
    ({"maximum": "8x8"}, "unknown profile keys"),
])
def test_bad_profiles_refused(tiny_cfg, spec, needle):
    with pytest.raises(ProfileError) as err:
        make_profile(tiny_cfg, "prefill", spec)
    assert needle in err.value.line() and "\n" not in err.value.line()


def test_profile_check(tiny_cfg):
    prof = make_profile(tiny_cfg, "prefill", {"min": "1x4", "opt": "2x16", "max": "4x32"})
    for batch, seq in ((1, 4), (4, 32), (2, 10)):
        prof.check(batch, seq)
    for batch, seq in ((5, 8), (1, 3), (2, 33), (0, 8)):
        with pytest.raises(ProfileError) as err:
            prof.check(batch, seq, "model.fp32.plan")
        line = err.value.line()
        assert f"batch {batch} × sequence {seq} is outside" in line
        assert "batch 1..4, sequence 4..32" in line and "model.fp32.plan" in line
        assert isinstance(err.value, InputError)
