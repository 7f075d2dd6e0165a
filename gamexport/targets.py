"""The targets a build, a re-check or a bench can run on — the seed of one target registry (issue 13 item 2).

Today it holds the (runtime, precision) pairs that cannot run at all, with the reason a skipped row gives; the
planners (the build's ``plan_matrix``, the bench's ``runtimes.runner_plan``) read it. Dependency-free.
"""

from __future__ import annotations

#: (runtime, precision) pairs that cannot run, and why.
UNSUPPORTED = {
    ("onnxruntime-cpu", "bf16"): "ONNX Runtime's CPU provider has no bf16 kernels (MatMul, Add, Sigmoid); the bf16 "
                                 "graphs are for CUDA and TensorRT and are checked here structurally",
    ("onnxruntime-cuda", "int8-dyn"): "dynamic quantization (MatMulInteger) is a CPU-provider format",
    ("tensorrt", "int8-dyn"): "TensorRT takes explicit Q/DQ (int8), not MatMulInteger (int8-dyn)",
}
