"""Where a build writes: its destinations checked before any work, and the staging folder under a lock.

The build works in a staging folder beside the output and moves it into place only when it is complete and
every parity check passed, so the output folder holds the previous good build or the new one, never a mix.
A failed build keeps its staging folder as ``<out>.failed`` for diagnosis and says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gamexport.errors import OutputError
from gamexport.fsutil import removable_lock
from gamexport.sources import demo_folder

from .options import BuildOptions


def failed_folder(out: Path) -> Path:
    """``OUT.failed``: where a build whose parity failed keeps its output."""
    return out.with_name(out.name + ".failed")


def check_destinations(opts: BuildOptions) -> tuple[Path, Path | None]:
    """Check every place the build will write, before it changes anything; returns (out, triton) resolved.

    ``--out`` must be new, empty or a previous build, ``OUT.failed`` (where a failing build keeps its output)
    the same, and ``--triton`` new, empty or a model repository whose gamexport models may be replaced; none
    of them may be, hold or lie inside the source or each other (``gamexport.destinations``).
    """
    from gamexport.destinations import ABSENT, BUILD, EMPTY, check_folder, classify

    source = opts.source if opts.source is not None else (demo_folder() if opts.preset is None else None)
    out = check_folder(opts.out, BUILD, guards={"the source": source})
    failed = failed_folder(out)
    if classify(failed) not in (ABSENT, EMPTY, BUILD):
        raise OutputError(f"{failed} holds files that are not a gamexport build, and a failing build would put "
                          "its output there", "move it away, or pass another --out")
    triton = None
    if opts.triton is not None:
        from gamexport.bundles.triton import GRAPHS, check_repository

        triton = check_repository(opts.triton, [f"gam_{graph}" for graph in GRAPHS],
                                  {"the source": source, "--out": out, "--out's failed-build folder": failed})
    return out, triton


@contextmanager
def locked_staging(out: Path) -> Iterator[Path]:
    """Hold ``.<out>.lock`` and yield a fresh staging folder beside ``out``; stale ones are removed first.

    The lock file is deleted when the build ends (``fsutil.removable_lock``); only a killed build leaves it,
    empty, and the next build takes it over and deletes it.
    """
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} is a file, not a folder", "pass --out a folder path")

    def busy() -> None:
        raise OutputError(f"another gamexport build is writing {out}", "wait for it to finish or choose another --out")

    with contextlib.ExitStack() as held:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(removable_lock(out.parent / f".{out.name}.lock", busy))
        except OSError as exc:
            raise OutputError(f"cannot write beside {out}: {exc.strerror or exc}",
                              "choose an output folder you can write to") from exc
        for stale in out.parent.glob(f".{out.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = out.parent / f".{out.name}.staging-{os.getpid()}"
        try:
            staging.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot create {staging}: {exc.strerror or exc}",
                              "choose an output folder you can write to") from exc
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def pause_hook(stage: str) -> None:
    """Test-only: GAMEXPORT_TEST_PAUSE_AT=<stage> makes the build announce and wait at that stage."""
    if os.environ.get("GAMEXPORT_TEST_PAUSE_AT") != stage:
        return
    marker = os.environ.get("GAMEXPORT_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(stage)
    time.sleep(float(os.environ.get("GAMEXPORT_TEST_PAUSE_SECONDS", "60")))


