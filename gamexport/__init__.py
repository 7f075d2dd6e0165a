"""gamexport: a Gated Associative Memory (GAM) language model, exported and checked outside PyTorch.

The core package (this folder) holds the model, its checkpoints, the custom ONNX graph, parity metrics and the
latency harness. ``gamexport.engines`` runs the graphs, ``gamexport.training`` trains models and
``gamexport.cli`` is the ``gamexport`` command. The core never imports engines or cli.
"""

__version__ = "0.1.0"
