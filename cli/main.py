"""Entry point of the ``gamexport`` command. Heavy imports happen inside command bodies, so --help is quick."""

from __future__ import annotations

from typing import Annotated

import typer

from gamexport import __version__

from .bench import bench
from .build import build
from .generate import generate
from .inspect import inspect
from .parity import parity
from .train import train
from .verify import verify

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


def main(argv: list[str] | None = None) -> None:
    """Run the command line; a usage error (unknown option or command, a value out of range) is one line.

    typer would print its usage box; gamexport's rule is one ``error:`` line with the fix, exit 2, as for every
    other bad input. The same line with the traceback comes with ``GAMEXPORT_DEBUG=1``.
    """
    import sys

    from .common import debug_enabled

    usage_error = typer.BadParameter.__mro__[1]        # typer's own (vendored) click UsageError
    click_error = typer.BadParameter.__mro__[2]        # ... and ClickException
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
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
