"""Where an ONNX file reads external data from, without the ``onnx`` package (not a runtime dependency).

An ONNX tensor may keep its bytes in another file (``external_data`` entries ``location``/``offset``/
``length``).  ONNX Runtime resolves that location relative to the model; recent releases refuse paths
that leave the model's directory, older ones do not.  The engine loader therefore reads the locations
itself -- a small protobuf wire-format walk over exactly the fields that can hold tensors -- and
accepts only files the manifest lists (hashed, regular, inside the directory).

ONNX field numbers (onnx.proto): ModelProto graph=7, training_info=20, functions=25; GraphProto
node=1, initializer=5, sparse_initializer=15; NodeProto attribute=5; AttributeProto t=5, g=6,
tensors=10, graphs=11, sparse_tensor=22, sparse_tensors=23; SparseTensorProto values=1, indices=2;
TensorProto external_data=13; StringStringEntryProto key=1, value=2; FunctionProto node=7;
TrainingInfoProto initialization=1, algorithm=2.
"""
from __future__ import annotations

import mmap
from pathlib import Path

MAX_DEPTH = 64  # nested graphs (If/Loop bodies) deeper than this are refused, not recursed into


class OnnxScanError(ValueError):
    """The file is not a well-formed ONNX protobuf."""


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= end or shift > 63:
            raise OnnxScanError("truncated or overlong varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field)."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, end)
            yield field, wire, value
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise OnnxScanError("a length-delimited field runs past its message")
            yield field, wire, (i, i + n)
            i += n
        else:
            raise OnnxScanError(f"unsupported protobuf wire type {wire}")
        if i > end:
            raise OnnxScanError("a field runs past its message")


def _children(buf, span, wanted: dict[int, str]):
    for field, wire, value in _fields(buf, *span):
        if wire == 2 and field in wanted:
            yield wanted[field], value


_MESSAGES = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def external_locations(path: str | Path) -> set[str]:
    """Every ``location`` of every external-data tensor in the ONNX file at ``path``."""
    found: set[str] = set()
    with open(path, "rb") as f:
        if Path(path).stat().st_size == 0:
            raise OnnxScanError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                stack = [("model", (0, len(buf)), 0)]
                while stack:
                    kind, span, depth = stack.pop()
                    if depth > MAX_DEPTH:
                        raise OnnxScanError(f"graphs nested deeper than {MAX_DEPTH}")
                    if kind == "tensor":
                        for name, entry in _children(buf, span, {13: "entry"}):
                            key = value = None
                            for field, wire, v in _fields(buf, *entry):
                                if wire == 2 and field in (1, 2):
                                    text = bytes(buf[v[0]:v[1]]).decode("utf-8", errors="replace")
                                    key, value = (text, value) if field == 1 else (key, text)
                            if key == "location":
                                found.add(value or "")
                        continue
                    for child, child_span in _children(buf, span, _MESSAGES[kind]):
                        stack.append((child, child_span, depth + (child == "graph")))
            finally:
                buf.release()
    return found
