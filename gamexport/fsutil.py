"""Atomic file output: every file is written to a temporary name in its folder, flushed, then renamed.

A reader therefore sees either the previous complete file or the new complete file, never a partial one.
A writer killed half-way leaves only its temporary (``.<name>.<random>.tmp``), which :func:`remove_temporaries`
clears once the caller holds the lock that guards ``<name>`` (:func:`file_lock`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import glob
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + fsync + rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}",
                          "choose an output folder you can write to") from exc
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}",
                              "free disk space or choose another output folder") from exc
        raise
    return path


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete what :func:`atomic_write_bytes` leaves of ``path`` when killed mid-write; returns what it removed.

    Only safe while the caller holds the lock that every writer of ``path`` takes (a live writer's temporary
    would otherwise vanish under it).
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if tmp.name.count(".") == path.name.count(".") + 3:  # .<name>.<random>.tmp, not another file's
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


@contextmanager
def file_lock(path: str | os.PathLike, *, shared: bool = False,
              waiting: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an advisory ``flock`` on ``path`` (a lock file) for the ``with`` block; yields whether it is held.

    Exclusive (writers) creates the lock file and its folder; it raises :class:`OutputError` when it cannot.
    Shared (readers) never creates anything: without a lock file (no gamexport writer has used the folder) or
    without read access to it, the block runs unlocked and ``False`` is yielded. ``waiting`` is called once
    when another process holds the lock and this one has to wait. The kernel drops the lock when its holder
    exits, however it exits (SIGKILL included), so a dead writer never blocks the next one.
    """
    path = Path(path)
    if shared:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            fd = None
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as exc:
            raise OutputError(f"cannot create the lock file {path}: {exc.strerror or exc}",
                              "choose a folder you can write to") from exc
    if fd is None:
        yield False
        return
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(fd, mode)
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def removable_lock(path: str | os.PathLike, busy: Callable[[], None]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` for the ``with`` block, then delete the file.

    Deleting a lock file is safe only when every process that uses it follows this protocol: after taking the
    lock, check that the locked descriptor is still the file at ``path`` (same device and inode); if the holder
    before deleted it (or replaced it) meanwhile, the lock taken is on a dead file, so open ``path`` again and
    retry. The holder deletes the file while it still holds the lock, and only then releases it. ``busy`` is
    called when another process holds the lock: it raises to refuse, or returns to wait. Opening ``path``
    raises ``OSError`` (the caller words the message). A killed holder leaves the empty file; the next one
    takes it over and deletes it.
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy()
                fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the previous holder deleted the file we locked: lock the one at the path now
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Stable JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps_json(obj))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_RENAME_EXCHANGE = 2


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or file system does not support it; the caller falls back to two renames.
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``, so that ``target`` is never missing or partial.

    If ``target`` exists, the two are exchanged atomically and the old content (now at ``new``) is removed.
    """
    import shutil

    if target.exists() and not target.is_dir():
        raise OutputError(f"output path {target} is a file, not a folder", "pass --out a folder path")
    if not target.exists():
        os.replace(new, target)
        return
    if exchange_paths(new, target):
        shutil.rmtree(new, ignore_errors=True)
        return
    # Fallback (no renameat2): a brief window where target is absent, bridged by a backup rename.
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, backup)
    os.replace(new, target)
    shutil.rmtree(backup, ignore_errors=True)
