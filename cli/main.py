"""Entry point of the ``gamexport`` command. Heavy imports happen inside command bodies, so --help is quick."""

from __future__ import annotations

from typing import Annotated

import typer

from gamexport import __version__

from . import coercion
from .bench import bench
from .build import build
from .generate import generate
from .inspect import inspect
from .parity import parity
from .train import train
from .verify import verify

coercion.install()  # plain option values without pydantic: ~85 ms of a cold `gamexport generate`

app = typer.Typer(
    name="gamexport",
    help="Export Gated Associative Memory (GAM) language models to ONNX Runtime (and TensorRT), "
         "with parity and latency checked against eager PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    # Plain help: rendering it with rich costs ~150 ms of imports, which --help's 0.3 s budget cannot afford.
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"gamexport {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """gamexport: GAM checkpoint → custom ONNX graph → engines, with parity and latency in one report."""


app.command("build")(build)
app.command("generate")(generate)
app.command("inspect")(inspect)
app.command("parity")(parity)
app.command("verify")(verify)
app.command("bench")(bench)
app.command("train")(train)


_TERMINATING = ("SIGTERM", "SIGHUP")   # handled like Ctrl-C (SIGINT), unless the process was started ignoring them
_caught: list[int] = []


def _interrupt(signum: int, _frame) -> None:
    """SIGTERM/SIGHUP: raise KeyboardInterrupt in the main thread, so every Ctrl-C clean-up path runs (a build
    removes its staging folder and lock, a fresh training run its folder). Further ones are ignored meanwhile,
    so a second signal cannot cut the clean-up short; SIGKILL still ends the process."""
    import signal

    _caught.append(signum)
    for name in _TERMINATING:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """Treat SIGTERM and SIGHUP like Ctrl-C. A signal the process inherited as ignored (``nohup``) stays so."""
    import signal

    for name in _TERMINATING:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _interrupt)


def main(argv: list[str] | None = None) -> None:
    """Run the command line; a usage error (unknown option or command, a value out of range) is one line.

    SIGTERM and SIGHUP interrupt a command as Ctrl-C does (same clean-up, same ``interrupted:`` line); the exit
    code is 130 for Ctrl-C and 128 + the signal's number for the others (143 for SIGTERM, 129 for SIGHUP).

    typer would print its usage box; gamexport's rule is one ``error:`` line with the fix, exit 2, as for every
    other bad input. The same line with the traceback comes with ``GAMEXPORT_DEBUG=1``.
    """
    import sys

    from .common import debug_enabled

    usage_error = typer.BadParameter.__mro__[1]        # typer's own (vendored) click UsageError
    click_error = typer.BadParameter.__mro__[2]        # ... and ClickException
    install_signal_handlers()
    try:
        rc = app(args=argv, standalone_mode=False)
    except usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":   # bare `gamexport`: the help, as asked for
            exc.show()
            sys.exit(exc.exit_code)
        if debug_enabled():
            raise
        message = exc.format_message().rstrip(".")
        command = exc.ctx.command_path if exc.ctx is not None else "gamexport"
        print(f"error: {message}. Run '{command} --help' for the options.", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click_error as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        if _caught:         # a signal before or after the command body: nothing of the command ran or was written
            print("interrupted", file=sys.stderr)
            sys.exit(128 + _caught[0])
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    rc = rc if isinstance(rc, int) else 0
    if _caught and rc == 130:   # interrupted by SIGTERM/SIGHUP, cleaned up like Ctrl-C: exit as 128 + signal
        rc = 128 + _caught[0]
    from .common import quick_exit_asked

    if argv is None and rc == 0 and quick_exit_asked() and not _caught:   # the console script, done: skip the teardown
        import os

        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:   # a closed pipe: leave it to the interpreter's usual exit
            sys.exit(rc)
        os._exit(0)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    main()
