"""Optimization profiles: the (batch, tokens) range an engine accepts, at min / opt / max.

Tokens are the sequence (prefill graph) or the chunk (step graph). The build turns a profile into TensorRT's
per-input shapes; the runner checks every call against it in Python, before TensorRT sees the shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from gamexport.config import GAMConfig, io_spec
from gamexport.errors import GraphError, InputError

TOKEN_AXIS = {"prefill": "sequence", "step": "chunk"}
DEFAULT_MAX_BATCH = 8


class ProfileError(InputError):
    """A batch/sequence outside an engine's optimization profile, or an invalid profile request."""


# ---- optimization profiles ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrtProfile:
    """One optimization profile: (batch, tokens) at min / opt / max; tokens = sequence (prefill) or chunk (step)."""

    graph: str
    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    @property
    def token_axis(self) -> str:
        return TOKEN_AXIS[self.graph]

    def bounds(self) -> str:
        return (f"batch {self.min[0]}..{self.max[0]}, "
                f"{self.token_axis} {self.min[1]}..{self.max[1]}")

    def check(self, batch: int, tokens: int, engine: str = "the TensorRT engine") -> None:
        """Refuse (one line, naming the bounds) a call shape outside this profile."""
        if self.min[0] <= batch <= self.max[0] and self.min[1] <= tokens <= self.max[1]:
            return
        raise ProfileError(
            f"batch {batch} × {self.token_axis} {tokens} is outside the optimization profile of {engine} "
            f"({self.bounds()})",
            f"split the input to fit, or rebuild the engine with a profile max of at least "
            f"{max(batch, self.max[0])}x{max(tokens, self.max[1])}")

    def input_shapes(self, cfg: GAMConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max shape of every graph input, derived from the I/O spec (symbolic axes filled in)."""
        out = {}
        for name, _dtype, dims in io_spec(cfg, self.graph)["inputs"]:
            triple = []
            for point in (self.min, self.opt, self.max):
                axes = {"batch": point[0], TOKEN_AXIS[self.graph]: point[1]}
                triple.append(tuple(axes[d] if isinstance(d, str) else int(d) for d in dims))
            out[name] = (triple[0], triple[1], triple[2])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "axes": ["batch", self.token_axis],
                "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrtProfile":
        try:
            return cls(str(data["graph"]), _pair(data["min"]), _pair(data["opt"]), _pair(data["max"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise GraphError(f"engine sidecar has no valid profile ({exc})", "rebuild the engine") from exc


def _pair(value) -> tuple[int, int]:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
        if not match:
            raise ValueError(f"{value!r} is not BATCHxTOKENS")
        return int(match.group(1)), int(match.group(2))
    b, t = value
    if isinstance(b, bool) or isinstance(t, bool) or int(b) != b or int(t) != t:
        raise ValueError(f"{value!r} is not a pair of integers")
    return int(b), int(t)


def default_profile(cfg: GAMConfig, graph: str) -> TrtProfile:
    """batch 1..8 (opt 1); prefill sequence 1..P (opt min(256, P)); step chunk 1..P (opt 1, i.e. decode)."""
    if graph not in TOKEN_AXIS:
        raise ValueError(f"graph must be 'prefill' or 'step', not {graph!r}")
    P = cfg.max_positions
    opt_tokens = min(256, P) if graph == "prefill" else 1
    return TrtProfile(graph, (1, 1), (1, opt_tokens), (DEFAULT_MAX_BATCH, P))


def make_profile(cfg: GAMConfig, graph: str, profile: Mapping[str, Any] | TrtProfile | None = None) -> TrtProfile:
    """A checked profile from ``{"min": "1x1", "opt": "1x64", "max": "8x256"}`` (or (batch, tokens) pairs).

    Missing keys take the defaults of :func:`default_profile`; tokens are sequence (prefill) or chunk (step).
    """
    base = default_profile(cfg, graph)
    if isinstance(profile, TrtProfile):
        spec: dict[str, Any] = {"min": profile.min, "opt": profile.opt, "max": profile.max}
    else:
        spec = dict(profile or {})
    unknown = sorted(set(spec) - {"min", "opt", "max"})
    if unknown:
        raise ProfileError(f"unknown profile keys {unknown}", "use min, opt and max, each BATCHxTOKENS")
    points = {}
    for key in ("min", "opt", "max"):
        try:
            points[key] = _pair(spec[key]) if key in spec else getattr(base, key)
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"profile {key} {spec[key]!r} is not BATCHxTOKENS ({exc})",
                               "write it like 1x64 (batch 1, 64 tokens)") from None
    lo, mid, hi = points["min"], points["opt"], points["max"]
    axis = TOKEN_AXIS[graph]
    for i, label in ((0, "batch"), (1, axis)):
        if not 1 <= lo[i] <= mid[i] <= hi[i]:
            raise ProfileError(f"profile {label} must satisfy 1 <= min <= opt <= max, got "
                               f"{lo[i]} / {mid[i]} / {hi[i]}", "fix --min/--opt/--max")
    from gamexport.limits import MAX_PROFILE_BATCH

    if hi[0] > MAX_PROFILE_BATCH:
        raise ProfileError(f"profile max batch {hi[0]} exceeds {MAX_PROFILE_BATCH}",
                           f"use a max batch of at most {MAX_PROFILE_BATCH} (the engine allocates for it)")
    P = cfg.max_positions
    if hi[1] > P:
        raise ProfileError(f"profile max {axis} {hi[1]} exceeds the model's {P} learned positions",
                           f"use a max {axis} of at most {P}")
    return TrtProfile(graph, lo, mid, hi)
