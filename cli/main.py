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
    rich_markup_mode="markdown",
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


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
