"""Where a command may write: one check for every destination, made before anything is changed.

Every command that writes (``build --out`` and ``--triton``, ``train --out``, ``parity --report``,
``bench --out``) asks :func:`check_folder` or :func:`check_file` about each of its destinations first, so a
refused destination leaves every file as it was. The rules:

- A folder destination is replaced or written into only when it is absent, an empty folder, or a folder of the
  command's own kind, recognised by the marker gamexport writes into it (:data:`KINDS`): a build folder by its
  ``manifest.json``, a training run by its ``run.json``, a bench folder by its ``bench.json``, a Triton model
  repository by its model folders (each empty or holding a ``config.pbtxt`` or a numeric version folder; the
  ``config.pbtxt`` files gamexport writes start with :data:`TRITON_HEADER`, and only those model folders are
  ever replaced). A folder of another kind, or one that holds
  anything else, is refused.
- A destination never is, holds, or lies inside a source or another protected path (the folder a command reads
  from, its other destinations). Paths are compared after resolving symbolic links and ``.``/``..``, so ``.``
  and ``''`` (the working directory) are caught like any other spelling.
- A file destination (a report) is a regular file or a new path, never a folder, a symbolic link or a special
  file (a device such as ``/dev/null``, a FIFO, a socket), and never inside a protected folder.

Every refusal is an :class:`OutputError`: one line naming the path, why, and what to pass instead.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Mapping

from .errors import OutputError

BUILD = "gamexport build folder"
RUN = "gamexport training run folder"
BENCH = "gamexport bench folder"
TRITON = "Triton model repository"
KINDS = (BUILD, RUN, BENCH, TRITON)

BUILD_KIND = "gamexport-build"   # manifest.json "kind" (older manifests: recognised by their schema)
RUN_KIND = "gamexport-run"       # run.json "kind" (older run.json: recognised by their fields)
BENCH_KIND = "gamexport-bench"   # bench.json "kind"
TRITON_HEADER = "# Written by gamexport"   # the first line of every config.pbtxt gamexport writes

ABSENT, EMPTY, OTHER, FILE, SPECIAL, SYMLINK = "absent", "empty folder", "folder", "file", "special file", "link"


def _json(path: Path) -> dict | None:
    """The JSON object in a marker file, or None when it is absent, not a regular file, or not a JSON object
    (read through the one validating reader: a FIFO is never opened, deep nesting never recurses)."""
    from .errors import GamexportError
    from .jsonfile import read_json

    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        data = read_json(path)
    except (OSError, GamexportError):
        return None
    return data if isinstance(data, dict) else None


def _is_build(folder: Path) -> bool:
    manifest = _json(folder / "manifest.json")
    if manifest is None:
        return False
    return manifest.get("kind") == BUILD_KIND or (
        "kind" not in manifest and isinstance(manifest.get("files"), dict)
        and "schema_version" in manifest and "gamexport_version" in manifest)


def _is_run(folder: Path) -> bool:
    run = _json(folder / "run.json")
    if run is None:
        return False
    return run.get("kind") == RUN_KIND or (
        "kind" not in run and {"dataset", "preset", "seed", "gamexport_version"} <= run.keys())


def _is_bench(folder: Path) -> bool:
    bench = _json(folder / "bench.json")
    return bench is not None and bench.get("kind") == BENCH_KIND


def is_triton_model(folder: Path) -> bool:
    """A model folder gamexport wrote into a Triton repository (its config.pbtxt starts with the header)."""
    try:
        with open(folder / "config.pbtxt", encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(TRITON_HEADER)
    except OSError:
        return False


def _is_model_folder(folder: Path) -> bool:
    """A Triton model folder: a real folder that is empty (being set up) or holds a config.pbtxt or a numeric
    version folder (Triton can complete a missing config.pbtxt for some backends)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    names = [p.name for p in folder.iterdir()]
    return not names or "config.pbtxt" in names or any(n.isdigit() and (folder / n).is_dir() for n in names)


def _is_triton(folder: Path) -> bool:
    """A model repository: every visible entry is a model folder, gamexport's or not (the Triton writer replaces
    only the model folders it wrote and leaves the others alone)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(_is_model_folder(p) for p in entries)


_RECOGNISE = {BUILD: _is_build, RUN: _is_run, BENCH: _is_bench, TRITON: _is_triton}


def classify(path: str | os.PathLike) -> str:
    """What is at ``path``: ABSENT, SYMLINK, SPECIAL, FILE, EMPTY, one of :data:`KINDS`, or OTHER (a folder
    holding something else). The path itself is looked at, not what a symbolic link points to."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ABSENT
    except OSError as exc:
        raise OutputError(f"cannot look at {path}: {exc.strerror or exc}", "choose another path") from exc
    if stat.S_ISLNK(mode):
        return SYMLINK
    if stat.S_ISREG(mode):
        return FILE
    if not stat.S_ISDIR(mode):
        return SPECIAL
    try:
        if not any(path.iterdir()):
            return EMPTY
    except OSError:
        return OTHER
    return next((kind for kind, test in _RECOGNISE.items() if test(path)), OTHER)


def _special_kind(path: Path) -> str:
    mode = os.lstat(path).st_mode
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def real(path: str | os.PathLike) -> Path:
    """The absolute path with symbolic links and ``.``/``..`` resolved (``''`` is the working directory)."""
    return Path(os.path.realpath(os.fspath(path) or "."))


def _overlap(dest: Path, guarded: Path) -> str | None:
    """How ``dest`` (resolved) overlaps ``guarded`` (resolved), or None."""
    if dest == guarded:
        return "is"
    if dest in guarded.parents:
        return "holds"
    if guarded in dest.parents:
        return "is inside"
    return None


def _check_guards(path: Path, dest: Path, option: str, guards: Mapping[str, object]) -> None:
    for label, guarded in guards.items():
        if guarded is None:
            continue
        where = real(guarded)
        how = _overlap(dest, where)
        if how is not None:
            raise OutputError(f"{option} {path} {how} {label} {where}; writing there would change it",
                              f"pass {option} a new path outside {where}")


def _examine(path: str | os.PathLike, option: str, guards: Mapping[str, object] | None) -> tuple[Path, str, Path]:
    """(the path as given, what is there now, the resolved path) once the guards have passed; ``''`` is ``.``."""
    path = Path(os.fspath(path) or ".")
    dest = real(path)
    _check_guards(path, dest, option, guards or {})
    return path, classify(path), dest


def check_folder(path: str | os.PathLike, kind: str, *, option: str = "--out",
                 guards: Mapping[str, object] | None = None) -> Path:
    """Refuse ``path`` as a folder destination of ``kind`` unless it is absent, empty or of that kind, and is,
    holds and lies inside none of ``guards`` (label → path: the sources and other destinations, e.g.
    ``{"the source": src, "--out": out}``; None values are skipped); returns the resolved path to write to.

    ``option`` names the destination in the message (``--out``, ``--triton``)."""
    path, found, dest = _examine(path, option, guards)
    if found in (ABSENT, EMPTY) or found == kind:
        return dest
    if found == FILE:
        raise OutputError(f"output path {dest} is a file, not a folder", f"pass {option} a folder path")
    if found == SYMLINK:
        raise OutputError(f"{option} {path} is a symbolic link (to {dest})",
                          f"pass {option} the folder itself, or a new path")
    if found == SPECIAL:
        raise OutputError(f"{option} {path} is {_special_kind(path)}, not a folder",
                          f"pass {option} a new folder path")
    what = f"is a {found}, not a {kind}" if found in KINDS else f"holds files that are not from a {kind}"
    raise OutputError(f"{option} {dest} {what}; gamexport writes only into a new or empty folder or a {kind}",
                      f"pass {option} a new or empty folder")


def check_file(path: str | os.PathLike, *, option: str = "--report",
               guards: Mapping[str, object] | None = None) -> Path:
    """Refuse ``path`` as a file destination unless it is a regular file or a new path, and is, holds and lies
    inside none of ``guards`` (as for :func:`check_folder`); returns the resolved path."""
    path, found, dest = _examine(path, option, guards)
    if found in (ABSENT, FILE):
        return dest
    if found == SYMLINK:
        raise OutputError(f"{option} {path} is a symbolic link (to {dest})", f"pass {option} a regular file path")
    if found == SPECIAL:
        raise OutputError(f"{option} {path} is {_special_kind(path)}, not a regular file; it is left alone",
                          f"pass {option} a regular file path")
    raise OutputError(f"{option} {path} is a folder, not a file", f"pass {option} a file path such as "
                                                                  f"{path / 'report.json'}")


__all__ = ["ABSENT", "BENCH", "BUILD", "BUILD_KIND", "EMPTY", "FILE", "KINDS", "OTHER", "RUN", "RUN_KIND",
           "SPECIAL", "SYMLINK", "TRITON", "TRITON_HEADER", "check_file", "check_folder", "classify",
           "is_triton_model", "real"]
