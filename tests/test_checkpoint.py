"""Checkpoints: reference-format .pt files, safetensors, tied weights, and clear refusals."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from gamexport.checkpoint import load_checkpoint, save_checkpoint
from gamexport.config import GAMConfig
from gamexport.errors import CheckpointError, ConfigError
from gamexport.model import build_model


def _reference_state_dict(cfg, weights):
    """What ``torch.save(GAM_Model(...).state_dict())`` holds: both names of the tied pair, same storage."""
    return build_model(cfg, weights).state_dict()


@pytest.mark.parametrize("tied", ["both", "token_embedding", "head"])
def test_reference_pt_loads(tmp_path, tiny_cfg, tiny_weights, tied):
    sd = dict(_reference_state_dict(tiny_cfg, tiny_weights))
    if tied == "token_embedding":
        del sd["head.weight"]
    elif tied == "head":
        del sd["token_embedding.weight"]
    path = tmp_path / "gam.pt"
    torch.save(sd, path)
    ckpt = load_checkpoint(path)
    assert ckpt.config.replace(dropout=tiny_cfg.dropout) == tiny_cfg  # inferred from shapes, no config.json
    for name, value in tiny_weights.items():
        np.testing.assert_array_equal(ckpt.weights[name], value)
    assert "head.weight" not in ckpt.weights


def test_inference_of_a_vocabulary_below_the_paper(tmp_path):
    cfg = GAMConfig(vocab_size=321, d_model=16, n_layers=3, n_slots=8, kernel_size=3, max_positions=20)
    torch.save(build_model(cfg, seed=0).state_dict(), tmp_path / "m.pth")
    assert load_checkpoint(tmp_path).config == cfg


def test_safetensors_round_trip_stores_tied_tensor_once(tmp_path, tiny_cfg, tiny_weights):
    from safetensors.numpy import load_file

    path = save_checkpoint(tmp_path, tiny_cfg, tiny_weights, meta={"trained": True})
    stored = load_file(str(path))
    assert "head.weight" not in stored and "token_embedding.weight" in stored
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.config == tiny_cfg and ckpt.meta["trained"] is True
    model = build_model(ckpt.config, ckpt.weights)
    assert model.head.weight is model.token_embedding.weight  # re-tied on load
    np.testing.assert_array_equal(model.head.weight.detach().numpy(), tiny_weights["token_embedding.weight"])


def test_differing_tied_pair_is_refused(tmp_path, tiny_cfg, tiny_weights):
    sd = {k: v.clone() for k, v in _reference_state_dict(tiny_cfg, tiny_weights).items()}
    sd["head.weight"][0, 0] += 1
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="token_embedding.weight and head.weight differ"):
        load_checkpoint(tmp_path / "m.pt")


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_problems_are_named(tmp_path, tiny_cfg, tiny_weights):
    sd = dict(_reference_state_dict(tiny_cfg, tiny_weights))
    bad = dict(sd)
    del bad["blocks.1.memory_bank"]
    torch.save(bad, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing 1 tensor.*blocks.1.memory_bank"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = dict(sd, **{"blocks.0.extra": torch.zeros(1)})
    torch.save(bad, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="unexpected tensor.*blocks.0.extra"):
        load_checkpoint(tmp_path / "extra.pt")
    bad = dict(sd, **{"blocks.0.gate.bias": torch.zeros(5)})
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"blocks.0.gate.bias has shape \(5,\), expected \(64,\)"):
        load_checkpoint(tmp_path / "shape.pt")
    nan = {k: v.clone() for k, v in sd.items()}
    nan["blocks.1.ffn.0.bias"][3] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="blocks.1.ffn.0.bias holds NaN"):
        load_checkpoint(tmp_path / "nan.pt")


def test_config_disagreeing_with_weights(tmp_path, tiny_cfg, tiny_weights):
    save_checkpoint(tmp_path, tiny_cfg, tiny_weights)
    data = json.loads((tmp_path / "config.json").read_text())
    data["n_slots"] = 99
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="n_slots: config 99 vs weights 16"):
        load_checkpoint(tmp_path)


def test_truncated_files_are_refused(tmp_path, tiny_cfg, tiny_weights):
    path = save_checkpoint(tmp_path, tiny_cfg, tiny_weights)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path)
    torch.save(_reference_state_dict(tiny_cfg, tiny_weights), tmp_path / "x.pt")
    (tmp_path / "x.pt").write_bytes((tmp_path / "x.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "x.pt")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_bfloat16_weights_load_as_float32(tmp_path, tiny_cfg, tiny_weights, fmt):
    """bfloat16 weights (NumPy has no bf16) load in both formats, widened exactly to float32: the bf16 rounding
    of each weight, no more — the safetensors path decodes the bits with NumPy alone."""
    from safetensors.torch import save_file

    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tiny_weights.items() if k != "head.weight"}
    if fmt == "safetensors":
        (tmp_path / "config.json").write_text(json.dumps(tiny_cfg.to_dict()))
        save_file(state, str(tmp_path / "model.safetensors"))
        ckpt = load_checkpoint(tmp_path)
    else:
        torch.save(state, tmp_path / "gam.pt")
        ckpt = load_checkpoint(tmp_path / "gam.pt")
    for name, value in state.items():
        assert ckpt.weights[name].dtype == np.float32
        np.testing.assert_array_equal(ckpt.weights[name], value.float().numpy(), err_msg=name)
    assert not np.array_equal(ckpt.weights["ln_f.bias"], tiny_weights["ln_f.bias"])  # really rounded to bf16
