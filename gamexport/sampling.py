"""One NumPy sampler shared by every runner, so all runners yield the same tokens for the same seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .limits import MAX_SEED, MAX_TOP_K, check_range, check_temperature


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when ``temperature == 0``; otherwise temperature, then top-k, then top-p (nucleus) filtering.

    Bounds (``gamexport.limits``): temperature 0 or 1e-3..100 (a tinier one overflows logits/T: it is refused,
    not silently made greedy), top-k 0..2**20, top-p in (0, 1], seed 0..2**32-1.
    """

    temperature: float = 0.0
    top_k: int = 0          # 0 = no top-k filter
    top_p: float = 1.0      # 1 = no nucleus filter
    seed: int = 0

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_range("top-k", self.top_k, 0, MAX_TOP_K)
        check_range("seed", self.seed, 0, MAX_SEED)
        if not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], got {self.top_p}", "use 1 to disable it")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Draws the next token from one row of logits; deterministic for a given seed and logits sequence."""

    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.Generator(np.random.PCG64(cfg.seed))

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.cfg.greedy:
            return int(np.argmax(logits))
        z = logits / self.cfg.temperature
        if 0 < self.cfg.top_k < z.size:
            kth = np.partition(z, -self.cfg.top_k)[-self.cfg.top_k]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.cfg.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.cfg.top_p) + 1)]
            mask = np.zeros_like(p, dtype=bool)
            mask[keep] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        # Inverse-CDF draw from one uniform: identical across platforms for identical probabilities.
        u = self.rng.random()
        idx = int(np.searchsorted(np.cumsum(p), u * p.sum(), side="right"))
        return min(idx, p.size - 1)
