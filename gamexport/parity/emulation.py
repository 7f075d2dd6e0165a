"""Emulation references: the parity rows that compare a reduced-precision graph with an independent emulation of
its own plan, tight enough to catch one-layer bugs that hide under the precision's noise against eager fp32.

- ``emulation-fp16-weights``: fp32 math (eager PyTorch) on fp16-rounded weights — what ONNX Runtime's CPU
  provider computes with an fp16 graph — under the fp32 tolerance, logits and state.
- ``emulation-bf16-weights``: the same on bf16-rounded weights, for the bf16 graphs' structural run on the CPU
  (``engines.ort.bf16_structural_runner``: bf16 weights upcast to fp32, bf16 casts made fp32).
- ``emulation-int8``: the NumPy fake-quant emulation of the INT8 plan (``gamexport.graph.emulate_int8``: the
  same per-channel weight scales, the calibration table's activation scales), against the int8 graph run as
  written (``OrtRunner.plan_runner``: ``engines.ort.QDQ_REFERENCE``), under ``parity.INT8_PLAN``, logits and state.
- ``emulation-int8-dyn``: the NumPy emulation of ONNX Runtime's dynamic quantization
  (``gamexport.graph.emulate_int8.int8_dynamic_plan``: the checkpoint's fp32 weights quantized as
  ``quantize_dynamic`` does, each activation quantized per call with its own run-time scale), against the int8-dyn
  graph with exact integer MatMuls (``OrtRunner.plan_runner``: ``engines.ort.exact_int8_dynamic_runner``), under
  ``parity.INT8_DYN_PLAN``, logits and state. Its scales depend on each call's whole tensor, so a chunked step run
  is emulated chunk by chunk.
- ``emulation-int4``: the float64 emulation of the INT4 plan (``gamexport.graph.emulate_int4``: the checkpoint's
  weights fake-quantized to 4-bit blocks, the head to 8-bit blocks) at accuracy level 0, against the INT4 graphs'
  level-0 twin (``OrtRunner.plan_runner``: ``engines.ort.int4_level0_runner``), under ``parity.INT4_PLAN``.

The build computes them on its parity inputs and keeps them in ``DIR/parity/`` beside eager fp32's outputs
(Polygraphy JSON, ``prefill_outputs.<reference>.json`` / ``step_outputs.<reference>.json``), so that
``gamexport parity DIR`` re-checks with the same strength as the build.

Which runner an emulation describes, the runner says (:meth:`gamexport.runtime.Runner.plan_runner`: ONNX Runtime's
CPU provider, or none): this module imports no engine, and runs the weight-rounding emulations on the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from gamexport import layout
from gamexport.config import INPUT_IDS, LOGITS, POSITION_IDS, last_position
from gamexport.state import packed_past, packed_present, present_tensors

from .metrics import (INT4_PLAN, INT8_DYN_PLAN, INT8_PLAN, Tolerance, chunk_ends, compare_logits, run_chunks,
                      tolerance)
from .rows import ParityRow

@dataclass(frozen=True)
class Emulation:
    """One emulation reference: the precision whose graphs it checks, how to make it from the checkpoint, and its
    gate. Adding an emulation is one entry of :data:`EMULATIONS`; the build, ``gamexport parity`` and the zoo read
    them from there."""

    name: str
    precision: str
    #: (checkpoint, calibration table or None, INT4 plan or None) → fn(ids, position=0, state=None,
    #: last_only=False) -> (logits, state) (``last_only``: the last position's logits, as a step graph returns
    #: them); None when this build cannot make it (INT8 without a calibration table)
    make: Callable
    #: its gate
    tolerance: Tolerance
    #: it describes graphs computed in fp32 only (weight rounding: the CPU provider upcasts half weights)
    fp32_compute: bool = False

    @property
    def per_call(self) -> bool:
        """Its plan depends on each call's whole input (run-time activation scales): a chunked run is emulated
        chunk by chunk."""
        return layout.precision(self.precision).runtime_scales


def reference_files(name: str) -> tuple[str, str]:
    return f"prefill_outputs.{name}.json", f"step_outputs.{name}.json"


def int8_table(cfg, weights: Mapping[str, np.ndarray], calibration: Mapping[str, float]) -> dict[str, np.ndarray]:
    from gamexport.graph.builder import int8_initializers

    return int8_initializers(cfg, weights, calibration)


def rounded_weights(cfg, weights: Mapping[str, np.ndarray], precision: str) -> Callable:
    """fp32 math on ``precision``-rounded weights — eager PyTorch, ``gamexport.model`` — as fn(ids, position=0,
    state=None) -> (logits, state): a prefill without ``state``, else a chunk step from ``position``. Its outputs
    are not checked for NaN: half-rounded weights may overflow, and then the rows fail, as the graph's do."""
    import torch

    from gamexport.graph.emulate import round_weights
    from gamexport.model import build_model

    model = build_model(cfg, round_weights(weights, precision))

    def run(ids, position=0, state=None, last_only=False):
        ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        with torch.inference_mode():
            if state is None:
                logits, new_state = model.prefill(ids)
            else:
                positions = torch.full((ids.shape[0], 1), position, dtype=torch.int64)
                logits, new_state = model.step(ids, positions, torch.from_numpy(np.asarray(state, dtype=np.float32)))
        return (last_position(logits) if last_only else logits).numpy(), new_state.numpy()
    return run


def _weights_emulation(precision: str) -> Callable:
    return lambda ckpt, calibration, int4: rounded_weights(ckpt.config, ckpt.weights, precision)


def _int8_emulation(ckpt, calibration, int4):
    from gamexport.graph.emulate_int8 import int8_plan

    if calibration is None:
        return None
    cfg, table = ckpt.config, int8_table(ckpt.config, ckpt.weights, calibration)
    return lambda ids, position=0, state=None, last_only=False: int8_plan(cfg, table, ids, position, state,
                                                                          last_only)


def _int8_dynamic_emulation(ckpt, calibration, int4):
    from gamexport.graph.emulate_int8 import int8_dynamic_plan, int8_dynamic_weights

    cfg, dyn = ckpt.config, int8_dynamic_weights(ckpt.config, ckpt.weights)
    return lambda ids, position=0, state=None, last_only=False: int8_dynamic_plan(cfg, dyn, ids, position, state,
                                                                                  last_only)


def _int4_emulation(ckpt, calibration, int4):
    """The INT4 plan the build writes (``int4``; ``Int4Plan()`` when None) at accuracy level 0: what the graphs'
    level-0 twin computes."""
    from gamexport.graph.emulate_int4 import int4_plan, int4_weights
    from gamexport.graph.int4 import Int4Plan

    cfg, plan = ckpt.config, int4 or Int4Plan()
    table, level0 = int4_weights(cfg, ckpt.weights, plan), replace(plan, accuracy_level=0)
    return lambda ids, position=0, state=None, last_only=False: int4_plan(cfg, table, ids, level0, position, state,
                                                                          last_only)


def _fp32_on_rounded_weights(precision: str) -> Tolerance:
    return replace(tolerance("fp32"), reason=f"must equal fp32 compute on {precision}-rounded weights")


#: Every emulation reference, in the order the rows are listed.
EMULATIONS: tuple[Emulation, ...] = (
    *(Emulation(f"emulation-{half}-weights", half, _weights_emulation(half), _fp32_on_rounded_weights(half),
                fp32_compute=True) for half in layout.HALF_PRECISIONS),
    Emulation("emulation-int8", "int8", _int8_emulation, INT8_PLAN),
    Emulation("emulation-int8-dyn", "int8-dyn", _int8_dynamic_emulation, INT8_DYN_PLAN),
    Emulation("emulation-int4", "int4", _int4_emulation, INT4_PLAN),
)
BY_NAME = {e.name: e for e in EMULATIONS}
#: reference name → the precision whose graphs it checks
REFERENCES = {e.name: e.precision for e in EMULATIONS}


def emulators(ckpt, precisions, calibration: Mapping[str, float] | None, int4=None) -> dict[str, Callable]:
    """reference name → fn(ids, position, state) -> (logits, state), for the precisions built (INT8 from its
    calibration table, INT4 from its plan, ``graph.int4.Int4Plan``)."""
    out: dict[str, Callable] = {}
    for e in EMULATIONS:
        if e.precision in precisions and (fn := e.make(ckpt, calibration, int4)) is not None:
            out[e.name] = fn
    return out


def write_emulation_references(folder: Path, emulate: Mapping[str, Callable], n_layers: int) -> list[str]:
    """Each emulation of ``emulate`` (:func:`emulators`: the ones the build's rows used) on the saved parity feeds
    (``DIR/parity/``); the files written, relative."""
    from gamexport.polyjson import load_feeds, save_run_results

    from .references import PARITY_DIR

    pdir = Path(folder) / PARITY_DIR
    pre, step = load_feeds(pdir / "prefill_inputs.json"), load_feeds(pdir / "step_inputs.json")
    written = []
    for name, fn in emulate.items():
        pre_out = [_outputs(*fn(f[INPUT_IDS])) for f in pre]
        step_out = [_outputs(*fn(f[INPUT_IDS], int(f[POSITION_IDS][0, 0]), packed_past(f, n_layers), last_only=True))
                    for f in step]
        for file, outs in zip(reference_files(name), (pre_out, step_out)):
            save_run_results(pdir / file, name, outs)
            written.append(f"{PARITY_DIR}/{file}")
    return written


def _outputs(logits: np.ndarray, state: np.ndarray) -> dict[str, np.ndarray]:
    """A saved reference output under the graphs' own output names."""
    return {LOGITS: logits, **present_tensors(state)}


def applicable(name: str, runner) -> bool:
    """Whether the emulation ``name`` is of the runner's precision and, for the weight-rounding ones, of graphs
    computed in fp32. Whether it describes the runner's backend, the runner's ``plan_runner`` says."""
    e = BY_NAME[name]
    return runner.precision == e.precision and (not e.fp32_compute or runner.compute_precision == "fp32")


def emulate_chunks(fn: Callable, ids: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """An emulation fed ``ids`` call by call in chunks of ``sizes`` from the zero state, as ``run_chunks`` feeds a
    step graph; the logits of each chunk's last position and the last state."""
    state, pos, outs = None, 0, []
    for size in sizes:
        logits, state = fn(ids[:, pos:pos + size], pos, state, last_only=True)   # as a step graph returns
        outs.append(logits)
        pos += size
    return np.concatenate(outs, axis=1), state


def build_rows(ckpt, runner, inputs: dict[str, np.ndarray], sizes: list[int], emulate: Mapping[str, Callable],
               threads: int | None, progress) -> list[ParityRow]:
    """The build's emulation rows for ``runner``: prefill and chunked step of each input vs each emulation."""
    rows = []
    for name, fn in emulate.items():
        test = runner.plan_runner(threads) if applicable(name, runner) else None
        if test is None:
            continue
        tol = BY_NAME[name].tolerance
        try:
            for label, ids in inputs.items():
                progress(f"parity: {runner.runtime} {runner.precision} vs {name} on '{label}' tokens")
                ref = fn(ids)
                for graph, (logits, state), artifact, more in (
                        ("prefill", test.prefill(ids), runner.model_path.name, {}),
                        ("step", run_chunks(test, ids, sizes), runner.step_path.name, {"chunks": sizes})):
                    per_call = graph == "step" and BY_NAME[name].per_call
                    ref_logits, ref_state = emulate_chunks(fn, ids, sizes) if per_call else ref
                    if graph == "step" and not per_call:   # the step rows hold the chunks' last positions
                        ref_logits = ref_logits[:, chunk_ends(sizes)]
                    metrics = compare_logits(ref_logits, logits, tol, states=(ref_state, state))
                    rows.append(ParityRow.of(runner.runtime, graph, artifact, name, label, ids, metrics,
                                             precision=runner.precision, **more))
        finally:
            if test is not runner:
                test.close()
    return rows


def recheck_rows(folder: Path, runner, feeds: dict, threads: int | None) -> list[ParityRow]:
    """``gamexport parity``'s emulation rows for ``runner`` from the references kept in ``DIR/parity/``.

    ``feeds``: {"prefill": (inputs, labels), "step": (inputs, labels)} as loaded by the re-check."""
    from gamexport.manifest import verify
    from gamexport.polyjson import load_run_results

    from .references import PARITY_DIR

    pdir = Path(folder) / PARITY_DIR
    rows = []
    for name in REFERENCES:
        files = reference_files(name)
        if not applicable(name, runner) or not all((pdir / f).is_file() for f in files):
            continue
        test = runner.plan_runner(threads)
        if test is None:
            continue
        tol = BY_NAME[name].tolerance
        try:
            verify(Path(folder), [f"{PARITY_DIR}/{f}" for f in files])
            for graph, file in zip(("prefill", "step"), files):
                inputs, labels = feeds[graph]
                refs = load_run_results(pdir / file)
                if len(refs) != len(inputs):
                    from gamexport.errors import GamexportError
                    raise GamexportError(f"{pdir / file} holds {len(refs)} outputs for {len(inputs)} inputs",
                                         "rebuild the folder with gamexport build")
                got, want, states, ref_states = [], [], [], []
                for feed, ref in zip(inputs, refs):
                    ids = feed["input_ids"]
                    if graph == "prefill":
                        logits, state = test.prefill(ids)
                    else:
                        logits, state = test.step(ids, feed[POSITION_IDS], packed_past(feed, runner.config.n_layers))
                    ref_states.append(packed_present(ref, runner.config.n_layers))
                    got.append(logits.reshape(-1, logits.shape[-1]))
                    want.append(ref["logits"].reshape(-1, logits.shape[-1]))
                    states.append(state)
                # One row per graph over every saved feed's positions together: a decode step is one position,
                # and one value rounding the other way must not decide a row alone (INT8_PLAN's median).
                metrics = compare_logits(np.concatenate(want)[None], np.concatenate(got)[None], tol,
                                         states=(np.concatenate(ref_states), np.concatenate(states)))
                path = runner.model_path if graph == "prefill" else runner.step_path
                rows.append(ParityRow(runner.runtime, runner.precision, graph, path.name, name,
                                      "+".join(dict.fromkeys(labels)), len(inputs), int(sum(g.shape[0] for g in got)),
                                      metrics))
        finally:
            if test is not runner:
                test.close()
    return rows


__all__ = ["Emulation", "EMULATIONS", "REFERENCES", "write_emulation_references", "build_rows", "recheck_rows"]
