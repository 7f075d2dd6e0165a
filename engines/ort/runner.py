"""OrtRunner: a build folder's prefill and step graphs on one ONNX Runtime execution provider.

Imports numpy and onnxruntime only — never torch — so a build folder runs on a small box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gamexport import layout
from gamexport.config import INPUT_IDS, LOGITS, POSITION_IDS, GAMConfig, present_state_names, refuse_legacy
from gamexport.errors import GamexportError
from gamexport.graph_metadata import EMBEDDING_TABLES, check_config_against_graph, config_from_metadata
from gamexport.runtime import Runner
from gamexport.state import past_tensors, packed_present

from .session import QDQ_REFERENCE, RUNTIMES, block_outputs, compute_label, load_session, optimized_matmul_ops
from .transforms import exact_integer_matmuls, upcast_bf16


class OrtRunner(Runner):
    """Runs the prefill and step graphs with ONNX Runtime on one execution provider (CPU, CUDA or TensorRT).

    ``precision`` is the graph's storage precision; ``compute_precision`` what ORT actually multiplies in
    (for an fp16 graph on the CPU provider: fp32 — "fp16 weights, fp32 compute").
    """

    runtime = "onnxruntime-cpu"
    structural = False   # True: a parity-only run over rewritten graphs (bf16_structural_runner), never timed

    def __init__(self, model_path: str | Path | None, step_path: str | Path, config: GAMConfig | None,
                 threads: int | None = None, precision: str = "fp32", provider: str = "CPUExecutionProvider",
                 session_config: dict[str, str] | None = None):
        """``model_path=None``: step graph only — prefill runs as a chunk from the zero state at position 0
        (identical by construction; its logits are then the last position's only), so generation needs one
        session, one copy of the weights, and runs the tied head once per prompt.
        ``config=None``: read from the step session's metadata (no second parse of the file).
        ``session_config``: ONNX Runtime session entries (``QDQ_REFERENCE``: run Q/DQ pairs as written)."""
        if provider not in RUNTIMES:
            raise GamexportError(f"unknown ONNX Runtime provider {provider!r}", f"use one of {', '.join(RUNTIMES)}")
        self.step_path = Path(step_path)
        self.model_path = Path(model_path) if model_path is not None else self.step_path
        self.precision = precision
        self.provider = provider
        self.runtime = RUNTIMES[provider]
        # An .onnx step graph is read once, without onnx: its external data checked, and (below) its embedding
        # shapes taken from the same walk (gamexport.onnxfile).
        scanned = None
        if self.step_path.suffix == ".onnx" and self.step_path.is_file():
            from gamexport.onnxfile import check_external_data

            scanned = check_external_data(self.step_path, dims_of=EMBEDDING_TABLES)
        self.step_session = load_session(self.step_path, threads, provider, session_config,
                                         checked=scanned is not None)
        refuse_legacy([t.name for t in self.step_session.get_inputs()], str(self.step_path))
        if config is None:  # before the prefill session: a file that is not a gamexport graph stops here
            config = config_from_metadata(self.step_session.get_modelmeta().custom_metadata_map, str(self.step_path))
            shapes = {t.name: [d if isinstance(d, int) else None for d in t.shape]
                      for t in [*self.step_session.get_inputs(), *self.step_session.get_outputs()]}
            if scanned is not None:  # the session hides initializers: the positions are in the file
                shapes.update(scanned.initializer_dims)
            check_config_against_graph(config, shapes, str(self.step_path))
        super().__init__(config)
        self.prefill_session = (load_session(self.model_path, threads, provider, session_config) if model_path is not None
                                else None)
        self.matmul_ops: dict[str, int] = {}
        self.compute_precision = precision
        if precision != "fp32" and provider == "CPUExecutionProvider":
            self.matmul_ops = optimized_matmul_ops(self.model_path, threads)
            self.compute_precision = compute_label(self.matmul_ops)

    @classmethod
    def from_folder(cls, folder: str | Path, threads: int | None = None, inlined: bool = False,
                    precision: str = "fp32", step_only: bool = False) -> "OrtRunner":
        """A runner over a build folder; the config is read from the graph's metadata."""
        from gamexport.layout import graph_file

        folder = Path(folder)
        model_path = folder / graph_file("prefill", precision, inlined)
        step_path = folder / graph_file("step", precision, inlined)
        return cls(None if step_only else model_path, step_path, None, threads, precision)

    def precision_note(self) -> str:
        """The int8 variants name the ops the optimized graph multiplies with; fp16/bf16 on the CPU provider say
        that it computes them in fp32."""
        p = self.precision
        if self.structural:
            return BF16_STRUCTURAL
        if layout.precision(p).quantized:
            ops = ", ".join(f"{v}× {k}" for k, v in self.matmul_ops.items())
            return f"{p}: ONNX Runtime's optimized graph multiplies with {ops or 'what the provider chose'}"
        if p != "fp32" and self.compute_precision == "fp32":
            return f"{p} weights, fp32 compute (ONNX Runtime's CPU provider computes {p} MatMuls in fp32)"
        return super().precision_note()

    def plan_runner(self, threads: int | None = None) -> "OrtRunner | None":
        """The emulations describe ONNX Runtime's CPU provider: this runner (fp16/bf16 graphs computed in fp32), or
        a new runner over the same graphs — int8 with its Q/DQ pairs run as written (``QDQ_REFERENCE``), int8-dyn
        with exact integer MatMuls, int4 at accuracy level 0 (fp32 products of the same 4-bit weights) — that does
        not refuse NaN (parity's rows judge it). Other providers: None."""
        if self.provider != "CPUExecutionProvider":
            return None
        if self.precision == "int8-dyn":
            twin = exact_int8_dynamic_runner(self.model_path, self.step_path, self.config, threads)
        elif self.precision == "int8":
            twin = OrtRunner(self.model_path, self.step_path, self.config, threads, precision="int8",
                             session_config=QDQ_REFERENCE)
        elif self.precision == "int4":
            twin = int4_level0_runner(self.model_path, self.step_path, self.config, threads)
        else:
            return self
        twin.check_finite = False
        return twin

    def block_outputs(self, ids: np.ndarray) -> list[np.ndarray] | None:
        """Each block's output, read from the prefill graph on disk with those values made graph outputs (CPU
        provider, .onnx graphs only)."""
        if self.provider != "CPUExecutionProvider" or self.model_path.suffix != ".onnx":
            return None
        return block_outputs(self.model_path, ids, self.config.n_layers)

    @property
    def prefill_is_chunk(self) -> bool:
        """Built without a prefill graph (``model_path=None``): prefill is one chunk of the step graph."""
        return self.prefill_session is None and self.step_session is not None

    def _prefill(self, ids):
        if self.prefill_session is None:
            positions = np.ascontiguousarray(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape))
            return self._step(ids, positions, self.empty_state(ids.shape[0]))
        return self._run(self.prefill_session, {INPUT_IDS: ids})

    def _step(self, ids, position_ids, state):
        return self._run(self.step_session, {INPUT_IDS: ids, POSITION_IDS: position_ids, **past_tensors(state)})

    def _run(self, session, feeds):
        """Logits and the packed state from one session call (the graphs' per-layer states stacked)."""
        names = [LOGITS, *present_state_names(self.config)]
        out = dict(zip(names, session.run(names, feeds)))
        return out[LOGITS], packed_present(out, self.config.n_layers)

    def close(self) -> None:
        self.prefill_session = self.step_session = None


# ---- runners over rewritten graphs (parity references, never timed) ----------------------------------------
def _rewritten_runner(model_path: Path, step_path: Path, config: GAMConfig, threads: int | None, precision: str,
                      rewrite) -> "OrtRunner":
    """An OrtRunner over ``rewrite(graph)`` of both graphs (held in memory by the sessions); its paths, labels and
    rows name the graphs on disk."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:  # the sessions hold the graphs: the files may go
        paths = []
        for path in (model_path, step_path):
            paths.append(Path(tmp) / Path(path).name)
            onnx.save(rewrite(onnx.load(str(path))), str(paths[-1]))
        runner = OrtRunner(paths[0], paths[1], config, threads, precision=precision)
    runner.model_path, runner.step_path = Path(model_path), Path(step_path)
    return runner


def exact_int8_dynamic_runner(model_path: Path, step_path: Path, config: GAMConfig, threads: int | None
                              ) -> "OrtRunner":
    """A runner over int8-dyn graphs with exact integer MatMuls (:func:`exact_integer_matmuls`): the graphs'
    own arithmetic, comparable with the NumPy emulation of dynamic quantization to float rounding."""
    return _rewritten_runner(model_path, step_path, config, threads, "int8-dyn", exact_integer_matmuls)


def int4_level0_runner(model_path: Path, step_path: Path, config: GAMConfig, threads: int | None) -> "OrtRunner":
    """A runner over INT4 graphs with every MatMulNBits at ``accuracy_level`` 0: the same 4-bit weights and wiring
    multiplied in fp32, comparable with the float64 emulation of the INT4 plan to fp32 rounding (at level 4 the
    activations' int8 rounding is as large as a one-block bug)."""
    from gamexport.graph.emulate_int4 import with_accuracy_level

    return _rewritten_runner(model_path, step_path, config, threads, "int4", lambda m: with_accuracy_level(m, 0))


#: The note of rows computed by :func:`bf16_structural_runner`.
BF16_STRUCTURAL = ("bf16 structural run: ONNX Runtime's CPU provider has no bf16 kernels, so the bf16 graphs run "
                   "with their bf16 weights upcast to fp32 (exact) and their bf16 casts made fp32")


def bf16_structural_runner(model_path: Path, step_path: Path, config: GAMConfig, threads: int | None
                           ) -> "OrtRunner":
    """A runner over bf16 graphs on ONNX Runtime's CPU provider, through :func:`upcast_bf16`: precision "bf16",
    compute precision "fp32", ``structural`` True (never timed: it is not how a bf16 runtime computes)."""
    runner = _rewritten_runner(model_path, step_path, config, threads, "bf16", upcast_bf16)
    runner.structural = True
    runner.compute_precision = "fp32"  # no bf16 value is left (the optimized graph's types may read "other")
    return runner
