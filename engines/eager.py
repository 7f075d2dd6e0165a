"""Eager PyTorch runner: the reference every other runner is compared against."""

from __future__ import annotations

import numpy as np

from gamexport.config import GAMConfig
from gamexport.runtime import Runner


class EagerRunner(Runner):
    """Runs ``gamexport.model.GAM`` in fp32 on the CPU; ``compile=True`` wraps it in ``torch.compile``."""

    def __init__(self, config: GAMConfig, weights, threads: int | None = None, compile: bool = False):
        import torch

        from gamexport.model import build_model

        super().__init__(config)
        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.model = build_model(config, weights)
        self.runtime = "eager-compile" if compile else "eager"
        self._prefill_fn = self.model.prefill
        self._step_fn = self.model.step
        if compile:
            self._prefill_fn = torch.compile(self.model.prefill, dynamic=True)
            self._step_fn = torch.compile(self.model.step, dynamic=True)

    def _prefill(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._torch.inference_mode():
            logits, state = self._prefill_fn(self._torch.from_numpy(ids))
        return logits.numpy(), state.numpy()

    def _step(self, ids, position_ids, state):
        t = self._torch
        with t.inference_mode():
            positions = t.from_numpy(np.ascontiguousarray(position_ids))                     # (B, C), checked
            logits, new_state = self._step_fn(t.from_numpy(ids), positions, t.from_numpy(state))
        return logits.numpy(), new_state.numpy()
