"""Data-parallel training: 2 CPU processes under torchrun (gloo) against one process with the same global batch.

One torchrun launch trains the tiny preset for 6 steps (the 5th batch of an epoch holds a single row, so rank 1
gets none and runs with weight 0, and the run crosses an epoch); a second launch resumes it from step 3. Each
worker runs under an audit hook that logs every write into the run folder, so "only rank 0 writes" is observed,
not assumed, and records its threads once the command is over: none of the process group's may be left (left
running into the interpreter's shutdown, one of them aborted a run that had succeeded). Dropout is 0: with
dropout each rank draws its own masks and no data-parallel run can equal a single process (see
``gamexport.training.loop.train``).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from gamexport.training import data
from gamexport.training.distributed import Dist, DistributedError, requested_world_size, weights_digest
from gamexport.training.checkpoints import load_trainer_state
from gamexport.training.loop import train

from test_training_loop import metrics, write_stories

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch without gloo")

ARGS = ["--preset", "tiny", "--max-steps", "6", "--eval-every", "3", "--checkpoint-every", "3", "--seed", "5",
        "--dropout", "0", "--threads", "1", "--no-progress"]

# Runs `gamexport train` as `torchrun ... -m gamexport.cli.main` would, after installing an audit hook that
# records every file-system write under $DDP_TEST_OUT; each rank's record lands in $DDP_TEST_LOG.<rank>.json.
LAUNCHER = textwrap.dedent('''
    import json, os, runpy, sys, time

    OUT = os.path.realpath(os.environ["DDP_TEST_OUT"])
    LOG = os.environ["DDP_TEST_LOG"] + "." + os.environ["RANK"] + ".json"
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    PATH_EVENTS = {"os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.rename", "os.truncate", "os.chmod",
                   "os.link", "os.symlink", "os.utime", "shutil.copyfile", "shutil.move"}
    writes, active = [], [True]

    def hook(event, args):
        if not active[0]:
            return
        if event == "open":
            path, mode, flags = args
            if not ((isinstance(flags, int) and flags & WRITE_FLAGS)
                    or (isinstance(mode, str) and set(mode) & set("wax+"))):
                return
            paths = [path]
        elif event in PATH_EVENTS:
            paths = list(args[:2])
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                real = os.path.realpath(os.fsdecode(p))
                if real == OUT or real.startswith(OUT + os.sep):
                    writes.append(event + " " + os.path.relpath(real, OUT))

    # The names of this process's native threads (None without Linux's /proc), when the process group is
    # destroyed and once the command is over.
    # A thread may exit between listing the tasks and reading its name: it is then simply not there. At the end
    # the group's threads get a few seconds to finish exiting; one that never does still shows up.
    def threads(settle=0.0):
        tasks = "/proc/self/task"
        if not os.path.isdir(tasks):
            return None
        deadline = time.monotonic() + settle
        while True:
            names = []
            for t in os.listdir(tasks):
                try:
                    with open(f"{tasks}/{t}/comm") as f:
                        names.append(f.read().strip())
                except FileNotFoundError:
                    pass
            if not any("gloo" in n for n in names) or time.monotonic() >= deadline:
                return sorted(names)
            time.sleep(0.05)

    import torch.distributed
    destroy, threads_at = torch.distributed.destroy_process_group, {}

    def recording_destroy(*args, **kwargs):
        threads_at["destroy"] = threads()
        return destroy(*args, **kwargs)

    torch.distributed.destroy_process_group = recording_destroy
    sys.addaudithook(hook)
    sys.argv = ["gamexport", *sys.argv[1:]]
    try:
        runpy.run_module("gamexport.cli.main", run_name="__main__")
    finally:
        active[0] = False
        threads_at["end"] = threads(settle=5.0)
        with open(LOG, "w") as f:
            json.dump({"writes": writes, "threads": threads_at}, f)
''')


def torchrun(tmp_path, out, *args):
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 <launcher> train ...` (a free port)."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(DDP_TEST_OUT=str(out), DDP_TEST_LOG=str(tmp_path / f"writes-{out.name}"), OMP_NUM_THREADS="1",
               GAMEXPORT_DEBUG="1")   # a failure shows its traceback in the assertion message
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(launcher), "train", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "terminate called" not in proc.stderr, proc.stderr
    logs = [json.loads((tmp_path / f"writes-{out.name}.{rank}.json").read_text()) for rank in (0, 1)]
    for log in logs:
        assert_no_gloo_thread_outlives_the_run(log["threads"])
    return proc, [log["writes"] for log in logs]


def assert_no_gloo_thread_outlives_the_run(threads):
    """Once the command is over, the process group's threads (gloo names them pt_gloo_* and gloo_*) are gone.
    Left running, they would still run while Python shuts down, where one of them can abort a run that
    succeeded ("terminate called without an active exception", see ``distributed.teardown``)."""
    if threads["end"] is None:
        return
    gloo = [name for name in threads["destroy"] if "gloo" in name]
    assert gloo, threads          # they did run until the group was destroyed: the names are the right ones
    assert not [name for name in threads["end"] if "gloo" in name], threads


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_exactly(tmp_path):
    text = write_stories(tmp_path / "stories.txt", 18)
    ddp, single = tmp_path / "ddp", tmp_path / "single"

    proc, (rank0, rank1) = torchrun(tmp_path, ddp, "--dataset", str(text), *ARGS)
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["training"]["data_parallel"]["per_rank_batch"] == 2
    # The epoch has 17 chunks in batches of 4: its 5th batch is a single row, so rank 1 trains on none.
    assert summary["training"]["steps_per_epoch"] == 5
    assert data.n_train_chunks(summary["tokens"]["train"], summary["training"]["seq_len"]) % 4 == 1

    # (c) Only rank 0 wrote into the run folder (and it did write: the hook sees writes), and only it printed.
    assert rank1 == []
    assert any(w.endswith("run.json") for w in rank0) and any("step-000006" in w for w in rank0)
    assert proc.stdout.count("trained 6 steps") == 1 and "2 processes" in proc.stdout
    rows = metrics(ddp)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]                # one line per step, not one per rank

    # (a) Both ranks hold the same weights: each rank's digest, recorded at every checkpoint, is rank 0's saved
    # model's; and the weights did change between the checkpoints (the digest is not a constant).
    final = load_trainer_state(ddp / "checkpoints" / "step-000006")
    middle = load_trainer_state(ddp / "checkpoints" / "step-000003")
    assert final["world_size"] == 2
    assert final["weights_sha256_by_rank"] == [weights_digest(weights(ddp))] * 2
    assert middle["weights_sha256_by_rank"][0] == middle["weights_sha256_by_rank"][1] != \
        final["weights_sha256_by_rank"][0]
    # Each rank has its own dropout generator (rank 1's is seeded apart from rank 0's).
    assert not torch.equal(final["rng_by_rank"][0]["torch"], final["rng_by_rank"][1]["torch"])

    # (b) One process with the same global batch: the same losses (the gradient sums in another order).
    train(str(text), "tiny", single, max_steps=6, eval_every=3, checkpoint_every=3, seed=5, dropout=0.0, threads=1,
          progress=False)
    one = metrics(single)
    assert [r["step"] for r in one] == [r["step"] for r in rows]
    for a, b in zip(rows, one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["lr"] == b["lr"]
        assert (a["val_loss"] is None) == (b["val_loss"] is None)
        if a["val_loss"] is not None:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    wd, ws = weights(ddp), weights(single)
    assert wd.keys() == ws.keys()
    assert max(float(np.abs(wd[k] - ws[k]).max()) for k in wd) < 1e-5

    # (d) Resume under 2 processes: the newest checkpoint is lost (as in a crash while writing it); the run
    # continues from step 3 and reproduces steps 4-6 and the final weights bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    proc, (rank0, rank1) = torchrun(tmp_path, resumed, "--resume", "--no-progress")
    assert rank1 == [] and rank0
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 3
    assert metrics(resumed) == rows
    wr = weights(resumed)
    assert all(wr[k].tobytes() == wd[k].tobytes() for k in wd)
    again = load_trainer_state(resumed / "checkpoints" / "step-000006")
    assert again["weights_sha256_by_rank"] == final["weights_sha256_by_rank"]
    for a, b in zip(again["rng_by_rank"], final["rng_by_rank"]):   # every rank continued its own generator
        assert torch.equal(a["torch"], b["torch"])


def test_launch_errors_are_one_line(tmp_path, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedError, match="WORLD_SIZE is 'two'") as info:
        requested_world_size()
    assert "\n" not in str(info.value)
    # WORLD_SIZE set by hand, without torchrun's rendezvous: one line saying how to launch.
    text = write_stories(tmp_path / "stories.txt", 18)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DistributedError, match="could not start") as info:
        train(str(text), "tiny", tmp_path / "run", max_steps=1, device="cpu", progress=False)
    assert "\n" not in str(info.value) and "torchrun" in str(info.value)
    assert not (tmp_path / "run").exists()
    assert not torch.distributed.is_initialized()


def test_the_global_batch_must_split_evenly(tmp_path):
    from gamexport.training.loop import _train

    text = write_stories(tmp_path / "stories.txt", 18)
    # The check comes before any collective, so a rank of an imaginary 3-process run shows it.
    with pytest.raises(DistributedError, match="batch of 4 sequences .* over 3 processes"):
        _train(Dist(rank=1, world_size=3), torch.device("cpu"), 0.0, dataset=str(text), preset="tiny",
               out=tmp_path / "run", max_steps=2, resume=False, seed=0, data_dir=None, eval_every=None,
               checkpoint_every=None, threads=None, vocab_size=None, progress=False, on_step=None, model=None,
               dropout=None)
    assert not (tmp_path / "run").exists()


def test_shards_cover_the_batch_in_order():
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            parts = [Dist(rank=r, world_size=world).shard(n) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))       # contiguous, in rank order
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads with Linux's /proc")
def test_no_thread_of_the_group_outlives_a_session(monkeypatch):
    """``session`` really frees the process group, so that its threads stop before Python shuts down: after a
    run that succeeded and after one that failed with the model (wrapped in DistributedDataParallel, which
    holds the group) in its traceback. With the collector off, as it may happen to be: the wrapper sits in
    reference cycles, so teardown must collect them itself. A group of one process, in this process."""
    import contextlib
    import gc
    import weakref

    from torch.nn.parallel import DistributedDataParallel

    from gamexport.training import distributed

    def one_process_group(device_type):
        distributed.start_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        return Dist(backend="gloo", owns_group=True)

    def gloo_threads(settle=0.0):
        """The group's threads still alive (those exiting get `settle` seconds); a thread gone mid-listing is gone."""
        deadline = time.monotonic() + settle
        while True:
            names = []
            for t in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{t}/comm") as f:
                        names.append(f.read())
                except FileNotFoundError:
                    pass
            alive = [name for name in names if "gloo" in name]
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.05)

    monkeypatch.setattr(distributed, "init", one_process_group)
    gc.disable()
    try:
        for fails in (False, True):
            group = []

            def train_a_step():
                model = DistributedDataParallel(torch.nn.Linear(4, 4))
                model(torch.ones(2, 4)).sum().backward()
                group.append(weakref.ref(torch.distributed.group.WORLD))
                assert gloo_threads()
                if fails:
                    raise RuntimeError("the step failed")

            with pytest.raises(RuntimeError) if fails else contextlib.nullcontext() as error:
                with distributed.session("cpu"):
                    train_a_step()
            # `error` keeps the exception and its traceback alive, as the CLI's exit path does until the end.
            assert group and group[0]() is None, f"the process group outlived its session ({error})"
            assert not gloo_threads(settle=5.0) and not torch.distributed.is_initialized()
    finally:
        gc.enable()
