"""What the toolkit reads from an ONNX file before any session: metadata, the graph's inputs, outputs
and ops, and where its tensors keep external data.

Read straight from the protobuf wire format, so the base install (predict, and evaluate of an ONNX
file) needs neither the `onnx` package nor an onnxruntime session that would load every weight.
Own code kept for that guarantee; it reads only the fields below (numbers from onnx.proto) and
tests/test_onnxfile.py checks every answer against the onnx package. Unknown fields are skipped,
as protobuf readers do, so newer ONNX files read the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# onnx.proto field numbers, per message
MODEL = {"graph": 7, "metadata_props": 14, "functions": 25}
GRAPH = {"node": 1, "initializer": 5, "input": 11, "output": 12, "sparse_initializer": 15}
NODE = {"input": 1, "output": 2, "op_type": 4, "attribute": 5}
ATTRIBUTE = {"t": 5, "g": 6, "tensors": 10, "graphs": 11, "sparse_tensor": 22, "sparse_tensors": 23}
SPARSE_TENSOR = {"values": 1, "indices": 2}
FUNCTION = {"node": 7}
TENSOR = {"name": 8, "external_data": 13, "data_location": 14}
TENSOR_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
ENTRY = {"key": 1, "value": 2}  # StringStringEntryProto
VALUE_INFO = {"name": 1, "type": 2}
TYPE = {"tensor_type": 1}
TENSOR_TYPE = {"shape": 2}
SHAPE = {"dim": 1}
DIMENSION = {"dim_value": 1, "dim_param": 2}


class NotOnnx(ValueError):
    """The bytes are not an ONNX model: a broken encoding, or no graph."""


def _varint(buf, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise NotOnnx("a number runs past the end of its message")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field of one message: an int (varint) or a view of the bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise NotOnnx("field number 0")
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):  # fixed 64 / 32 bits
            size = 8 if wire == 1 else 4
            value, i = buf[i : i + size], i + size
        elif wire == 2:  # length-delimited: strings, bytes, messages, packed arrays
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        else:
            raise NotOnnx(f"wire type {wire}")
        if i > n:
            raise NotOnnx("a field runs past the end of its message")
        yield number, value


def _all(buf, number: int) -> list:
    return [v for n, v in _fields(buf) if n == number]


def _message(buf, number: int):
    """The last occurrence of a singular message field (protobuf's rule), or an empty message."""
    found = _all(buf, number)
    if found and isinstance(found[-1], int):
        raise NotOnnx(f"field {number} is a number where a message belongs")
    return found[-1] if found else memoryview(b"")


def _text(v) -> str:
    if isinstance(v, int):
        raise NotOnnx("a number where text belongs")
    return bytes(v).decode("utf-8", "replace")


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _entries(buf, number: int) -> dict[str, str]:
    """A repeated StringStringEntryProto field as a dict."""
    out = {}
    for entry in _all(buf, number):
        kv = {n: _text(v) for n, v in _fields(entry) if n in ENTRY.values()}
        out[kv.get(ENTRY["key"], "")] = kv.get(ENTRY["value"], "")
    return out


@dataclass
class Node:
    op_type: str
    input: list[str]
    output: list[str]


@dataclass
class Value:
    name: str
    shape: list  # per dimension: an int (fixed), the parameter's name, or "?"


@dataclass
class Graph:
    """The parts of a GraphProto that predict reads; field names as onnx's (graph.node, graph.output)."""

    node: list[Node] = field(default_factory=list)
    input: list[Value] = field(default_factory=list)
    output: list[Value] = field(default_factory=list)
    initializer_names: set[str] = field(default_factory=set)


def _value(buf) -> Value:
    shape = _message(_message(_message(buf, VALUE_INFO["type"]), TYPE["tensor_type"]), TENSOR_TYPE["shape"])
    dims = []
    for dim in _all(shape, SHAPE["dim"]):
        d = dict(_fields(dim))
        if DIMENSION["dim_value"] in d:
            dims.append(_int64(d[DIMENSION["dim_value"]]))
        else:
            dims.append(_text(d.get(DIMENSION["dim_param"], b"")) or "?")
    names = _all(buf, VALUE_INFO["name"])
    return Value(_text(names[-1]) if names else "", dims)


def _tensors_of_graph(graph) -> Iterator:
    for n, v in _fields(graph):
        if n == GRAPH["initializer"]:
            yield v
        elif n == GRAPH["sparse_initializer"]:
            yield from (t for k, t in _fields(v) if k in SPARSE_TENSOR.values())
        elif n == GRAPH["node"]:
            yield from _tensors_of_node(v)


def _tensors_of_node(node) -> Iterator:
    for attr in _all(node, NODE["attribute"]):
        for a, v in _fields(attr):
            if a in (ATTRIBUTE["t"], ATTRIBUTE["tensors"]):
                yield v
            elif a in (ATTRIBUTE["g"], ATTRIBUTE["graphs"]):
                yield from _tensors_of_graph(v)
            elif a in (ATTRIBUTE["sparse_tensor"], ATTRIBUTE["sparse_tensors"]):
                yield from (t for k, t in _fields(v) if k in SPARSE_TENSOR.values())


class OnnxFile:
    """An ONNX file read into memory, as onnx.load(load_external_data=False) does.

    Raises NotOnnx when it is not a model, OSError when it cannot be read.
    """

    def __init__(self, path: str | Path):
        self.buf = memoryview(Path(path).read_bytes())  # slices of it are views, not copies
        self.graph_bytes = _message(self.buf, MODEL["graph"])
        if not len(self.graph_bytes):
            raise NotOnnx("no graph")

    def metadata(self) -> dict[str, str]:
        """ModelProto.metadata_props (what onnxruntime calls custom_metadata_map)."""
        return _entries(self.buf, MODEL["metadata_props"])

    def graph(self) -> Graph:
        g = Graph()
        for n, v in _fields(self.graph_bytes):
            if n == GRAPH["node"]:
                g.node.append(Node(_text(_message(v, NODE["op_type"])), [_text(x) for x in _all(v, NODE["input"])],
                                   [_text(x) for x in _all(v, NODE["output"])]))
            elif n == GRAPH["input"]:
                g.input.append(_value(v))
            elif n == GRAPH["output"]:
                g.output.append(_value(v))
            elif n == GRAPH["initializer"]:
                g.initializer_names.add(_text(_message(v, TENSOR["name"])))
        return g

    def external_locations(self) -> list[str]:
        """The `location` of every tensor kept outside the file (graph, subgraphs, functions), each once."""
        tensors = list(_tensors_of_graph(self.graph_bytes))
        for function in _all(self.buf, MODEL["functions"]):
            tensors += [t for node in _all(function, FUNCTION["node"]) for t in _tensors_of_node(node)]
        found = {}
        for t in tensors:
            if TENSOR_EXTERNAL in _all(t, TENSOR["data_location"]):
                found[_entries(t, TENSOR["external_data"]).get("location", "")] = None
        return list(found)
