"""Backends that run a GAM model: eager PyTorch (``eager``), ONNX Runtime (``ort``) and TensorRT (``trt``).

Import them as ``gamexport.engines.<name>``; optional dependencies (torch, onnxruntime, tensorrt) are imported
inside the module that needs them, never here.
"""
