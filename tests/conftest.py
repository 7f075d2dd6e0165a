"""Shared fixtures: the tiny preset's seeded weights and one build folder made from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gamexport.config import PRESETS, GAMConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_cfg() -> GAMConfig:
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_weights(tiny_cfg) -> dict[str, np.ndarray]:
    from gamexport.model import build_model, state_dict_numpy

    weights = state_dict_numpy(build_model(tiny_cfg, seed=0))
    # Seeded init leaves biases and LayerNorm affine at 0/1; randomise them so every term is exercised.
    rng = np.random.default_rng(123)
    for name, value in weights.items():
        if name.endswith(("bias", "ln1.weight", "ln2.weight", "ln_f.weight")):
            weights[name] = (value + rng.normal(0, 0.2, value.shape)).astype(np.float32)
    return weights


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, tiny_cfg, tiny_weights) -> Path:
    """A complete build folder of the tiny model (latency measured briefly)."""
    from gamexport.checkpoint import save_checkpoint
    from gamexport.pipeline import BuildOptions, build

    src = tmp_path_factory.mktemp("tiny_ckpt")
    save_checkpoint(src, tiny_cfg, tiny_weights, meta={"trained": False})
    out = tmp_path_factory.mktemp("builds") / "tiny"
    build(BuildOptions(source=str(src), out=out, threads=1, latency_runs=3,
                       precisions=("fp32", "fp16", "bf16", "int8", "int8-dyn")))
    return out


@pytest.fixture(scope="session")
def forkserver():
    """The multiprocessing forkserver that runs commands in forked children (tests/forkrun.py), started once."""
    import forkrun

    return forkrun.server()


@pytest.fixture(scope="session")
def eager_tiny(tiny_cfg, tiny_weights):
    from gamexport.engines.eager import EagerRunner

    return EagerRunner(tiny_cfg, tiny_weights, threads=1)


_BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def __init__(self, names): self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.names:
            raise ImportError(f'{name} is blocked by the test')
sys.meta_path.insert(0, Block(NAMES))
"""


@pytest.fixture(scope="session")
def blocker():
    """Python source that makes importing the given top-level packages fail (prepend it to a subprocess's code)."""
    return lambda names: _BLOCKER.replace("NAMES", repr(set(names)))


def _names_before_scoping(model):
    """``model`` as the builder wrote it before function names were scoped: ``Block/x`` → ``x`` in every body
    (byte-identical to those graphs). They bound ``gam.FeedForward``'s formal ``x`` to ``x1`` inside a block whose
    own input is ``x``, which onnx-tensorrt resolves to the block's ``x``."""
    import onnx

    old = onnx.ModelProto()
    old.CopyFrom(model)
    for f in old.functions:
        bare = lambda names, p=f"{f.name}/": [n.removeprefix(p) for n in names]  # noqa: E731
        f.input[:], f.output[:] = bare(f.input), bare(f.output)
        for node in f.node:
            node.input[:], node.output[:] = bare(node.input), bare(node.output)
    return old


@pytest.fixture(scope="session")
def names_before_scoping():
    return _names_before_scoping
