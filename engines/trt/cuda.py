"""The TensorRT runner's device layer: torch CUDA tensors as buffers, one stream, and CUDA-graph capture.

torch is imported when a device is made, never at import (see the package notes).
"""

from __future__ import annotations

import numpy as np

from .environment import import_torch_cuda


def device_scope(device: int):
    """Make ``device`` the current CUDA device while TensorRT builds or loads (it uses the current device)."""
    torch = import_torch_cuda()
    return torch.cuda.device(device)


def _host_array(array: np.ndarray, dtype: str | None = None) -> np.ndarray:
    """A C-contiguous, writeable host array (torch.from_numpy warns on read-only ones)."""
    array = np.ascontiguousarray(array, dtype=dtype)
    return array if array.flags.writeable else array.copy()


class TorchCudaDevice:
    """Device buffers as torch CUDA tensors, one CUDA stream, and CUDA graphs captured on that stream with torch's
    ``torch.cuda.graph``; host arrays cross as NumPy. Everything is enqueued on the runner's own (non-default)
    stream, which is also the stream TensorRT executes on."""

    def __init__(self, index: int = 0):
        torch = import_torch_cuda()
        self.torch = torch
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(device=self.device)

    def activate(self):
        """Context in which this device is CUDA's current device (TensorRT uses the current device)."""
        return self.torch.cuda.device(self.device)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def upload(self, array: np.ndarray):
        """A new device buffer holding ``array``."""
        array = _host_array(array)
        with self.torch.cuda.stream(self.stream):
            return self.torch.from_numpy(array).to(self.device, non_blocking=False)

    def empty(self, shape: tuple[int, ...], dtype: str):
        with self.torch.cuda.stream(self.stream):
            return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def copy_in(self, buffer, array: np.ndarray) -> None:
        """``array`` into an existing device buffer of its shape and dtype (the buffer keeps its address)."""
        source = self.torch.from_numpy(_host_array(array))
        with self.torch.cuda.stream(self.stream):
            buffer.copy_(source)

    def copy(self, dst, src) -> None:
        """Device to device on the stream; no host round trip."""
        with self.torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    @staticmethod
    def address(buffer) -> int:
        return int(buffer.data_ptr())

    def download(self, buffer) -> np.ndarray:
        """A host copy, never a view: reused buffers are overwritten by the next call."""
        with self.torch.cuda.stream(self.stream):
            return buffer.to("cpu", copy=True).numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()

    # CUDA graphs (torch's: the runner already works over torch CUDA tensors)
    def new_graph(self):
        return self.torch.cuda.CUDAGraph()

    def capture(self, graph):
        """Context that captures what is enqueued on the runner's stream into ``graph`` instead of running it.

        ``thread_local``: only this thread's CUDA calls may not be capture-unsafe while it captures."""
        return self.torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local")

    def replay(self, graph) -> None:
        with self.torch.cuda.stream(self.stream):  # CUDAGraph.replay launches on the current stream
            graph.replay()
