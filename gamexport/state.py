"""The streaming state at the graph boundary: the Runner API's one packed (B, L, k-1, d) array ↔ the graphs'
per-layer tensors ``past_key_values.{i}.conv_state`` (inputs) and ``present.{i}.conv_state`` (outputs), each
(B, k-1, d). Runners, parity feeds and references pack or unpack here, at each session call; nothing else
slices the state by layer name.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .config import past_state_name, present_state_name


def _split(state: np.ndarray, name) -> dict[str, np.ndarray]:
    state = np.asarray(state)
    if state.ndim != 4:
        raise ValueError(f"a packed state has shape (batch, layers, k-1, d), not {state.shape}")
    return {name(i): np.ascontiguousarray(state[:, i]) for i in range(state.shape[1])}


def past_tensors(state: np.ndarray) -> dict[str, np.ndarray]:
    """{``past_key_values.{i}.conv_state``: state[:, i]}: the step graph's state inputs."""
    return _split(state, past_state_name)


def present_tensors(state: np.ndarray) -> dict[str, np.ndarray]:
    """{``present.{i}.conv_state``: state[:, i]}: the graphs' state outputs."""
    return _split(state, present_state_name)


def _join(tensors: Mapping[str, np.ndarray], n_layers: int | None, name) -> np.ndarray:
    if n_layers is None:   # as many layers as the mapping holds, from 0 up
        n_layers = next(i for i in range(len(tensors) + 1) if name(i) not in tensors)
    return np.stack([np.asarray(tensors[name(i)]) for i in range(n_layers)], axis=1)


def packed_past(tensors: Mapping[str, np.ndarray], n_layers: int | None = None) -> np.ndarray:
    """The (B, L, k-1, d) state from the step graph's per-layer inputs (a saved feed); ``n_layers`` None: every
    layer the mapping holds."""
    return _join(tensors, n_layers, past_state_name)


def packed_present(tensors: Mapping[str, np.ndarray], n_layers: int | None = None) -> np.ndarray:
    """The (B, L, k-1, d) state from a graph's per-layer outputs (``n_layers`` None: every layer held)."""
    return _join(tensors, n_layers, present_state_name)
