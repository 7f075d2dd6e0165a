"""``gamexport verify``: check every file of a build folder against its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOption, run


def verify(
    folder: Annotated[Path, typer.Argument(help="A build folder (written by gamexport build).")],
    debug: DebugOption = False,
) -> None:
    """Check that every file listed in manifest.json is present with its size and sha256, and nothing else is.

    Exits 0 when the folder is exactly what the build wrote, 2 otherwise (naming the first problem).
    """

    def body() -> None:
        from gamexport.manifest import verify as verify_folder

        manifest = verify_folder(folder, strict=True)
        print(f"verified: {len(manifest['files'])} files in {folder} match manifest.json")

    run(body, debug)
