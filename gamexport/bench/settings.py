"""What ``gamexport bench`` measures at, and how often: every shape, size and run count of the bench in one place.

The shapes are those of the machine's limits (``limits``) and of the rows measured against them; ``Effort`` says
how many runs each kind of measurement takes: ``FULL`` for ``gamexport bench``, ``QUICK`` for ``--quick`` (the
build's own, fewer, is ``limits.BUILD_LIMITS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


# ---- the machine's limits (defined here, once) and the shapes measured against them ---------------------------
COMPUTE_SHAPE = (2048, 2048, 2048)   # M, K, N of the compute limit
BATCHED_M = 32                       # rows of the batched limit (the bandwidth limit's weights)
STREAM_FALLBACK_BYTES = 256 * 2**20  # streaming read where the last-level cache's size is unknown
PREFILL_LENGTHS = (64, 256)          # batch-1 prefill lengths, capped at P
BATCHED_PREFILL = 8                  # batch of the batched prefill, at T = min(256, P)
DECODE_BATCHES = (8, 32)             # batched decode, against the batched (M = 32) limit
EDGE = 32                            # decode: medians of the first and last EDGE positions
# Scaling (the paper's Table 2 protocol at CPU scale).
SCALING_D = 512
SCALING_HEADS = 8
SCALING_SLOTS = 512
SCALING_KERNEL = 3
SCALING_MIN_T = 256
SCALING_MAX_T = 8192
# Training throughput (GAM vs the width-matched Transformer at the bench's model config).
TRAIN_BATCH = 4
TRAIN_SEQ = 256                      # capped at the model's max_positions

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Effort:
    """How many runs each kind of measurement takes."""

    limit_runs: int
    limit_warmup: int
    runs: int
    warmup: int
    max_seconds: float
    batched_decode_steps: int
    scaling_runs: int
    scaling_max_seconds: float
    help_runs: int
    first_token_runs: int
    startup_warmup: int
    training_runs: int
    paired_rounds: int = 0     # rounds of the goals' paired timings (``paired``); 0: not measured
    paired_runs: int = 0       # timed calls per kernel block in a paired round


FULL = Effort(limit_runs=20, limit_warmup=3, runs=20, warmup=2, max_seconds=30.0, batched_decode_steps=64,
              scaling_runs=10, scaling_max_seconds=30.0, help_runs=5, first_token_runs=7, startup_warmup=1,
              training_runs=5, paired_rounds=24, paired_runs=3)


QUICK = Effort(limit_runs=2, limit_warmup=1, runs=5, warmup=1, max_seconds=2.0, batched_decode_steps=16,
               scaling_runs=2, scaling_max_seconds=3.0, help_runs=2, first_token_runs=1, startup_warmup=0,
               training_runs=2, paired_rounds=3, paired_runs=2)
