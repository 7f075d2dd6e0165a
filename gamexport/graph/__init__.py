"""The custom ONNX graph of a GAM model, built directly from its weights (no tracing).

Every block is a call to the local function ``gam.Block``, which calls one function per path of the paper's
block: ``gam.CausalConv`` (local path), ``gam.MemoryRead`` (global path), ``gam.GatedFusion`` (the gate) and
``gam.FeedForward``. Weights are main-graph initializers named by the reference state_dict keys.
"""

from .builder import (FUNCTION_DOMAIN, IR_VERSION, OPSET, build_graph, export_graphs, inline, read_graph_config)

__all__ = ["FUNCTION_DOMAIN", "IR_VERSION", "OPSET", "build_graph", "export_graphs", "inline",
           "read_graph_config"]
