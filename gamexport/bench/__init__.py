"""The benchmark's room: how fast each runtime and precision runs against this machine's limits.

One idea per file:

* ``timing`` — the latency harness (warm-up, repeated runs, percentiles, noise) and the machine's facts (CPU,
  caches, library versions, other processes' load); used by the build, the trainer's comparisons and the bench;
* ``settings`` — every shape, size and run count the bench measures at (``Effort``: FULL, QUICK);
* ``flops`` — FLOP and byte counts of a token, a block, a decode step;
* ``kernels`` — the yardstick kernels (ONNX Runtime MatMul/GEMV, ``torch.mm``, a streaming read);
* ``limits`` — the machine's limits, best-of, validity, ``BUILD_LIMITS``/``limits_summary``/``annotate_latency``:
  the module both ``gamexport build`` and ``gamexport bench`` import;
* ``ceilings`` — the model's weight MatMuls alone; ``runtimes`` — prefill and decode rows per runtime;
* ``points``, ``server`` — one scaling or training point in a fresh process, and the server that forks them;
  ``scaling`` and ``training`` — those sections; ``startup`` — ``--help`` and first-token wall times;
* ``options``, ``command`` (what ``gamexport bench`` runs), ``output`` (plots and the table).

Where it sits: above the engines — it opens and times their runners, so it may import ``gamexport.engines.eager``
and ``gamexport.engines.ort``, unlike the core and ``gamexport.parity``, which import no engine — and below the
build pipeline, which imports ``limits`` from here while the bench imports no pipeline (``tests/test_bench.py``
holds every import here to ``BENCH_MAY_IMPORT``). The timing harness is re-exported here (``from gamexport.bench
import measure`` works as it did when it was the module ``gamexport/bench.py``).
"""

from gamexport.bench.timing import (BUSY_CORES, CPU_FLAGS, NOISE_LIMIT, Timing, cpu_flags, cpu_name, cpu_seconds,
                                    llc_bytes, machine_info, measure, measure_decode, other_cpu_cores, summarize)

__all__ = ["BUSY_CORES", "CPU_FLAGS", "NOISE_LIMIT", "Timing", "cpu_flags", "cpu_name", "cpu_seconds", "llc_bytes",
           "machine_info", "measure", "measure_decode", "other_cpu_cores", "summarize"]
