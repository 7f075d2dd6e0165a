"""What gamexport checks in an ONNX file before ONNX Runtime loads it, read without the onnx package.

Running a build folder needs two facts from its step graph that an ONNX Runtime session cannot give safely or at
all: where its tensors read external data from (checked *before* ONNX Runtime opens anything on the file's behalf),
and the shapes of its embedding tables (a session hides initializers). Parsing the whole file with ``onnx.load``
costs importing onnx (~30 ms) and copying every weight into a Python protobuf (~70 ms for the paper model's 90 MB
step graph). This module walks the protobuf wire format of the ``ModelProto`` instead, from a read-only memory
map: it descends only into the messages that can hold a ``TensorProto`` and skips everything else — the raw
weight bytes above all — by its length, so it reads a few kilobytes of a 90 MB file.

The walk follows protobuf's decoding rules, so it sees what ONNX Runtime's parser sees:

* a field whose wire type is not the one ``onnx.proto`` declares is an unknown field, kept but not interpreted;
  unknown fields (groups included) are skipped;
* a singular message field may occur more than once in the bytes, and a parser *merges* the occurrences — which
  is why a tensor is judged by every ``location`` entry any occurrence of it has, not by the last one read
  (see :func:`check_external_data`);
* bytes that are not a well-formed encoding along the walked path — a length or varint running past its message,
  wire type 6 or 7, field number 0, an unmatched end-group, nesting deeper than 100 messages — raise
  :class:`DecodeError`, as ``onnx.load`` does for them. A file cut inside any field is always caught, since the
  walk frames every field of the top-level message (a file cut exactly between two top-level fields is a
  well-formed, shorter model to every parser). Damage inside a message the walk skips (a node's op type, a weight's
  bytes) is left to ONNX Runtime's own parser, which refuses the file when it loads it (one line, ``ONNX Runtime
  cannot load …``); such damage cannot change which files are opened.

``onnx.proto`` field numbers used here (IR version 10): ModelProto graph 7, training_info 20, functions 25;
GraphProto node 1, initializer 5, sparse_initializer 15; NodeProto attribute 5; AttributeProto t 5, g 6, tensors
10, graphs 11, sparse_tensor 22, sparse_tensors 23; FunctionProto node 7, attribute_proto 11; TrainingInfoProto
initialization 1, algorithm 2; SparseTensorProto values 1, indices 2; TensorProto dims 1, name 8, external_data
13, data_location 14 (EXTERNAL = 1); StringStringEntryProto key 1, value 2.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GraphError


class DecodeError(ValueError):
    """The bytes are not a well-formed protobuf encoding (named as protobuf's own error for the same bytes)."""


#: Deepest message nesting the walk follows (protobuf's default recursion limit).
MAX_DEPTH = 100

_MASK64 = (1 << 64) - 1
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass
class TensorRef:
    """One ``TensorProto`` occurrence in the file: its name, whether it says its data is external, and the value of
    every ``location`` entry of its ``external_data``."""

    name: str
    external: bool
    locations: list[str]


@dataclass
class OnnxScan:
    """What :func:`scan` read: every tensor occurrence (document order) and the dims of the main graph's
    initializers that were asked for."""

    tensors: list[TensorRef] = field(default_factory=list)
    initializer_dims: dict[str, list[int]] = field(default_factory=dict)


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift >= 70:
            raise DecodeError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _MASK64, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, a, b) of each field of the message in ``buf[start:end]``: for a varint, a is its
    value; for a length-delimited field, ``buf[a:b]`` is its payload. Fixed-width fields and groups are skipped."""
    yield from _walk_fields(buf, start, end, None, 0)


def _walk_fields(buf, pos: int, end: int, group: int | None, depth: int):
    """The fields from ``pos`` (see :func:`_fields`) up to ``end`` — or, inside group ``group``, up to its
    end-group; returns the position after it. A nested group's fields are skipped, not yielded."""
    if depth > MAX_DEPTH:
        raise DecodeError("groups nested too deeply")
    while group is not None or pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0 or key >> 32:
            raise DecodeError(f"invalid field key {key}")
        if wire == 4 and group is not None:
            if number != group:
                raise DecodeError("mismatched end-group")
            return pos
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, 0, value, 0
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise DecodeError("a length-delimited field runs past its message")
            yield number, 2, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise DecodeError("a fixed-width field runs past its message")
        elif wire == 3:
            skipped = _walk_fields(buf, pos, end, number, depth + 1)
            while True:   # drain the group: its fields are not this message's
                try:
                    next(skipped)
                except StopIteration as done:
                    pos = done.value
                    break
        else:  # 4: an end-group without its start; 6, 7: no such wire type
            raise DecodeError(f"invalid wire type {wire}")
    return pos


def _text(buf, a: int, b: int) -> str:
    return bytes(buf[a:b]).decode("utf-8", "surrogateescape")


def _int64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


#: The messages that can hold a TensorProto, and which of their fields lead to one (field number → message).
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function", 20: "training_info"},
    "training_info": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 10: "tensor", 6: "graph", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


class _Walk:
    def __init__(self, buf, dims_of: tuple[str, ...]):
        self.buf = buf
        self.dims_of = set(dims_of)
        self.out = OnnxScan()

    def _depth(self, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise DecodeError("messages nested too deeply")
        return depth + 1

    def model(self, a: int, b: int) -> None:
        self.message("model", a, b, 1)

    def message(self, kind: str, a: int, b: int, depth: int, main: bool = False) -> None:
        """Walk one message of ``kind``: descend into the length-delimited fields :data:`_CHILDREN` names, skip
        the rest. ``main``: this is the model's own graph (its initializers' dims may be asked for)."""
        depth = self._depth(depth) if kind != "model" else depth
        children = _CHILDREN[kind]
        for number, wire, s, e in _fields(self.buf, a, b):
            child = children.get(number) if wire == 2 else None
            if child == "tensor":
                self.tensor(s, e, depth, initializer=main and kind == "graph" and number == 5)
            elif child is not None:
                self.message(child, s, e, depth, main=kind == "model" and child == "graph")

    def tensor(self, a: int, b: int, depth: int, initializer: bool = False) -> None:
        depth = self._depth(depth)
        buf = self.buf
        name, external, locations, dims = "", False, [], []
        for number, wire, s, e in _fields(buf, a, b):
            if number == 8 and wire == 2:
                name = _text(buf, s, e)
            elif number == 14 and wire == 0:
                value = s & 0xFFFFFFFF  # an int32 enum; values outside it are unknown fields (proto2 closed enum)
                if value in (0, _EXTERNAL):
                    external = value == _EXTERNAL
            elif number == 13 and wire == 2:
                key = value = None
                for n2, w2, s2, e2 in _fields(buf, s, e):
                    if w2 == 2 and n2 == 1:
                        key = bytes(buf[s2:e2])
                    elif w2 == 2 and n2 == 2:
                        value = _text(buf, s2, e2)
                if key == b"location":
                    locations.append(value if value is not None else "")
            elif number == 1 and initializer:
                if wire == 0:
                    dims.append(_int64(s))
                elif wire == 2:  # packed
                    pos = s
                    while pos < e:
                        value, pos = _varint(buf, pos, e)
                        dims.append(_int64(value))
        self.out.tensors.append(TensorRef(name, external, locations))
        if initializer and name in self.dims_of:
            self.out.initializer_dims[name] = dims


def scan(path: str | Path, dims_of: tuple[str, ...] = ()) -> OnnxScan:
    """Every tensor occurrence of the ONNX file at ``path`` and the dims of its main graph's initializers named in
    ``dims_of``. DecodeError for bytes that are not a well-formed encoding along the walk; OSError from reading."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):  # an empty file is an empty ModelProto
            return OnnxScan()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            walk = _Walk(buf, dims_of)
            walk.model(0, len(buf))
            return walk.out


def check_external_data(path: str | Path, dims_of: tuple[str, ...] = ()) -> OnnxScan:
    """Refuse an ONNX file any of whose tensors may read external data from outside its own folder (an absolute
    path, ``..``, a link that resolves outside, or no location at all); what :func:`scan` read, for callers that
    need more of it (one read of the file, not two).

    A tensor is refused when any ``location`` entry of any occurrence of it points outside the folder, whatever its
    ``data_location`` says — the occurrences of one tensor may be merged by ONNX Runtime's parser, so a location
    in one occurrence can be the one that counts when another says the data is external — and when it says its data
    is external but gives no location. Every tensor the file can hold is looked at: initializers (dense and sparse)
    and attribute tensors of the main graph, of subgraphs at any depth, of local functions (their nodes and
    attribute defaults) and of training info. Nothing is opened on the file's behalf first.
    """
    path = Path(path)
    try:
        found = scan(path, dims_of)
    except (DecodeError, OSError, ValueError) as exc:
        raise GraphError(f"cannot read ONNX file {path}: {type(exc).__name__}",
                         "the file is truncated or corrupt; rebuild it with gamexport build") from exc
    folder = path.parent.resolve()
    for tensor in found.tensors:
        for location in (tensor.locations or ([""] if tensor.external else [])):
            target = (folder / location).resolve()
            if not location or Path(location).is_absolute() or folder not in target.parents:
                raise GraphError(f"{path.name}: tensor {tensor.name!r} reads external data from {location!r}, "
                                 f"outside {folder}", "refusing to load it; only use ONNX files you trust")
    return found
