"""Data-parallel training across processes: the few torch.distributed operations the training loop needs.

``gamexport train`` runs data-parallel when it is started by ``torchrun`` (which sets WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every worker's environment):

    torchrun --standalone --nproc_per_node 2 -m gamexport.cli.main train --dataset tinystories --out runs/ddp

Nothing else changes for the user: one process (no WORLD_SIZE, or WORLD_SIZE=1) trains exactly as before.

How the loop uses these helpers (see ``gamexport.training.loop``):

* the backend is gloo on CPU and NCCL on CUDA (each worker takes GPU ``LOCAL_RANK``);
* the preset's ``batch_size`` is the GLOBAL batch: every rank draws the same global batch a single process
  would draw and trains on its own contiguous slice of rows (``shard``); DistributedDataParallel averages the
  gradients, and the loop scales each rank's summed loss so that the average is the gradient of the global
  mean loss even when the rows do not split evenly (the last, smaller batch of an epoch);
* rank 0 alone writes run.json, metrics, checkpoints, plots and the summary, and shows the progress bar; the
  other ranks write nothing and wait at a barrier after each checkpoint, so that a later resume sees it;
* the weights stay identical on every rank (same initial weights, same averaged gradients, same optimizer
  arithmetic); each checkpoint checks that with a digest per rank (``weights_digest``) and records them.

Errors the user can fix (WORLD_SIZE set without a rendezvous, a batch that does not split) are
``DistributedError``s, one line each.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping

import numpy as np

from gamexport.errors import GamexportError

# Collectives wait this long for the slowest rank (rank 0 writing a large checkpoint, a slow evaluation)
# before failing; torch's default for gloo is 30 minutes as well, set here so NCCL gets the same.
TIMEOUT = timedelta(minutes=30)


class DistributedError(GamexportError):
    """A data-parallel run that cannot start or continue as launched."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run: rank ``rank`` of ``world_size`` (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"          # where collective tensors live: cuda:LOCAL_RANK for NCCL, else cpu
    owns_group: bool = False     # this module started the process group, so it also ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0

    # ---- collectives (each a no-op, or the identity, in a single process) ---------------------------------

    def barrier(self) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64. Adding the zeros of ranks that did not fill an entry is exact,
        which ``evaluation.evaluate`` relies on to reproduce a single process's numbers bit for bit."""
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; only for small, trusted objects made by this run)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shard(self, n_rows: int) -> tuple[int, int]:
        """This rank's contiguous rows [start, stop) of a global batch of ``n_rows``: sizes differ by at most
        one, and a rank gets none when ``n_rows < world_size``."""
        return self.rank * n_rows // self.world_size, (self.rank + 1) * n_rows // self.world_size


def requested_world_size(environ: Mapping[str, str] | None = None) -> int:
    """WORLD_SIZE from the environment (1 when unset): what torchrun asks for."""
    environ = os.environ if environ is None else environ
    raw = environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise DistributedError(f"WORLD_SIZE is {raw!r}, not a positive integer",
                               "launch with torchrun --nproc_per_node N, or unset WORLD_SIZE to train in one process")
    return value


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None and default is not None:
        return default
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DistributedError(f"WORLD_SIZE is set but {name} is {raw!r}", "launch with torchrun, which sets "
                               "RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT") from None


def init(device_type: str) -> Dist:
    """Join the process group torchrun prepared (gloo for ``cpu``, NCCL for ``cuda``); ``Dist()`` without one.

    A process group someone else already started (a test harness, a notebook) is used as it is and left
    running by ``teardown``.
    """
    world = requested_world_size()
    if world == 1:
        return Dist()
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError(f"WORLD_SIZE is {world}, but this torch build has no torch.distributed",
                               "install a torch build with distributed support, or unset WORLD_SIZE")
    backend = "nccl" if device_type == "cuda" else "gloo"
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    device = "cpu"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} has no GPU (torch sees {torch.cuda.device_count()})",
                                   "start at most one process per GPU (--nproc_per_node), or pass --device cpu")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    owns = False
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise DistributedError(f"a process group of {dist.get_world_size()} ranks is already running, but "
                                   f"WORLD_SIZE is {world}", "use one launcher: let torchrun start the workers")
        backend = dist.get_backend()
        rank = dist.get_rank()
    else:
        try:
            start_group(backend, init_method="env://")
        except (RuntimeError, ValueError, OSError) as exc:   # missing MASTER_ADDR, unreachable rank 0, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(f"WORLD_SIZE is {world}, but torch.distributed ({backend}) could not start: "
                                   f"{first}", "launch with torchrun --nproc_per_node N ..., or unset WORLD_SIZE "
                                               "to train in one process") from exc
        owns = True
    return Dist(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device, owns_group=owns)


def start_group(backend: str, **how: Any) -> None:
    """``torch.distributed.init_process_group(backend, **how)``, after importing the torch modules that capture
    the default process group when they are first imported.

    ``torch.distributed.nn.functional`` declares ten functions with the default argument ``group=group.WORLD``,
    evaluated at import. DistributedDataParallel imports it lazily (through ``torch._dynamo``), so after the
    group exists, and those defaults would hold the live group until the interpreter shuts down:
    ``destroy_process_group`` could not free it, and its threads would outlive the run (see ``teardown``).
    Imported first, the defaults hold ``None``, which means the default group when they are called.
    """
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401

    dist.init_process_group(backend=backend, timeout=TIMEOUT, **how)


def teardown(ctx: Dist, *, clean: bool = True) -> None:
    """End the process group if ``init`` started it, so that none of its threads outlives the run.

    ``destroy_process_group`` only drops torch's own references to the group; the C++ group, and with it its
    threads, goes when the LAST reference does. If any remains, the threads are still running when the
    interpreter shuts down, and a worker that finished its work can then die with SIGABRT ("terminate called
    without an active exception") after writing everything, so that torchrun reports a failed run. Hence, on
    every rank and every exit path (``session`` calls this after a success, an error or Ctrl-C):

    1. ``clean`` (the run succeeded): a barrier, so that no rank closes its connections while a peer is still in
       a collective with it. Not after an error: the other ranks may never arrive.
    2. ``gc.collect()``: DistributedDataParallel and its reducer hold the group and sit in reference cycles that
       only the collector frees (``session`` has already cleared the frames of a failed run's traceback).
    3. ``destroy_process_group()``: the group's last reference goes, and its destructor joins its threads.

    ``start_group`` removes the one holder this cannot reach; ``tests/test_ddp.py`` checks that no gloo thread
    is left once a run is over.
    """
    if not ctx.owns_group:
        return
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if clean:
            ctx.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device_type: str) -> Iterator[Dist]:
    """``init`` on entry, ``teardown`` on exit, whatever happens in between.

    On an error the traceback's finished frames (the training loop's, holding the model wrapped in
    DistributedDataParallel, which holds the group) are cleared first: the error message, the exit code and a
    ``--debug`` traceback do not need their locals, and otherwise they would keep the group alive until exit.
    """
    ctx = init(device_type)
    try:
        yield ctx
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        teardown(ctx, clean=False)
        raise
    teardown(ctx)


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """sha256 of a weights dict (names, dtypes, shapes and bytes, in name order): equal iff the weights are.

    Each rank computes it at every checkpoint; rank 0 records them all in trainer_state.pt, and the run stops
    if they differ (ranks whose weights drift apart would each continue a different model)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        arr = np.ascontiguousarray(weights[name])
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def derived_seed(seed: int, rank: int) -> int:
    """A torch seed for rank ``rank`` > 0 of a run seeded ``seed``: its own dropout stream, reproducible."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))
