"""``manifest.json`` of a build folder: every file with its size and sha256, written last (``write_manifest``) and
checked before loading (``verify``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, TypeVar

from . import __version__
from .config import FORMAT_VERSION, LEGACY_REFUSAL
from .errors import GamexportError
from .fsutil import atomic_write_json, sha256_file
from .jsonfile import MIB, Int, Map, Obj, Str, read_json
from .layout import MANIFEST as MANIFEST_NAME


class ManifestError(GamexportError):
    """A build folder whose files do not match its manifest."""


T = TypeVar("T")


#: The shape manifest.json must have (what ``write_manifest`` writes).
MANIFEST_SCHEMA = Obj(required={"files": Map(Obj(required={"size": Int(0), "sha256": Str(max_len=64)}))},
                      optional={"schema_version": Int(), "gamexport_version": Str(), "versions": Map(),
                                "source": Obj()})


def write_manifest(folder: Path, ckpt) -> dict:
    """``manifest.json``: every file but itself with size and sha256, plus library versions and the source
    checkpoint (``ckpt``: a ``gamexport.checkpoint.Checkpoint``); its ``kind`` marks the folder as a build that a
    later build may replace (``gamexport.destinations``)."""
    from .machine import machine_info
    from .destinations import BUILD_KIND

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    versions = machine_info(None)["versions"]
    manifest = {"schema_version": FORMAT_VERSION, "kind": BUILD_KIND, "gamexport_version": __version__, "files": files,
                "versions": {k: v for k, v in versions.items() if k in ("torch", "onnx", "onnxruntime",
                                                                         "onnxruntime-gpu", "numpy")},
                "source": {"path": ckpt.source, "sha256": ckpt.sha256}}
    atomic_write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = read_json(path, schema=MANIFEST_SCHEMA, error=ManifestError, max_bytes=64 * MIB,
                             fix="rebuild the folder with gamexport build")
    except FileNotFoundError:
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}", "pass a folder written by gamexport build") from None
    if manifest.get("schema_version", FORMAT_VERSION) < FORMAT_VERSION:  # format 1: one packed state tensor
        raise ManifestError(f"{folder} was {LEGACY_REFUSAL}")
    return manifest


def verify(folder: Path, names: Iterable[str] | None = None, strict: bool = False) -> dict:
    """Check files (all, or ``names``) against the manifest: present, same size, same sha256.

    ``strict`` also refuses files the manifest does not list (something was added to the folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder", "pass a folder written by gamexport build")
    manifest = read_manifest(folder)
    files = manifest["files"]
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ManifestError(f"manifest entry {name!r} points outside {folder}", "rebuild the folder")
    if strict:
        present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        extra = sorted(present - set(files) - {MANIFEST_NAME})
        if extra:
            raise ManifestError(f"{folder / extra[0]} is not listed in the manifest"
                                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
                                "remove it, or rebuild the folder with gamexport build")
    for name in (names if names is not None else files):
        entry = files.get(name)
        if entry is None:
            raise ManifestError(f"{name} is not listed in {folder / MANIFEST_NAME}", "rebuild the folder")
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{path} is missing", "rebuild the folder with gamexport build")
        if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            raise ManifestError(f"{path} does not match its manifest entry (changed or corrupt)",
                                "rebuild the folder with gamexport build")
    return manifest


def verify_while(folder: Path, names: Iterable[str], load: Callable[[], T]) -> T:
    """``load()``, run while ``names`` are checked against the manifest (:func:`verify`) on a second thread; its
    result is returned only once they pass. A cold ``gamexport generate`` is mostly two waits, the sha256 of the
    step graph and ONNX Runtime's session creation, and hashlib releases the GIL, so on two cores the check hides
    behind the load (85 ms of 0.5 s at paper size, measured 2026-12-03). A failed check wins: what ``load``
    returned is closed, and what it raised (ONNX Runtime on a corrupt file) is chained below the manifest's error.
    ``load`` may read a file the check then refuses, so it must be safe on one: the ONNX Runtime runner refuses
    external data outside the folder before ONNX Runtime reads any."""
    import threading

    failed: list[BaseException] = []

    def check() -> None:
        try:
            verify(folder, list(names))
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=check, name="gamexport-verify", daemon=True)
    worker.start()
    try:
        result = load()
    except BaseException as exc:
        worker.join()
        if failed:
            raise failed[0] from exc
        raise
    worker.join()
    if failed:
        close = getattr(result, "close", None)
        if callable(close):
            close()
        raise failed[0]
    return result
