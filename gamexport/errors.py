"""Errors a user can fix: each carries one line saying what is wrong and how to fix it.

The CLI prints ``error: <message>`` for these (and a traceback only with ``--debug``); anything else is a bug.
"""

from __future__ import annotations


class GamexportError(Exception):
    """A problem with the user's input or environment, described in one line with its fix."""

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        text = self.message.rstrip(".")
        if not self.fix:
            return f"{text}."
        return f"{text}. {self.fix[:1].upper()}{self.fix[1:]}"


class CheckpointError(GamexportError):
    """A checkpoint that cannot be read, or whose tensors do not make a GAM model."""


class ConfigError(GamexportError):
    """A model configuration that is invalid or disagrees with the weights."""


class InputError(GamexportError):
    """Token ids or positions outside what the model accepts."""


class GraphError(GamexportError):
    """An ONNX graph that is missing, unreadable or not a gamexport graph."""


class NonFiniteError(GamexportError):
    """A runner whose logits or state came out NaN or infinite: the weights or config overflow float32."""


class ParityError(GamexportError):
    """A runner whose outputs differ from the reference beyond tolerance."""


class OutputError(GamexportError):
    """An output location that cannot be written."""


class NothingCheckedError(GamexportError):
    """A parity run with no gated row: nothing was measured against a gate, so it cannot pass (exit 2, not 1:
    nothing was found to differ; the request cannot be checked here)."""
