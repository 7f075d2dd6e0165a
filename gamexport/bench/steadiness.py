"""Was the machine as fast all through the run? Two small probe kernels timed between the sections.

A quiet machine (``load.other_cpu_cores``: the CPU time other processes of *this* machine used) can still change
speed under a run: a virtual machine shares its host's cores and memory bus with neighbours it cannot see. Runs on
the same 2-core cloud host have shown the batched limit measured at 98 GFLOP/s at the start and 186 at the end,
and the same weight MatMuls at 2.6 ms in one run and 4.1 ms in the next. A fraction of a limit taken at another
moment then measures the host, not the graph. So a compute probe (ONNX Runtime ``MatMul`` at the gate's prefill
shape) and a bandwidth probe (ONNX Runtime's GEMV over as many fp32 bytes as the model has) are timed at the start,
before each runtime and section, and at the end; a run whose probes vary by more than :data:`STEADY_WITHIN`
(slowest ÷ fastest, either probe) is ``steady: false``: ``scripts/bench-docs`` gives the goals it scores from the
sections no verdict (the goals scored in paired rounds, ``paired``, stand).
"""

from __future__ import annotations

import gc

from gamexport.bench import kernels
from gamexport.bench.settings import Effort, Progress
from gamexport.config import GAMConfig

#: Slowest ÷ fastest probe timing above which a run is unsteady (its timings measure the host's changes).
STEADY_WITHIN = 1.25


class Probe:
    """The two probe kernels, kept open for the run; :meth:`__call__` times both and records the point."""

    def __init__(self, cfg: GAMConfig, threads: int, effort: Effort):
        from gamexport.bench.limits import bandwidth_shape

        T, d = min(256, cfg.max_positions), cfg.d_model
        Kb, Nb = bandwidth_shape(4 * cfg.n_params(), d)
        self.shapes = {"compute": (T, d, 2 * d), "bandwidth": (1, Kb, Nb)}
        self.calls = {k: kernels.matmul_call(M, K, N, threads) for k, (M, K, N) in self.shapes.items()}
        self.runs = max(3, min(effort.limit_runs, 10))
        self.points: list[dict] = []

    def __call__(self, at: str) -> None:
        from gamexport.bench.timing import measure

        point = {"at": at}
        for name, call in self.calls.items():
            M, K, N = self.shapes[name]
            ms = measure(call, warmup=1, runs=self.runs, max_seconds=10.0).p50_ms
            point[name] = (2 * M * K * N / (ms / 1e3) / 1e9 if name == "compute" else K * N * 4 / (ms / 1e3) / 1e9)
        self.points.append(point)

    def result(self) -> dict:
        """bench.json's ``steadiness``: every point, each probe's slowest ÷ fastest, and ``steady``."""
        spread = {name: max(p[name] for p in self.points) / min(p[name] for p in self.points)
                  for name in self.calls} if self.points else {}
        return {"what": "a compute probe (ONNX Runtime MatMul {}x{}x{}, GFLOP/s) and a bandwidth probe (GEMV "
                        "{}x{}x{}, GB/s) timed at the start, before each runtime and section, and at the end"
                        .format(*self.shapes["compute"], *self.shapes["bandwidth"]),
                "points": self.points, "spread": spread, "steady_within": STEADY_WITHIN,
                "steady": all(v <= STEADY_WITHIN for v in spread.values())}

    def close(self) -> None:
        self.calls.clear()
        gc.collect()


def no_probe(at: str) -> None:
    """The probe of a caller that does not measure steadiness (``runtime_rows`` outside a bench run)."""


def say_unsteady(result: dict, say: Progress, paired: bool = False) -> None:
    """Warn when the probes saw the host change speed; ``paired``: the run scored its goals in paired rounds."""
    if not result["steady"]:
        worst = ", ".join(f"{k} {v:.2f}×" for k, v in result["spread"].items())
        say(f"warning: the machine's speed changed during the run (probes slowest ÷ fastest: {worst}, more than "
            f"{STEADY_WITHIN}×): a neighbour on the host? The sections' fractions measure the host"
            + ("; the goals, scored in paired rounds, stand." if paired else "; rerun."))
