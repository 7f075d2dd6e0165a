"""Parity inputs and reference outputs in Polygraphy's JSON format, written and read with NumPy alone.

``polygraphy run model.onnx --onnxrt --load-inputs prefill_inputs.json --load-outputs prefill_outputs.json``
re-checks a build with NVIDIA's tool; ``gamexport parity DIR`` re-checks it without torch. The format: a list
of feed dicts (inputs), and a ``RunResults`` object (outputs); arrays are the bytes of ``numpy.save``, base64.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import GamexportError
from .fsutil import atomic_write_text


def encode_array(arr: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return {"array": base64.b64encode(buf.getvalue()).decode("ascii"), "polygraphy_class": "ndarray"}


def decode_array(obj: Mapping) -> np.ndarray:
    if obj.get("polygraphy_class") == "LazyArray":
        obj = obj["values"]
    if obj.get("polygraphy_class") != "ndarray":
        raise GamexportError(f"not an encoded array: {obj.get('polygraphy_class')!r}",
                             "the parity files are corrupt; rebuild the folder")
    return np.load(io.BytesIO(base64.b64decode(obj["array"])), allow_pickle=False)


def save_feeds(path: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
    atomic_write_text(path, json.dumps([{k: encode_array(v) for k, v in feed.items()} for feed in feeds]))


def save_run_results(path: Path, runner_name: str, outputs: Sequence[Mapping[str, np.ndarray]]) -> None:
    iterations = [{"outputs": {k: {"values": encode_array(v), "polygraphy_class": "LazyArray"}
                               for k, v in out.items()},
                   "runtime": None, "runner_name": runner_name, "polygraphy_class": "IterationResult"}
                  for out in outputs]
    atomic_write_text(path, json.dumps({"lst": [[runner_name, iterations]], "polygraphy_class": "RunResults"}))


def _read(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GamexportError(f"cannot read {path}: {exc}", "rebuild the folder with gamexport build") from exc


def load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    return [{k: decode_array(v) for k, v in feed.items()} for feed in _read(path)]


def load_run_results(path: Path) -> list[dict[str, np.ndarray]]:
    """The outputs of the first runner in a RunResults file, one dict per iteration."""
    data = _read(path)
    try:
        _, iterations = data["lst"][0]
        return [{k: decode_array(v) for k, v in it["outputs"].items()} for it in iterations]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise GamexportError(f"{path} is not a Polygraphy RunResults file", "rebuild the folder") from exc
