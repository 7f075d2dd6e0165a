"""TensorRT engines for a build folder's graphs: build (ONNX → serialized plan + JSON sidecar) and run.

Written against TensorRT's Python API for 10.x and 11.x:

- networks are always **strongly typed** (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` where the flag exists;
  TensorRT 11 ignores it because every network is strongly typed there). The precision is therefore whatever the
  ONNX graph says; gamexport never sets the FP16/INT8/BF16 builder flags (removed in TensorRT 11, and ignored
  under strong typing in 10). ``EXPLICIT_BATCH`` is never used (ignored since 10.0, gone in 11). A requested
  precision that differs from the graph's is refused rather than silently built at another one.
- TF32 is switched off for fp32 graphs unless asked for (``BuilderFlag.TF32`` exists in 10 and 11), so an fp32
  engine computes fp32 matmuls.
- one optimization profile over batch × sequence (prefill) or batch × chunk (step); the runner checks every call
  against it in Python, before TensorRT sees the shapes.
- every engine gets a JSON sidecar (``<engine>.json``): TensorRT version, GPU name and compute capability, the
  profile, the builder settings and the sha256 of the ONNX file and of the engine. The runner refuses, in one
  line, an engine from another TensorRT version or for another GPU — a plan is only valid for both.
- a timing cache file beside the engines is loaded before and saved after every build, so a second build on the
  same GPU and TensorRT skips most tactic timing.
- a folder of engines is a cache that several processes may share: a builder holds an exclusive ``flock`` on
  ``<folder>/.gamexport-engines.lock`` from its reuse check to its last write, so two builds of one engine at
  once build it once (the second waits and reuses the first's plan) and never pair one's plan with the other's
  sidecar; a runner holds the lock shared while it reads a plan and its sidecar, so it never sees one without
  the other. Plans, sidecars and timing caches are written atomically; a writer's leftover temporaries are
  removed by the next builder. A plan that no longer matches its sidecar (truncated, replaced) is rebuilt by
  ``build_engine`` and refused in one line by the runner.

TensorRT and torch are imported inside functions only: this module imports on machines without them.
Device buffers are torch CUDA tensors (torch is on every GPU machine gamexport targets); inputs and outputs cross
as NumPy arrays, like every other runner. The step engine reuses its buffers while the (batch, chunk) shape stays
the same, keeps the streaming state on the GPU between steps, and can capture decode steps into CUDA graphs
(``TrtRunner(..., cuda_graph=True)``; see :class:`TrtRunner`).

The package holds one room per concern: ``environment`` (lazy imports, errors, this machine, plan compatibility),
``profile`` (optimization profiles), ``loader`` (build, sidecars, the engine cache and its lock), ``cuda`` (device
buffers, stream, CUDA-graph capture) and ``runner`` (``TrtRunner``). Import the names from here.
"""

from __future__ import annotations

from .cuda import TorchCudaDevice
from .environment import (EngineMismatchError, TensorRTError, TensorRTMissingError, check_engine_compatible,
                          import_tensorrt, runtime_environment)
from .loader import (CACHE_LOCK, DEFAULT_OPT_LEVEL, ENGINE_DIR, GRAPH_STEMS, SIDECAR_SCHEMA, build_engine,
                     build_engines, cache_lock, engine_paths, graph_precision, inlined_twin, read_engine,
                     read_sidecar, sidecar_path)
from .profile import DEFAULT_MAX_BATCH, TOKEN_AXIS, ProfileError, TrtProfile, default_profile, make_profile
from .runner import TrtRunner

__all__ = ["TrtRunner", "TrtProfile", "TorchCudaDevice", "build_engine", "build_engines", "check_engine_compatible",
           "cache_lock", "default_profile", "engine_paths", "graph_precision", "import_tensorrt", "inlined_twin",
           "make_profile", "read_engine", "read_sidecar", "runtime_environment", "sidecar_path", "CACHE_LOCK",
           "DEFAULT_MAX_BATCH", "DEFAULT_OPT_LEVEL", "ENGINE_DIR", "GRAPH_STEMS", "SIDECAR_SCHEMA", "TOKEN_AXIS",
           "EngineMismatchError", "ProfileError", "TensorRTError", "TensorRTMissingError"]
