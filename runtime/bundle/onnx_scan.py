"""Does an ONNX file keep tensors outside itself (ONNX "external data")? Answered without the ``onnx`` package.

A bundle's sha256 covers each ``.onnx`` file; ONNX Runtime would also read any external-data file the model names
(relative to the model, or to the working directory when loaded from bytes), bytes no hash covers. Bundles therefore
must hold every weight inside the ``.onnx`` file (flare-export writes them so; ONNX's 2 GB protobuf limit is far
above a SegResNetDS). :func:`uses_external_data` walks the protobuf's structure (model → graphs, functions → nodes →
attributes → tensors, sparse tensors and subgraphs) skipping every payload by its length, and reports a tensor with
``data_location = EXTERNAL`` or ``external_data`` entries. A file that is not valid protobuf raises ``ValueError``.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

__all__ = ["uses_external_data"]

_MODEL, _GRAPH, _FUNCTION, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE = range(7)
#: message kind -> {field number: message kind of that (length-delimited) field}
_CHILDREN = {
    _MODEL: {7: _GRAPH, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _FUNCTION: {7: _NODE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}
_EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 13, 14, 1
_MAX_DEPTH = 64


def _varint(buf: mmap.mmap | bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or invalid protobuf varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field, wire type, value or payload start, payload end)`` of one message's fields."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield field, wire, value, i
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > end:
                raise ValueError("protobuf field runs past its message")
            yield field, wire, i, i + size
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if i != end:
        raise ValueError("protobuf message ends inside a field")


def _external(buf: mmap.mmap | bytes, start: int, end: int, kind: int, depth: int) -> bool:
    if depth > _MAX_DEPTH:
        raise ValueError("protobuf nested too deeply")
    children = _CHILDREN[kind]
    for field, wire, a, b in _fields(buf, start, end):
        if kind == _TENSOR and ((field == _EXTERNAL_DATA and wire == 2)
                                or (field == _DATA_LOCATION and wire == 0 and a == _EXTERNAL)):
            return True
        if wire == 2 and field in children and _external(buf, a, b, children[field], depth + 1):
            return True
    return False


def uses_external_data(path: str | Path) -> bool:
    """Whether the ONNX model at ``path`` stores any tensor in an external-data file."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise ValueError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _external(buf, 0, len(buf), _MODEL, 0)
