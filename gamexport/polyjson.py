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
from .jsonfile import ANY, MIB, List, Map, Obj, SchemaError, Str, check, read_json, short


def encode_array(arr: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return {"array": base64.b64encode(buf.getvalue()).decode("ascii"), "polygraphy_class": "ndarray"}


def decode_array(obj: Mapping, where: str = "a Polygraphy JSON file") -> np.ndarray:
    """The array of one encoded value (``where``: the file, for errors); bad base64 or bytes that are not an
    ``.npy`` array are one line."""
    import binascii

    if obj.get("polygraphy_class") == "LazyArray":
        obj = obj.get("values")
    encoded = isinstance(obj, Mapping) and obj.get("polygraphy_class") == "ndarray"
    if not encoded or not isinstance(obj.get("array"), str):
        kind = obj.get("polygraphy_class") if isinstance(obj, Mapping) else type(obj).__name__
        raise GamexportError(f"{where}: not an encoded array: {short(kind)}",
                             "the parity files are corrupt; rebuild the folder")
    try:
        data = base64.b64decode(obj["array"], validate=True)
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: NumPy's header parser also raises SyntaxError, TokenError…
        reason = "bad base64" if isinstance(exc, binascii.Error) else "not a NumPy array"
        raise GamexportError(f"{where}: an encoded array is damaged ({reason})",
                             "the parity files are corrupt; rebuild the folder") from None


def save_feeds(path: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
    atomic_write_text(path, json.dumps([{k: encode_array(v) for k, v in feed.items()} for feed in feeds]))


def save_run_results(path: Path, runner_name: str, outputs: Sequence[Mapping[str, np.ndarray]]) -> None:
    iterations = [{"outputs": {k: {"values": encode_array(v), "polygraphy_class": "LazyArray"}
                               for k, v in out.items()},
                   "runtime": None, "runner_name": runner_name, "polygraphy_class": "IterationResult"}
                  for out in outputs]
    atomic_write_text(path, json.dumps({"lst": [[runner_name, iterations]], "polygraphy_class": "RunResults"}))


_FIX = "rebuild the folder with gamexport build"
#: One encoded array: {"polygraphy_class": "ndarray", "array": base64} or a LazyArray wrapping one.
ARRAY = Obj(required={"polygraphy_class": Str(max_len=40)})
#: prefill_inputs.json / step_inputs.json: a list of feeds, each a map of input name to array.
FEEDS_SCHEMA = List(Map(ARRAY))
#: *_outputs.json: a RunResults object; its "lst" is [[runner name, [iteration, ...]]].
RUN_RESULTS_SCHEMA = Obj(required={"lst": List(List(ANY, max_len=2)), "polygraphy_class": Str(max_len=40)})
ITERATIONS_SCHEMA = List(Obj(required={"outputs": Map(ARRAY)}))


def _read(path: Path, schema):
    return read_json(path, schema=schema, max_bytes=4096 * MIB, fix=_FIX)


def load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    return [{k: decode_array(v, str(path)) for k, v in feed.items()} for feed in _read(path, FEEDS_SCHEMA)]


def load_run_results(path: Path) -> list[dict[str, np.ndarray]]:
    """The outputs of the first runner in a RunResults file, one dict per iteration."""
    data = _read(path, RUN_RESULTS_SCHEMA)
    if not data["lst"] or len(data["lst"][0]) != 2:
        raise GamexportError(f"{path}: lst[0] must be [runner name, iterations]", _FIX)
    iterations = data["lst"][0][1]
    try:
        check(iterations, ITERATIONS_SCHEMA, "lst[0][1]")
    except SchemaError as exc:
        raise GamexportError(f"{path}: {exc}", _FIX) from None
    return [{k: decode_array(v, str(path)) for k, v in it["outputs"].items()} for it in iterations]
