"""An ONNX file's protobuf read and written field by field, so that inline weights are never held in memory.

Why a hand-written walk of the wire format: neither onnx nor onnx_ir can read a model without its inline
weights, or write one without holding them. ``onnx.load_model`` parses the whole file (``ParseFromString``
of every byte: the file's bytes and the parsed message live side by side); ``onnx_ir.load`` is that same
``onnx.load`` followed by ``serde.deserialize_model`` (its ``TensorProtoTensor`` wraps the parsed protos);
``onnx_ir.save`` is ``serde.serialize_model`` (each tensor's bytes copied into a new proto) then
``SerializeToString`` (one more copy of everything); ``onnx_ir.external_data`` only moves tensors *to* a data
file, after they are in memory. None of them takes a byte range or a stream. Protobuf's wire format makes both
directions simple: a message is a sequence of (tag, value) fields in any order, a length-delimited field is its
length then its bytes, so a message can be read or assembled from parts.

- :func:`read_skeleton`: the file's bytes with every ``raw_data`` of at least ``threshold`` bytes taken out of
  its TensorProto (the main graph's initializers: the weights), the tensor marked as external data
  stored in the model file itself at the payload's offset. The skeleton parses like any model (a few MB for a
  model of any size); onnx_ir turns the marked tensors into :class:`onnx_ir.ExternalTensor` objects that map
  the file only when something reads them. Only messages long enough to hold such a payload are walked.
- :func:`write_spliced`: a serialized model written to a file, each TensorProto whose external-data location is
  one of ``splice``'s keys written inline instead, its ``raw_data`` copied file to file from the byte range
  given (``copy_file_range``: never in this process's memory), every enclosing length recomputed.

Every length and tag is checked against the end of its message: a file the walk cannot read raises
:class:`WireError`, and the caller falls back to protobuf's own parser for the authoritative verdict.
"""

from __future__ import annotations

__all__ = ["FileRange", "Lazy", "WireError", "read_skeleton", "write_spliced"]

import dataclasses
import mmap
from collections.abc import Callable

import onnx


class WireError(ValueError):
    """The bytes are not protobuf this walk can follow (truncated, a length past the end, a group)."""


def _numbers(message: type, *names: str) -> list[int]:
    fields = message.DESCRIPTOR.fields_by_name
    return [fields[n].number for n in names]


# For each message kind, the length-delimited fields that may (directly or deeper) hold a TensorProto, and the
# kind of message they hold. Everything else is copied as it is.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _TENSOR = "model", "graph", "node", "attribute", "function", "tensor"
_SCHEMA: dict[str, dict[int, str]] = {
    _MODEL: dict(zip(_numbers(onnx.ModelProto, "graph", "functions"), (_GRAPH, _FUNCTION), strict=True)),
    _GRAPH: dict(zip(_numbers(onnx.GraphProto, "node", "initializer"), (_NODE, _TENSOR), strict=True)),
    _NODE: dict(zip(_numbers(onnx.NodeProto, "attribute"), (_ATTRIBUTE,), strict=True)),
    _ATTRIBUTE: dict(zip(_numbers(onnx.AttributeProto, "t", "g", "tensors", "graphs"),
                         (_TENSOR, _GRAPH, _TENSOR, _GRAPH), strict=True)),
    # (a function's attribute defaults are left alone: onnx_ir does not give their tensors a folder)
    _FUNCTION: dict(zip(_numbers(onnx.FunctionProto, "node"), (_NODE,), strict=True)),
}
# What read_skeleton leaves in the file: the main graph's initializers only, where weights live. Tensors of node
# attributes (Constant) and of subgraphs are parsed: onnxruntime sessions built from parts of the graph in memory
# (rotation cones, masks, the load check) serialise them, and those sessions have no folder to read a file from.
_READ_SCHEMA: dict[str, dict[int, str]] = {
    _MODEL: {_numbers(onnx.ModelProto, "graph")[0]: _GRAPH},
    _GRAPH: {_numbers(onnx.GraphProto, "initializer")[0]: _TENSOR},
}
_RAW_DATA, _EXTERNAL_DATA, _DATA_LOCATION, _DATA_TYPE = _numbers(onnx.TensorProto, "raw_data", "external_data",
                                                               "data_location", "data_type")
_KEY, _VALUE = _numbers(onnx.StringStringEntryProto, "key", "value")
_LENGTH_DELIMITED = 2
_EXTERNAL = onnx.TensorProto.EXTERNAL


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("a number runs past the end of its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("a number longer than 10 bytes")


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _encode_varint(number << 3 | wire_type)


def _fields(buf, pos: int, end: int):
    """(number, wire type, field start, value start, field end) of each field in buf[pos:end]; the value start
    is that of a length-delimited field's bytes (after its length), else of the value itself."""
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("a field numbered 0")
        value = pos
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == _LENGTH_DELIMITED:
            n, pos = _varint(buf, pos, end)
            value = pos
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise WireError(f"wire type {wire} (groups are not ONNX)")
        if pos > end:
            raise WireError("a field runs past the end of its message")
        yield number, wire, start, value, pos


@dataclasses.dataclass(frozen=True)
class Lazy:
    """A tensor payload left in the file: ``length`` bytes at ``offset``."""

    offset: int
    length: int


def _entry(key: str, value: str) -> bytes:
    body = b"".join(_tag(n, _LENGTH_DELIMITED) + _encode_varint(len(s)) + s
                    for n, s in ((_KEY, key.encode()), (_VALUE, value.encode())))
    return _tag(_EXTERNAL_DATA, _LENGTH_DELIMITED) + _encode_varint(len(body)) + body


def read_skeleton(buf: bytes | mmap.mmap, location: str, threshold: int) -> tuple[bytes, list[Lazy]]:
    """(the model's bytes without its large inline payloads, where they are). ``buf``: the whole file (an mmap:
    only the pages of the messages walked are read); ``location``: the model file's name, written as the marked
    tensors' external-data location. A tensor that has external data already is left as it is."""
    found: list[Lazy] = []

    def tensor(pos: int, end: int) -> bytes | None:
        raw = None
        external = strings = False
        for number, wire, start, value, stop in _fields(buf, pos, end):
            if number == _RAW_DATA and wire == _LENGTH_DELIMITED:
                raw = (start, value, stop)  # protobuf: the last one counts
            elif number in (_EXTERNAL_DATA, _DATA_LOCATION):
                external = True
            elif number == _DATA_TYPE and wire == 0:
                strings = _varint(buf, value, stop)[0] == onnx.TensorProto.STRING  # left to the loading policy
        if raw is None or external or strings or raw[2] - raw[1] < threshold:
            return None
        start, value, stop = raw
        found.append(Lazy(value, stop - value))
        kept = b"".join(bytes(buf[s:e]) for number, wire, s, _, e in _fields(buf, pos, end)
                        if not (number == _RAW_DATA and wire == _LENGTH_DELIMITED))
        return (kept + _entry("location", location) + _entry("offset", str(value))
                + _entry("length", str(stop - value)) + _tag(_DATA_LOCATION, 0) + _encode_varint(_EXTERNAL))

    def message(kind: str, pos: int, end: int) -> bytes | None:
        """The message's new bytes, or None when nothing in it changes."""
        if kind == _TENSOR:
            return tensor(pos, end)
        schema = _READ_SCHEMA[kind]
        parts: list[bytes] = []
        copied = pos  # bytes [copied, field start) are still to be copied as they are
        changed = False
        for number, wire, start, value, stop in _fields(buf, pos, end):
            child = schema.get(number)
            if child is None or wire != _LENGTH_DELIMITED or stop - value < threshold:
                continue
            new = message(child, value, stop)
            if new is None:
                continue
            changed = True
            parts.append(bytes(buf[copied:start]))
            parts.append(_tag(number, _LENGTH_DELIMITED) + _encode_varint(len(new)) + new)
            copied = stop
        if not changed:
            return None
        parts.append(bytes(buf[copied:end]))
        return b"".join(parts)

    new = message(_MODEL, 0, len(buf))
    return (bytes(buf) if new is None else new), found


@dataclasses.dataclass(frozen=True)
class FileRange:
    """``length`` bytes of the file at ``path``, from ``offset``: a payload written without being read here."""

    path: str
    offset: int
    length: int


def _external_location(buf, pos: int, end: int) -> str | None:
    """The external-data location of the TensorProto in buf[pos:end], when it is stored as external data."""
    location = None
    external = False
    for number, wire, _, value, stop in _fields(buf, pos, end):
        if number == _DATA_LOCATION and wire == 0:
            external = _varint(buf, value, stop)[0] == _EXTERNAL
        elif number == _EXTERNAL_DATA and wire == _LENGTH_DELIMITED:
            entry: dict[int, bytes] = {}
            for n, w, _, v, s in _fields(buf, value, stop):
                if w == _LENGTH_DELIMITED:
                    entry[n] = bytes(buf[v:s])
            if entry.get(_KEY) == b"location":
                location = entry.get(_VALUE, b"").decode("utf-8", "replace")
    return location if external else None


def write_spliced(data: bytes, splice: dict[str, FileRange], write: Callable[[bytes], None],
                  copy: Callable[[FileRange], None], max_size: int | None = None) -> int:
    """Write the serialized model ``data`` through ``write`` (bytes) and ``copy`` (a payload file to file), each
    TensorProto stored as external data at a location that is a key of ``splice`` written inline: its fields
    but the external-data ones, its ``raw_data`` (the range ``splice`` gives) in field-number order, as protobuf
    writes a tensor. Returns the bytes written; raises ValueError, before writing anything, when they would be
    more than ``max_size``."""

    def tensor(pos: int, end: int) -> tuple[list, int] | None:
        location = _external_location(data, pos, end)
        if location is None or location not in splice:
            return None
        payload = splice[location]
        head = _tag(_RAW_DATA, _LENGTH_DELIMITED) + _encode_varint(payload.length)
        before: list[bytes] = []
        after: list[bytes] = []
        for number, _, start, _, stop in _fields(data, pos, end):
            if number in (_EXTERNAL_DATA, _DATA_LOCATION):
                continue
            (before if number < _RAW_DATA else after).append(data[start:stop])
        parts = [*before, head, payload, *after]
        return parts, sum(len(p) for p in before) + len(head) + payload.length + sum(len(p) for p in after)

    def message(kind: str, pos: int, end: int) -> tuple[list, int] | None:
        if kind == _TENSOR:
            return tensor(pos, end)
        schema = _SCHEMA[kind]
        parts: list = []
        size = 0
        copied = pos
        changed = False
        for number, wire, start, value, stop in _fields(data, pos, end):
            child = schema.get(number)
            if child is None or wire != _LENGTH_DELIMITED:
                continue
            new = message(child, value, stop)
            if new is None:
                continue
            changed = True
            inner, n = new
            head = _tag(number, _LENGTH_DELIMITED) + _encode_varint(n)
            parts += [data[copied:start], head, *inner]
            size += (start - copied) + len(head) + n
            copied = stop
        if not changed:
            return None
        parts.append(data[copied:end])
        return parts, size + (end - copied)

    new = message(_MODEL, 0, len(data)) if splice else None  # nothing to splice: no walk
    parts, size = new if new is not None else ([data], len(data))
    if max_size is not None and size > max_size:
        raise ValueError(f"the model would take {size} bytes in one file, more than protobuf can read (2 GiB)")
    for part in parts:
        if isinstance(part, FileRange):
            copy(part)
        elif part:
            write(part)
    return size
