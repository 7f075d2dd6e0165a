"""``gamexport inspect``: what a checkpoint, ONNX file or build folder holds."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DebugOption, run


def inspect(
    path: Annotated[str, typer.Argument(help="A checkpoint, an .onnx file or a build folder.")],
    debug: DebugOption = False,
) -> None:
    """Print config, parameter count, graph inputs/outputs and local functions."""

    def body() -> None:
        from gamexport.inspection import describe

        print(describe(path))

    run(body, debug)
