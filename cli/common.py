"""What every command shares: the debug switch, one-line errors, progress output."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Callable, TypeVar

import typer

from gamexport.limits import MAX_THREADS

T = TypeVar("T")

DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors "
                                                              "(also GAMEXPORT_DEBUG=1, true, yes or on).")]
ThreadsOption = Annotated[int | None, typer.Option("--threads", "-j", min=1, max=MAX_THREADS,
                                                   help=f"CPU threads for ONNX Runtime and torch, 1..{MAX_THREADS} "
                                                        "(4 × this machine's CPUs; default: all cores).")]
DEBUG_ON = ("1", "true", "yes", "on")


def debug_enabled(flag: bool = False) -> bool:
    """--debug, or GAMEXPORT_DEBUG set to 1/true/yes/on (any case). Any other value — 0, false, no, off, empty,
    or a typo — leaves tracebacks off: they are opt-in, so an unrecognised value must not turn them on."""
    return flag or os.environ.get("GAMEXPORT_DEBUG", "").strip().lower() in DEBUG_ON


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
