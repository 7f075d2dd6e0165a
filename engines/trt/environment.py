"""What a TensorRT plan is tied to, and how gamexport reaches TensorRT: the lazy imports, the errors, the one
process-wide TensorRT logger, this machine's TensorRT version and GPU, and the check that a plan belongs here.

TensorRT and torch are imported inside functions only (see the package notes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from gamexport.errors import GamexportError

INSTALL_FIX = ("on a machine with an NVIDIA GPU, pip install 'gamexport[tensorrt]' "
               "(TensorRT's wheels come from NVIDIA's own package index)")


# ---- errors -------------------------------------------------------------------------------------------------
class TensorRTError(GamexportError):
    """TensorRT is missing, broken, or refused to build or load an engine."""


class TensorRTMissingError(TensorRTError):
    """The ``tensorrt`` Python package (or a CUDA GPU) is not available."""


class EngineMismatchError(TensorRTError):
    """An engine built by another TensorRT version, for another GPU, or not matching its sidecar."""


# ---- lazy imports -------------------------------------------------------------------------------------------
def import_tensorrt():
    """The ``tensorrt`` module, or a one-line error that says how to get it."""
    try:
        import tensorrt
    except ModuleNotFoundError as exc:
        if (exc.name or "tensorrt").split(".")[0] == "tensorrt":
            raise TensorRTMissingError("TensorRT is not installed (Python package 'tensorrt' not found)",
                                       INSTALL_FIX) from exc
        raise TensorRTMissingError(f"TensorRT is installed but incomplete: {first_line(exc)}",
                                   f"reinstall it: {INSTALL_FIX}") from exc
    except (ImportError, OSError) as exc:  # e.g. libnvinfer.so missing or built for another CUDA
        raise TensorRTMissingError(f"TensorRT cannot be loaded: {first_line(exc)}",
                                   f"install a TensorRT that matches this machine's CUDA driver: {INSTALL_FIX}"
                                   ) from exc
    return tensorrt


def import_torch_cuda():
    try:
        import torch
    except ImportError as exc:
        raise TensorRTMissingError("the TensorRT runner needs torch for CUDA device buffers, and torch is not "
                                   "installed", "pip install a CUDA build of torch") from exc
    if not torch.cuda.is_available():
        raise TensorRTMissingError("no CUDA GPU is visible (torch.cuda.is_available() is False)",
                                   "run on a machine with an NVIDIA GPU, its driver and a CUDA build of torch")
    return torch


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:300] if text else type(exc).__name__)


# ---- the environment an engine belongs to -----------------------------------------------------------------
def runtime_environment(device: int = 0) -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of this machine (what a plan is tied to)."""
    trt = import_tensorrt()
    torch = import_torch_cuda()
    if not 0 <= device < torch.cuda.device_count():
        raise TensorRTMissingError(f"CUDA device {device} does not exist "
                                   f"({torch.cuda.device_count()} visible)", "pass a valid device index")
    props = torch.cuda.get_device_properties(device)
    return {"tensorrt_version": str(trt.__version__), "gpu_name": str(props.name),
            "compute_capability": f"{props.major}.{props.minor}"}


def check_engine_compatible(meta: Mapping[str, Any], env: Mapping[str, str], engine: str | Path = "engine") -> None:
    """Refuse (one line) a plan built by another TensorRT version or for another GPU than ``env`` describes.

    Pure Python: ``meta`` is the engine's sidecar, ``env`` what :func:`runtime_environment` returns.
    """
    name = Path(engine).name
    built_trt = meta.get("tensorrt_version")
    if built_trt != env.get("tensorrt_version"):
        raise EngineMismatchError(
            f"{name} was built by TensorRT {built_trt}, but this machine has TensorRT {env.get('tensorrt_version')} "
            "(a TensorRT plan only loads in the version that built it)",
            f"rebuild the engine here, or install tensorrt=={built_trt}")
    gpu = meta.get("gpu") or {}
    built_cc, here_cc = gpu.get("compute_capability"), env.get("compute_capability")
    built_name, here_name = gpu.get("name"), env.get("gpu_name")
    if built_cc != here_cc or built_name != here_name:
        raise EngineMismatchError(
            f"{name} was built for {built_name} (compute capability {built_cc}), but this GPU is {here_name} "
            f"(compute capability {here_cc}); a TensorRT plan is tuned for one GPU model",
            "rebuild the engine on this GPU")


# ---- the process's TensorRT logger ----------------------------------------------------------------------------
_LOGGER: dict[str, Any] = {}


def trt_logger(trt):
    """The process's one TensorRT logger; it keeps warnings and errors for our one-line messages.

    TensorRT holds a single logger pointer while any builder, runtime or refitter exists and ignores a different
    one passed later, so every builder and runtime here shares this object, which lives as long as the process.
    Callers read the messages logged after ``len(logger.records)``.
    """
    if _LOGGER.get("module") is not trt:

        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.records: list[tuple[str, str]] = []

            def log(self, severity, msg):
                name = getattr(severity, "name", str(severity)).split(".")[-1]
                if name in ("INTERNAL_ERROR", "ERROR", "WARNING"):
                    if len(self.records) > 2000:
                        del self.records[:1000]
                    self.records.append((name, str(msg)))

        _LOGGER.update(module=trt, logger=_Logger())
    return _LOGGER["logger"]


def last_error(records: list[tuple[str, str]]) -> str:
    errors = [m for s, m in records if s in ("INTERNAL_ERROR", "ERROR")]
    text = (errors or [m for _, m in records] or ["no message from TensorRT"])[-1]
    return text.strip().splitlines()[0][:300] if text.strip() else "no message from TensorRT"
