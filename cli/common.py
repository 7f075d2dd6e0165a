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


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` as one printable line: newlines, other control characters and undecodable bytes of a path
    (surrogate escapes) are written as Python escapes (``\\n``, ``\\x1b``, ``\\udcff``); ``limit`` cuts it."""
    out = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return out if limit is None or len(out) <= limit else out[: limit - 1] + "…"


_quick_exit: list[bool] = []


def exit_quickly() -> None:
    """Ask the console script to end the process as soon as this command returns successfully: stdout and stderr
    are flushed, then ``os._exit`` skips the interpreter's teardown (module by module, and ONNX Runtime's), which
    is a sizeable part of a cold ``gamexport generate``'s wall time (the bench's start-up section times a first
    token). Only for a command with nothing left to write; ``main(argv)`` called in-process never exits early."""
    _quick_exit.append(True)


def quick_exit_asked() -> bool:
    """Whether the command that ran asked for :func:`exit_quickly`."""
    return bool(_quick_exit)


#: Exit code of an unexpected exception (a bug in gamexport): the same as bad input, since the line says so.
BUG_EXIT = 2


def unexpected_line(exc: BaseException, doing: str) -> str:
    """The one line for an exception no check anticipated: its type, what the command was doing, the file it
    names (OSError and friends carry one), its message cut to one short line, and what to do."""
    name = getattr(exc, "filename", None) or getattr(exc, "path", None)
    where = f" ({one_line(str(name))})" if name else ""
    message = one_line(str(exc), 300) or "no message"
    kind = type(exc).__module__ + "." if type(exc).__module__ not in ("builtins", "__main__") else ""
    return (f"error: unexpected {kind}{type(exc).__qualname__} while {doing}{where}: {message}. This is a bug in "
            "gamexport: rerun with --debug and report the traceback")


def run(fn: Callable[[], T], debug: bool = False) -> T:
    """Run a command body: known errors become one line and exit code 2 (1 for failed parity); any other
    exception too (``unexpected_line``), so a user never sees a traceback without ``--debug``."""
    from gamexport.errors import GamexportError, ParityError

    try:
        return fn()
    except typer.Exit:
        raise
    except GamexportError as exc:
        if debug_enabled(debug):
            raise
        say(f"error: {one_line(exc.line())}")
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
        where = f" ({one_line(str(exc.filename))})" if getattr(exc, "filename", None) else ""
        say(f"error: {one_line(str(exc.strerror or exc))}{where}. Check the path and its permissions, and free "
            "disk space.")
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        if debug_enabled(debug) or isinstance(exc, typer.BadParameter.__mro__[2]):  # click's: main() prints them
            raise
        say(unexpected_line(exc, f"running gamexport {_command()}"))
        raise typer.Exit(BUG_EXIT) from None


def _command() -> str:
    """The command being run (``build``, ``parity`` …), for the unexpected-error line."""
    words = [a for a in sys.argv[1:] if not a.startswith("-")]
    return one_line(words[0], 40) if words else "a command"
