"""The small interface every backend implements: prefill, chunk step, and generation on top of them.

A runner holds one model on one backend. Inputs are NumPy arrays: token ids int64 (B, T), position ids int64
(B, T) — the absolute position of every token, increasing by one along T; ``step`` also takes the first position
per row, (B, 1) or a scalar — and the streaming state float32 (B, L, k-1, d), packed: the runners unpack it into
the graphs' per-layer tensors at each session call (``gamexport.state``). The base class checks every input before
the backend sees it (ONNX Runtime's Gather silently wraps index -1 to the last row), checks every output (a NaN or
infinite logit or state is refused in one line, never sampled into tokens), and owns ``generate`` so that all
runners share one sampling loop.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np

from .config import GAMConfig
from .errors import InputError, NonFiniteError
from .sampling import Sampler, SamplingConfig


@dataclass(frozen=True)
class RunnerDescription:
    """What a runner says about itself, for report rows and the bench (see :meth:`Runner.describe`).

    ``note``: one line on what it computes in (the parity rows' note); ``kernels``: the matrix-multiply ops it
    really runs, by op (ONNX Runtime's optimized graph; empty where the backend has none to read);
    ``cuda_graph``: the CUDA-graph status of a runner that can replay decode steps (None: it cannot), with
    ``cuda_graph_note`` saying it in one line.
    """

    runtime: str
    precision: str
    compute_precision: str
    note: str
    kernels: dict[str, int]
    cuda_graph: dict[str, Any] | None = None
    cuda_graph_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runner(abc.ABC):
    """Lifecycle: construct (loads the model) → prefill/step/generate any number of times → close().

    Besides running, a runner answers what the pipeline, parity and the bench ask it: ``runtime``, ``precision``,
    ``compute_precision``, ``matmul_ops``, the graph or engine files it runs (``model_path``, ``step_path``),
    :meth:`precision_note`, :meth:`cuda_graph_state`, :meth:`plan_runner`, :meth:`block_outputs` and
    :meth:`describe`. The defaults here fit a runner of an fp32 model in memory (eager PyTorch). Callers ask
    through these, never by probing a runner's attributes or comparing its backend's name.
    """

    #: report label, one of eager, eager-compile, onnxruntime-cpu, onnxruntime-cuda, onnxruntime-trt, tensorrt
    runtime: str = ""
    #: the precision of the weights and graph it runs
    precision: str = "fp32"
    #: the prefill and step graphs or engines it runs (None: no file, e.g. eager PyTorch)
    model_path: Path | None = None
    step_path: Path | None = None
    #: matrix-multiply ops by op type as the backend really runs them (empty: the backend has none to read)
    matmul_ops: Mapping[str, int] = MappingProxyType({})
    _compute_precision: str | None = None
    #: refuse non-finite outputs (NonFiniteError). Parity sets it False on the runner under test: there a NaN is a
    #: measured outcome, a failing row, not a bad input.
    check_finite: bool = True

    def __init__(self, config: GAMConfig):
        self.config = config

    # ---- what the runner says about itself ------------------------------------------------------------------
    @property
    def compute_precision(self) -> str:
        """The precision its matrix multiplies really run in (ONNX Runtime's CPU provider computes an fp16 graph
        in fp32); ``precision`` unless the backend says otherwise."""
        return self._compute_precision or self.precision

    @compute_precision.setter
    def compute_precision(self, value: str) -> None:
        self._compute_precision = value

    def precision_note(self) -> str:
        """One line on what this runner computes in, as the parity rows say it."""
        p = self.precision
        if p == "fp32":
            return "fp32 weights and MatMuls"
        if self.compute_precision == "fp32":
            return f"{p} weights, fp32 compute"
        return f"{p} weights and MatMuls"

    def cuda_graph_state(self) -> tuple[dict[str, Any], str] | None:
        """(status, one-line note) of CUDA-graph decode for a runner that can replay it; None where it cannot."""
        return None

    def plan_runner(self, threads: int | None = None) -> Runner | None:
        """The runner whose outputs parity's emulation references describe (``gamexport.parity.emulation``): this
        runner, or a new one over the same graphs (the caller closes it), or None where no emulation describes this
        backend's arithmetic — the default."""
        return None

    @property
    def prefill_is_chunk(self) -> bool:
        """Whether prefill runs as one chunk of a step graph (a runner over a step graph alone): its logits are then
        the last position's only, (B, 1, V). False by default: prefill returns every position's."""
        return False

    def block_outputs(self, ids: np.ndarray) -> list[np.ndarray] | None:
        """The residual stream after every block (``x_1 … x_L``) of a prefill of ``ids``, as this backend computes
        it — where a failing parity row starts to diverge; None where the backend cannot show it (the default)."""
        return None

    def describe(self) -> RunnerDescription:
        """Runtime, precisions, the note, the kernels and the CUDA-graph status, in one value."""
        graphs = self.cuda_graph_state()
        return RunnerDescription(self.runtime, self.precision, self.compute_precision, self.precision_note(),
                                 dict(self.matmul_ops), graphs[0] if graphs else None, graphs[1] if graphs else None)

    # ---- backend hooks --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _prefill(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, T, V) float32 and state (B, L, k-1, d) for ids (B, T) from position 0."""

    @abc.abstractmethod
    def _step(self, ids: np.ndarray, position_ids: np.ndarray,
              state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, C, V) or (B, 1, V) (the last position's) and the new state for a chunk ids (B, C) at
        positions position_ids (B, C), checked."""

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

    def check_ids(self, ids, position_ids: int | np.ndarray = 0) -> np.ndarray:
        """Token ids as int64 (B, T); refuses ids outside [0, V) and positions outside [0, P) (``position_ids``:
        the first position, per row or for all, or every token's position (B, T); see :meth:`positions`)."""
        arr = self._checked_tokens(ids)
        self.positions(arr.shape, position_ids)
        return arr

    def _checked_tokens(self, ids) -> np.ndarray:
        """Token ids as int64 (B, T), refused in one line outside [0, V) (positions are :meth:`positions`'s)."""
        arr = self._as_array(ids)
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
        return arr.astype(np.int64, copy=False)

    def positions(self, shape: tuple[int, int], position_ids) -> np.ndarray:
        """The (B, T) int64 position of every token of a (B, T) chunk, as the step graph takes them.

        ``position_ids``: every position (B, T), or the first position per row ((B, 1), (B,)) or for all rows (a
        scalar). Refused in one line: another shape, non-integers, positions outside [0, P), or positions that do
        not increase by one along T (the state carries exactly the previous token's row).
        """
        B, T = shape
        pos = np.asarray(position_ids)
        if pos.size == 0 or not np.issubdtype(pos.dtype, np.integer):
            raise InputError(f"position ids must be integers, got {pos.dtype} of shape {pos.shape}",
                             "pass int64 positions")
        if pos.ndim == 2 and pos.shape == (B, T):
            full = pos.astype(np.int64)
        elif pos.size in (1, B) and pos.ndim <= 2 and (pos.ndim < 2 or pos.shape[1] == 1):
            first = np.broadcast_to(pos.reshape(-1, 1), (B, 1)).astype(np.int64)
            full = first + np.arange(T, dtype=np.int64)[None, :]
        else:
            raise InputError(f"position ids have shape {pos.shape}, expected ({B}, {T}) for a chunk of {T} tokens "
                             f"(or the first position per row, ({B}, 1))", "pass every token's position")
        if T > 1 and (np.diff(full, axis=1) != 1).any():
            row = int(np.argwhere(np.diff(full, axis=1) != 1)[0][0])
            raise InputError(f"position ids of batch row {row} do not increase by one along the chunk "
                             f"({full[row].tolist()[:8]})", "pass consecutive positions: first + 0, 1, 2, …")
        P = self.config.max_positions
        if full.min() < 0 or full.max() >= P:
            raise InputError(f"positions {int(full[:, 0].min())}..{int(full.max())} exceed the "
                             f"model's {P} learned positions [0, {P})",
                             f"keep prompt plus generated tokens within {P} tokens")
        return full

    def _as_array(self, ids) -> np.ndarray:
        """``np.asarray(ids)``; Python ints beyond int64 (NumPy keeps them as objects) get the one line of any id
        outside the vocabulary, naming the id, rather than an OverflowError."""
        arr = np.asarray(ids)
        if arr.dtype == object and all(isinstance(i, (int, np.integer)) for i in arr.ravel()):
            bad = next((int(i) for i in arr.ravel() if not 0 <= int(i) < self.config.vocab_size), None)
            if bad is not None:
                raise InputError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})",
                                 "encode text with this model's tokenizer")
            arr = arr.astype(np.int64)
        return arr

    def check_outputs(self, graph: str, first_position: int | np.ndarray, logits: np.ndarray,
                      state: np.ndarray, length: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(logits, state) unchanged when finite; else NonFiniteError naming the runner, graph and the position.

        ``length``: the chunk's token count, when the logits may be its last positions only (a step graph's).

        One ``np.isfinite`` pass over what the backend returned: negligible next to computing it.
        """
        if not self.check_finite or (np.isfinite(logits).all() and np.isfinite(state).all()):
            return logits, state
        what, arr = ("logits", logits) if not np.isfinite(logits).all() else ("state", state)
        where = np.argwhere(~np.isfinite(arr))[0]
        first = np.asarray(first_position).reshape(-1)
        start = int(first[where[0]] if first.size > 1 else first[0])
        # a step graph's logits are the chunk's last position only: index 0 is position start + length - 1
        offset = int(where[1]) + (length - logits.shape[1] if length else 0)
        position = f"position {start + offset}" if what == "logits" else f"layer {int(where[1])}"
        kind = "NaN" if np.isnan(arr).any() else "infinite"
        artifact = self.step_path if graph == "step" else self.model_path
        name = f" ({artifact.name})" if artifact is not None else ""
        raise NonFiniteError(f"{self.runtime} {self.precision} {graph}{name} produced {kind} {what} at batch row "
                             f"{int(where[0])}, {position}",
                             "the weights or config.json overflow float32: check for huge weights and that ln_eps "
                             "is a small positive number, fix the checkpoint, then rebuild")

    def prefill(self, ids) -> tuple[np.ndarray, np.ndarray]:
        ids = self.check_ids(ids)
        return self.check_outputs("prefill", 0, *self._prefill(ids), length=ids.shape[1])

    def step(self, ids, position_ids, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the new state after a chunk; ``position_ids``: every token's position (B, C), or the first
        position per row (B, 1) or for all rows. The logits are (B, 1, V) — the chunk's last position, all that
        generation samples from — from gamexport's step graphs, and (B, C) from eager PyTorch and step graphs
        of earlier gamexport versions: ``logits[:, -1]`` is the next token's distribution either way."""
        arr = np.asarray(ids)
        batch = arr.shape[0] if arr.ndim == 2 else 1
        first = np.asarray(position_ids)
        if first.ndim < 2 and first.size in (1, batch):
            first = np.broadcast_to(first.reshape(-1, 1), (batch, 1))
        ids = self._checked_tokens(ids)
        pos = self.positions(ids.shape, first)   # checked once: every token's position (B, C)
        c = self.config
        want = (ids.shape[0], c.n_layers, c.state_len, c.d_model)
        state = np.asarray(state, dtype=np.float32)
        if state.shape != want:
            raise InputError(f"the streaming state has shape {state.shape}, expected {want}",
                             "pass the state returned by prefill or the previous step")
        return self.check_outputs("step", pos[:, :1], *self._step(ids, pos, state), length=ids.shape[1])

    def generate(self, ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 stop_ids: Sequence[int] = ()) -> list[int]:
        """New token ids after the prompt ``ids`` (one sequence).

        Stops after ``max_new_tokens``, at a token in ``stop_ids`` (included in the output), or when the next
        token would have to be fed at position P (the model has learned positions 0..P-1 only).
        """
        prompt = self.check_ids(list(ids))
        sampler = Sampler(sampling or SamplingConfig())
        stops = set(int(s) for s in stop_ids)
        P = self.config.max_positions
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        logits, state = self.check_outputs("prefill", 0, *self._prefill(prompt), length=prompt.shape[1])
        pos = prompt.shape[1]
        while True:
            token = sampler(logits[0, -1])
            out.append(token)
            if len(out) >= max_new_tokens or token in stops or pos >= P:
                return out
            logits, state = self.check_outputs("step", pos, *self._step(np.array([[token]], dtype=np.int64),
                                                                      np.array([[pos]], dtype=np.int64), state))
            pos += 1
