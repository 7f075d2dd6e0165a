"""Test doubles for TensorRT and CUDA (see tests/fakes/trt.py)."""
