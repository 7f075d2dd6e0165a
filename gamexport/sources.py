"""Where a command's weights come from: the user's checkpoint, the trained demo shipped in the package, seeded
weights of a preset, or a build folder's own fp32 graph.

``gamexport build`` and ``generate`` resolve their source with :func:`resolve_source`; ``gamexport bench`` also
accepts a build folder (:func:`checkpoint_from_build`). Reading a checkpoint file itself is
:mod:`gamexport.checkpoint`'s job.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from gamexport.checkpoint import Checkpoint, load_checkpoint
from gamexport.config import preset as get_preset
from gamexport.errors import ConfigError, GamexportError


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """sha256 over the weights' names and fp32 bytes, in name order: the identity of seeded weights."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def demo_folder() -> Path | None:
    """The trained demo model shipped inside the package, if this install has one."""
    folder = Path(__file__).resolve().parent / "demo"
    if not folder.is_dir():
        from importlib import resources
        folder = Path(str(resources.files("gamexport").joinpath("demo")))
    return folder if (folder / "model.safetensors").is_file() else None


def seeded_checkpoint(preset_name: str, seed: int = 0) -> Checkpoint:
    """Seeded, untrained weights of a preset: exact-math parity works, generated text is noise."""
    from gamexport.model import build_model, state_dict_numpy

    cfg = get_preset(preset_name)
    weights = state_dict_numpy(build_model(cfg, seed=seed))
    return Checkpoint(config=cfg, weights=weights, source=f"<seeded '{preset_name}' preset, seed {seed}>",
                      sha256=weights_sha256(weights),
                      meta={"trained": False, "label": f"untrained: '{preset_name}' preset, seed {seed}"})


def resolve_source(source: str | None, preset_name: str | None) -> Checkpoint:
    """The checkpoint at ``source``; without one, seeded weights of ``preset_name``, or (neither given) the
    shipped demo model where this install has it, else seeded weights of the paper preset."""
    if source is not None:
        if preset_name is not None:
            raise ConfigError("--preset chooses seeded weights and cannot be combined with a SOURCE",
                              "drop --preset (the config comes from the checkpoint)")
        return load_checkpoint(source)
    if preset_name is None:
        demo = demo_folder()
        if demo is not None:
            return load_checkpoint(demo)
        preset_name = "paper"
    return seeded_checkpoint(preset_name)


def checkpoint_from_build(folder: Path) -> Checkpoint:
    """The weights of a build folder, read back from its fp32 ``model.onnx`` (checked against the manifest first);
    ``trained`` and ``label`` from its ``config.json`` where it has a readable one."""
    import onnx
    from onnx import numpy_helper

    from gamexport.graph.builder import META_SOURCE_SHA, read_graph_config
    from gamexport.jsonfile import MIB, Obj, read_json
    from gamexport.manifest import verify

    verify(folder, ["model.onnx"])
    model = onnx.load(str(folder / "model.onnx"))
    cfg, meta = read_graph_config(model)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    info = {}
    if (folder / "config.json").is_file():
        try:
            info = read_json(folder / "config.json", schema=Obj(), max_bytes=MIB)
        except (OSError, GamexportError):
            info = {}
    meta_out = {k: info[k] for k in ("trained", "label") if k in info}
    return Checkpoint(config=cfg, weights=weights, source=str(folder), sha256=meta.get(META_SOURCE_SHA, ""),
                      meta=meta_out)
