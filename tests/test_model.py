"""The PyTorch model against the paper's equations (float64 NumPy), its size, causality and streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gamexport.config import PRESETS, GAMConfig, infer_config
from gamexport.model import build_model
from gamexport.reference import reference_logits


def _logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids))[0].double().numpy()


def test_paper_preset_has_exactly_the_papers_parameter_count():
    cfg = PRESETS["paper"]
    # Per layer, as the paper lists them: conv 2,048, memory 262,144, gate 525,312, FFN 2,099,712, norms 2,048.
    per_layer = 2_048 + 262_144 + 525_312 + 2_099_712 + 2_048
    expected = 10_000 * 512 + 256 * 512 + 6 * per_layer + 2 * 512
    assert expected == 22_599_680
    assert cfg.n_params() == expected
    assert build_model(cfg, seed=0).num_parameters() == expected


@pytest.mark.parametrize("cfg", [
    PRESETS["tiny"],
    GAMConfig(vocab_size=50, d_model=24, n_layers=3, n_slots=7, kernel_size=4, max_positions=40),
    GAMConfig(vocab_size=31, d_model=16, n_layers=1, n_slots=5, kernel_size=2, max_positions=12),
], ids=["tiny", "k4", "k2"])
def test_model_matches_float64_reference(cfg, tiny_weights):
    model = build_model(cfg, seed=1)
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    for name in weights:  # non-trivial biases and norm affines
        if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
            weights[name] = weights[name] + rng.normal(0, 0.3, weights[name].shape).astype(np.float32)
    model = build_model(cfg, weights)
    ids = rng.integers(0, cfg.vocab_size, size=(2, min(17, cfg.max_positions)))
    ref = reference_logits(weights, cfg, ids)
    got = _logits(model, ids)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_reference_catches_a_wrong_model(tiny_cfg, tiny_weights):
    """The reference is sensitive: swapping the two gates changes its output beyond tolerance."""
    ids = np.arange(10)[None] % tiny_cfg.vocab_size
    ref = reference_logits(tiny_weights, tiny_cfg, ids)
    w = dict(tiny_weights)
    d = tiny_cfg.d_model
    g = w["blocks.0.gate.weight"]
    w["blocks.0.gate.weight"] = np.concatenate([g[d:], g[:d]])
    wrong = _logits(build_model(tiny_cfg, w), ids)
    assert np.abs(wrong - ref).max() > 1e-3


def test_paper_preset_matches_reference_on_a_short_sequence():
    cfg = PRESETS["paper"]
    model = build_model(cfg, seed=0)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 8))
    ref = reference_logits(weights, cfg, ids)
    assert np.abs(_logits(model, ids) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_causal_and_receptive_field(tiny_cfg, tiny_weights):
    model = build_model(tiny_cfg, tiny_weights)
    rf = tiny_cfg.receptive_field
    assert rf == 1 + tiny_cfg.n_layers * (tiny_cfg.kernel_size - 1)
    T, p = 40, 12
    ids = np.random.default_rng(3).integers(0, tiny_cfg.vocab_size, size=(1, T))
    base = _logits(model, ids)
    changed_ids = ids.copy()
    changed_ids[0, p] = (ids[0, p] + 1) % tiny_cfg.vocab_size
    changed = _logits(model, changed_ids)
    moved = np.abs(changed - base).max(axis=-1)[0] > 1e-6
    assert not moved[:p].any(), "a later token changed an earlier output"
    assert moved[p:p + rf].all(), "outputs inside the receptive field did not move"
    assert not moved[p + rf:].any(), "an output beyond the receptive field moved"


@pytest.mark.parametrize("n,m", [(0, 1), (0, 5), (1, 2), (1, 7), (2, 3), (3, 20), (7, 8), (19, 64), (63, 64)])
def test_chunk_step_equals_full_forward(tiny_cfg, tiny_weights, n, m):
    model = build_model(tiny_cfg, tiny_weights)
    ids = torch.from_numpy(np.random.default_rng(n * 100 + m).integers(0, tiny_cfg.vocab_size, size=(2, 64)))
    with torch.no_grad():
        full, _ = model.prefill(ids)
        state = model.empty_state(2) if n == 0 else model.prefill(ids[:, :n])[1]
        chunk, _ = model.step(ids[:, n:m], torch.full((2, 1), n), state)
    torch.testing.assert_close(chunk, full[:, n:m], rtol=0, atol=1e-5)


def test_state_holds_the_last_k_minus_1_ln1_outputs(tiny_cfg, tiny_weights):
    model = build_model(tiny_cfg, tiny_weights)
    ids = torch.tensor([[5, 9, 11, 2]])
    with torch.no_grad():
        x = model.token_embedding(ids) + model.pos_embedding(torch.arange(4))
        h0 = model.blocks[0].ln1(x)
        _, state1 = model.prefill(ids[:, :1])
        _, state4 = model.prefill(ids)
    k1 = tiny_cfg.state_len
    # One token: [0, h0] for k = 3 (positions below 0 are zero rows).
    assert torch.equal(state1[0, 0, 0], torch.zeros(tiny_cfg.d_model))
    torch.testing.assert_close(state1[0, 0, 1], h0[0, 0])
    torch.testing.assert_close(state4[0, 0], h0[0, 4 - k1:])


def test_infer_config_from_shapes(tiny_cfg, tiny_weights):
    shapes = {k: v.shape for k, v in tiny_weights.items()}
    assert infer_config(shapes) == tiny_cfg.replace(dropout=GAMConfig().dropout)
