"""What every command shares: the debug switch, one-line errors, progress output."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Callable, TypeVar

import typer

T = TypeVar("T")

DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors "
                                                              "(also GAMEXPORT_DEBUG=1).")]
ThreadsOption = Annotated[int | None, typer.Option("--threads", "-j", min=1,
                                                   help="CPU threads for ONNX Runtime and torch "
                                                        "(default: all cores).")]


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get("GAMEXPORT_DEBUG", "") not in ("", "0")


def say(message: str) -> None:
    """Progress and status lines go to stderr, so stdout stays clean for results."""
    print(message, file=sys.stderr, flush=True)


def run(fn: Callable[[], T], debug: bool = False) -> T:
    """Run a command body: known errors become one line and exit code 2 (1 for failed parity)."""
    from gamexport.errors import GamexportError, ParityError

    try:
        return fn()
    except typer.Exit:
        raise
    except GamexportError as exc:
        if debug_enabled(debug):
            raise
        say(f"error: {exc.line()}")
        raise typer.Exit(1 if isinstance(exc, ParityError) else 2) from None
    except KeyboardInterrupt:
        if debug_enabled(debug):
            raise
        say("interrupted: nothing was changed in the output folder")
        raise typer.Exit(130) from None
    except MemoryError:
        if debug_enabled(debug):
            raise
        say("error: out of memory. Use a smaller model or batch, or a machine with more memory.")
        raise typer.Exit(2) from None
    except OSError as exc:
        if debug_enabled(debug):
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        say(f"error: {exc.strerror or exc}{where}. Check the path and its permissions, and free disk space.")
        raise typer.Exit(2) from None
