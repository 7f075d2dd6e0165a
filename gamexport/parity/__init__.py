"""Where parity lives: is a runner's output the reference's output, and what does a set of such rows say?

- ``metrics.py``: the tolerance table, ``compare_logits`` / ``compare_state``, the parity inputs, the verdict.
- ``rows.py``: ``ParityRow`` and ``LatencyRow``, the typed rows of report.json.
- ``references.py``: the parity inputs and eager fp32's outputs a build keeps in ``DIR/parity/`` (Polygraphy JSON),
  written by the build and read by ``gamexport parity``; which real text the rows are scored on.
- ``engine.py``: ``run_parity``, one runner's rows against eager PyTorch (the build) or against the saved
  references (``gamexport parity``, without torch).
- ``emulation.py``: emulation references (fp16/bf16-rounded weights, the INT8 plan, dynamic quantization) for the reduced precisions.

Importing this package loads the metrics only (NumPy): the names below are re-exported from ``metrics``.
"""

from .metrics import (CALIBRATED, CALIBRATION_NOTE, CALIBRATION_TEXT, INT8_DYN_PLAN, INT8_PLAN, TOLERANCES, Tolerance, Verdict,
                      chunk_ends, chunk_plan, chunked_targets, compare_logits, compare_state, informational_reason, mark_calibration_scored,
                      parity_inputs, perplexity, run_chunks, tolerance, verdict)

__all__ = ["CALIBRATED", "CALIBRATION_NOTE", "CALIBRATION_TEXT", "INT8_DYN_PLAN", "INT8_PLAN", "TOLERANCES", "Tolerance", "Verdict",
           "chunk_ends", "chunk_plan", "chunked_targets", "compare_logits", "compare_state", "informational_reason", "mark_calibration_scored",
           "parity_inputs", "perplexity", "run_chunks", "tolerance", "verdict"]
