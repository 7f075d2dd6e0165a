"""The typed rows of a report: one parity comparison (:class:`ParityRow`), one latency measurement (:class:`LatencyRow`).

As Polygraphy's ``comparator/struct.py`` types what its comparator returns, these type what the build and
``gamexport parity`` return. ``to_dict()`` writes the row as report.json holds it (``gamexport/report.schema.json``:
``parity_row``, ``latency_row``); the schema is the contract, these classes only build it in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class ParityRow:
    """One runner's output on one input, compared with one reference.

    ``metrics`` is what :func:`gamexport.parity.metrics.compare_logits` (or ``half_plan_metrics``) returned: the
    measured differences, the tolerances, ``gated`` and ``passed``. The optional fields are written only when set.
    """

    runtime: str            # eager, onnxruntime-cpu, tensorrt, …
    precision: str          # fp32, fp16, bf16, int8, int8-dyn
    graph: str              # prefill or step
    artifact: str           # the file that ran (model.fp16.onnx, tensorrt/step.fp16.plan, …)
    reference: str          # eager-fp32, float64-numpy, emulation-…
    input: str              # the feed's label: random, repeat, ngram, text, calibration-text, random+ngram, …
    batch: int
    seq_len: int
    metrics: dict[str, Any]
    chunks: list[int] | None = None       # the step graph was fed in chunks of these sizes
    compute_precision: str | None = None  # what the runner multiplies in (reduced-precision rows)
    note: str | None = None               # a label a reader needs (precision notes, why informational)
    cuda_graph: bool | None = None        # TensorRT step rows: decode steps replayed CUDA graphs

    @classmethod
    def of(cls, runtime: str, graph: str, artifact: str, reference: str, input_name: str, ids: np.ndarray,
           metrics: dict, precision: str = "fp32", **optional) -> ParityRow:
        """A row for ``ids`` (batch × seq_len token ids)."""
        return cls(runtime, precision, graph, artifact, reference, input_name, int(ids.shape[0]), int(ids.shape[1]),
                   metrics, **optional)

    @property
    def gated(self) -> bool:
        return bool(self.metrics.get("gated", True))

    @property
    def passed(self) -> bool:
        return bool(self.metrics["passed"])

    def informational(self, note: str, input_name: str | None = None) -> None:
        """Keep the row as a measurement that is not a gate (it neither passes nor fails a run), saying why."""
        self.metrics.update(gated=False, passed=True)
        if input_name is not None:
            self.input = input_name
        self.note = f"{self.note}; {note}" if self.note else note

    def to_dict(self) -> dict[str, Any]:
        """The row as report.json holds it: who ran what against what, the metrics, then the optional fields."""
        row = {"runtime": self.runtime, "precision": self.precision, "graph": self.graph, "artifact": self.artifact,
               "reference": self.reference, "input": self.input, "batch": self.batch, "seq_len": self.seq_len,
               **self.metrics}
        for key in ("chunks", "compute_precision", "note", "cuda_graph"):
            value = getattr(self, key)
            if value is not None:
                row[key] = value
        return row


@dataclass
class LatencyRow:
    """One timed mode (batch-1 prefill of ``seq_len`` tokens, or one decode step) of one runner.

    ``timing`` is :meth:`gamexport.bench.Timing.as_dict` (p50/p90/p99 ms, runs, noisy, …). What the machine's
    limits add to a row (achieved, limit, fraction, …) is added to its dict by ``annotate_latency``.
    """

    runtime: str
    precision: str
    mode: str               # prefill or decode
    batch: int
    seq_len: int
    timing: dict[str, Any]
    threads: int | None
    speedup_vs_eager: float | None = None

    @property
    def graph(self) -> str:
        return "prefill" if self.mode == "prefill" else "step"

    @property
    def p50_ms(self) -> float:
        return float(self.timing["p50_ms"])

    @property
    def tokens_per_s(self) -> float:
        return self.batch * (self.seq_len if self.mode == "prefill" else 1) / (self.p50_ms / 1e3)

    def to_dict(self) -> dict[str, Any]:
        """The row as report.json holds it."""
        row = {"runtime": self.runtime, "precision": self.precision, "graph": self.graph, "mode": self.mode,
               "batch": self.batch, "seq_len": self.seq_len, **self.timing, "tokens_per_s": self.tokens_per_s,
               "threads": self.threads}
        if self.speedup_vs_eager is not None:
            row["speedup_vs_eager"] = self.speedup_vs_eager
        return row
