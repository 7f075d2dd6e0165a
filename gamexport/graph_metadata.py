"""The gamexport config a graph file carries in its metadata, and its agreement with the graph itself.

Imports neither onnx nor numpy: ONNX Runtime's runner reads the config from a session's metadata map and checks it
against the session's inputs and outputs and the embedding shapes ``gamexport.onnxfile`` read from the file, so
running a build folder never imports onnx. ``gamexport.graph.builder`` writes the metadata and re-exports these
names for callers that hold an ``onnx.ModelProto`` (``read_graph_config``).
"""

from __future__ import annotations

from typing import Mapping

from .config import LOGITS, GAMConfig, refuse_legacy, state_layer
from .errors import GraphError
from .jsonfile import Obj, parse_json

#: Metadata key of the model's GAMConfig (JSON) in every graph file.
META_CONFIG = "gamexport.config"

#: The graph's embedding tables (initializers): their shapes give the vocabulary and the learned positions, which
#: an ONNX Runtime session does not show (it hides initializers).
EMBEDDING_TABLES = ("token_embedding.weight", "pos_embedding.weight")


def check_config_against_graph(cfg: GAMConfig, shapes: Mapping[str, list], where: str) -> None:
    """GraphError naming both values where the config in a graph's metadata disagrees with the graph itself.

    ``shapes``: tensor name → shape (None for a symbolic axis) of the graph's inputs and outputs, and of its
    embedding tables where known (an ONNX Runtime session shows only its inputs and outputs). A forged or mixed
    metadata would otherwise fail later, inside ONNX Runtime or as an index error.
    """
    said: dict[str, int | None] = {}
    refuse_legacy(shapes, where)
    layers = [layer for name in shapes if (layer := state_layer(name)) is not None]
    if layers:
        said["n_layers"] = max(layers) + 1
    for name, shape in shapes.items():
        if name == LOGITS and len(shape) == 3:
            said["vocab_size"] = shape[2]
        elif state_layer(name) is not None and len(shape) == 3:
            said.update(kernel_size=shape[1] and shape[1] + 1, d_model=shape[2])
        elif name == "token_embedding.weight" and len(shape) == 2:
            said["vocab_size"] = shape[0]
        elif name == "pos_embedding.weight" and len(shape) == 2:
            said["max_positions"] = shape[0]
    diff = [f"{field} {getattr(cfg, field)} in the metadata but {value} in the graph"
            for field, value in said.items() if value is not None and value != getattr(cfg, field)]
    if diff:
        raise GraphError(f"{where}: its gamexport config metadata disagrees with the graph ({'; '.join(diff)})",
                         "the file was edited or mixed from two builds; rebuild it with gamexport build")


def config_from_metadata(meta: Mapping[str, str], where: str) -> GAMConfig:
    """The GAMConfig in a graph's metadata (``metadata_props``, or an ONNX Runtime session's
    ``custom_metadata_map``); GraphError naming ``where`` when it is missing or not JSON."""
    if META_CONFIG not in meta:
        raise GraphError(f"{where} is empty or not a gamexport graph (no gamexport config metadata)",
                         "build it with gamexport build")
    data = parse_json(meta[META_CONFIG], f"{where}'s gamexport config metadata", schema=Obj(), error=GraphError,
                      fix="rebuild it with gamexport build")
    return GAMConfig.from_dict(data)
