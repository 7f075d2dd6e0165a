"""The small interface every backend implements: prefill, chunk step, and generation on top of them.

A runner holds one model on one backend. Inputs are NumPy arrays: token ids int64 (B, T), position ids int64
(B, 1), streaming state float32 (B, L, k-1, d). The base class checks every input before the backend sees it
(ONNX Runtime's Gather silently wraps index -1 to the last row), and owns ``generate`` so that all runners share
one sampling loop.
"""

from __future__ import annotations

import abc
from typing import Sequence

import numpy as np

from .config import GAMConfig
from .errors import InputError
from .sampling import Sampler, SamplingConfig


class Runner(abc.ABC):
    """Lifecycle: construct (loads the model) → prefill/step/generate any number of times → close()."""

    #: report label, one of eager, eager-compile, onnxruntime-cpu, onnxruntime-cuda, onnxruntime-trt, tensorrt
    runtime: str = ""
    precision: str = "fp32"

    def __init__(self, config: GAMConfig):
        self.config = config

    # ---- backend hooks --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _prefill(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, T, V) float32 and state (B, L, k-1, d) for ids (B, T) from position 0."""

    @abc.abstractmethod
    def _step(self, ids: np.ndarray, position_ids: np.ndarray,
              state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, C, V) and the new state for a chunk ids (B, C) starting at position_ids (B, 1)."""

    def close(self) -> None:
        """Release backend resources (sessions, engines)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- checked public API ------------------------------------------------------------------------------
    def empty_state(self, batch: int = 1) -> np.ndarray:
        c = self.config
        return np.zeros((batch, c.n_layers, c.state_len, c.d_model), dtype=np.float32)

    def check_ids(self, ids, first_position: int | np.ndarray = 0) -> np.ndarray:
        """Token ids as int64 (B, T); refuses ids outside [0, V) and positions outside [0, P)."""
        arr = np.asarray(ids)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
            raise InputError(f"token ids must be a non-empty (batch, sequence) array, got shape {arr.shape}",
                             "pass at least one token")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"token ids must be integers, got {arr.dtype}", "pass integer token ids")
        V = self.config.vocab_size
        if arr.min() < 0 or arr.max() >= V:
            bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
            raise InputError(f"token id {bad} is outside the vocabulary [0, {V})",
                             "encode text with this model's tokenizer")
        first = np.asarray(first_position, dtype=np.int64).reshape(-1)
        P = self.config.max_positions
        if first.min() < 0 or first.max() + arr.shape[1] > P:
            raise InputError(f"positions {int(first.min())}..{int(first.max()) + arr.shape[1] - 1} exceed the "
                             f"model's {P} learned positions [0, {P})",
                             f"keep prompt plus generated tokens within {P} tokens")
        return arr.astype(np.int64, copy=False)

    def prefill(self, ids) -> tuple[np.ndarray, np.ndarray]:
        return self._prefill(self.check_ids(ids))

    def step(self, ids, position_ids, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = np.asarray(ids)
        batch = arr.shape[0] if arr.ndim == 2 else 1
        pos = np.asarray(position_ids, dtype=np.int64)
        pos = np.broadcast_to(pos.reshape(-1, 1), (batch, 1)).copy() if pos.size in (1, batch) else pos
        ids = self.check_ids(ids, pos)
        c = self.config
        want = (ids.shape[0], c.n_layers, c.state_len, c.d_model)
        state = np.asarray(state, dtype=np.float32)
        if state.shape != want:
            raise InputError(f"conv_state has shape {state.shape}, expected {want}",
                             "pass the state returned by prefill or the previous step")
        return self._step(ids, pos, state)

    def generate(self, ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 stop_ids: Sequence[int] = ()) -> list[int]:
        """New token ids after the prompt ``ids`` (one sequence).

        Stops after ``max_new_tokens``, at a token in ``stop_ids`` (included in the output), or when the next
        token would have to be fed at position P (the model has learned positions 0..P-1 only).
        """
        prompt = self.check_ids(np.asarray(list(ids), dtype=np.int64))
        sampler = Sampler(sampling or SamplingConfig())
        stops = set(int(s) for s in stop_ids)
        P = self.config.max_positions
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        logits, state = self._prefill(prompt)
        pos = prompt.shape[1]
        while True:
            token = sampler(logits[0, -1])
            out.append(token)
            if len(out) >= max_new_tokens or token in stops or pos >= P:
                return out
            logits, state = self._step(np.array([[token]], dtype=np.int64),
                                       np.array([[pos]], dtype=np.int64), state)
            pos += 1
