"""Is there a usable NVIDIA GPU? Asked of torch or the driver — never of ``onnxruntime.get_available_providers()``,
which lists CUDA and TensorRT on a CPU-only machine and then falls back to the CPU silently."""

from __future__ import annotations

import shutil
import subprocess


def cuda_status() -> tuple[bool, str]:
    """(usable, why): torch's view when torch is installed, else whether ``nvidia-smi -L`` lists a GPU."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return True, f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
            return False, f"torch {torch.__version__} sees no CUDA GPU"
        except Exception as exc:  # a broken CUDA install is no GPU for our purposes
            return False, f"torch's CUDA check failed: {exc}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "no NVIDIA driver (nvidia-smi not found)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nvidia-smi failed: {exc}"
    gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return (True, gpus[0]) if gpus else (False, "nvidia-smi lists no GPU")
