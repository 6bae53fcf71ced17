"""A protobuf wire-format walker that copies an ONNX ``ModelProto`` without its tensor payloads.

``onnx.load`` reads a whole model -- weights included -- into memory before anything can be
looked at; a VGG19 file is half a gigabyte of floats we never need.  This module walks the
serialized message over a read-only buffer (normally an ``mmap`` of the file, so pages holding
weights are never touched) and produces a *stripped copy*: the same message with every
TensorProto payload field removed.  The copy is a few kilobytes to a few megabytes and can be
handed to ``onnx.ModelProto().ParseFromString`` and to shape inference.

What is kept and what is dropped:

* TensorProto payload fields -- ``float_data`` (4), ``int32_data`` (5), ``string_data`` (6),
  ``int64_data`` (7), ``raw_data`` (9), ``double_data`` (10), ``uint64_data`` (11) -- are
  dropped, except for small integer and floating tensors: INT32/INT64/FLOAT/DOUBLE/FLOAT16
  tensors of at most :data:`SMALL_TENSOR_ELEMENTS` elements whose payload is at most
  :data:`SMALL_PAYLOAD_BYTES` bytes keep their values.  Those are shape vectors (Reshape targets,
  ConstantOfShape inputs) and scales (Resize/Upsample ``scales``) that shape inference needs to
  compute output sizes, not weights.  ``dims``, ``data_type``, ``name``, ``data_location`` and
  ``external_data`` (file name strings only) are kept; no external file is ever opened.
* Everything that can contain a TensorProto is walked: ModelProto.graph/functions/training_info,
  TrainingInfoProto graphs, GraphProto.node/initializer/sparse_initializer, NodeProto.attribute,
  AttributeProto.t/g/tensors/graphs/sparse_tensor/sparse_tensors, SparseTensorProto
  values/indices, FunctionProto.node/attribute_proto.  All other fields are copied byte for byte.

Safety: every varint and length is checked against the end of its enclosing message (a
truncated file gives :class:`MalformedModelError` "truncated protobuf ..."), group wire types
(3, 4) and the undefined ones (6, 7) are rejected, the walk is depth-bounded by
:data:`biasinspect.limits.MAX_PROTO_DEPTH` (so no ``RecursionError`` can escape) and the copy is
capped at :data:`biasinspect.limits.MAX_ONNX_STRIPPED_BYTES`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from biasinspect import limits
from biasinspect.errors import MalformedModelError, ResourceLimitError
from biasinspect.source import Buffer

SMALL_TENSOR_ELEMENTS = 64
"""Integer and floating tensors with at most this many elements keep their data (shape vectors,
scales)."""

SMALL_PAYLOAD_BYTES = SMALL_TENSOR_ELEMENTS * 10
"""Largest kept payload, counting only the data (not field tags and length prefixes): 64 varints
of at most 10 bytes.  A "small" tensor whose payload is bigger than this is lying about its size,
and its payload is dropped like any other."""

# Wire types.
_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5

# TensorProto field numbers.
_T_DIMS = 1
_T_DATA_TYPE = 2
_T_PAYLOAD_FIELDS = frozenset({4, 5, 6, 7, 9, 10, 11})
_T_RAW_DATA = 9
# Kept dtypes (TensorProto.DataType) -> the typed payload field that can hold their values
# (raw_data can hold any of them).
_KEPT_PAYLOAD_FIELD = {
    1: 4,  # FLOAT: float_data
    6: 5,  # INT32: int32_data
    7: 7,  # INT64: int64_data
    10: 5,  # FLOAT16: int32_data (bit patterns)
    11: 10,  # DOUBLE: double_data
}


# What the walker reads from: a source's view() (an ``mmap`` of a local file; fetched blocks of a
# remote one) or any bytes-like object.


class _Msg(enum.Enum):
    """The message types whose fields may need rewriting."""

    MODEL = "ModelProto"
    TRAINING = "TrainingInfoProto"
    GRAPH = "GraphProto"
    NODE = "NodeProto"
    ATTRIBUTE = "AttributeProto"
    TENSOR = "TensorProto"
    SPARSE = "SparseTensorProto"
    FUNCTION = "FunctionProto"


# For each message type: field number -> child message type to walk into.  Fields not listed
# are copied as they are.
_CHILDREN: dict[_Msg, dict[int, _Msg]] = {
    _Msg.MODEL: {7: _Msg.GRAPH, 20: _Msg.TRAINING, 25: _Msg.FUNCTION},
    _Msg.TRAINING: {1: _Msg.GRAPH, 2: _Msg.GRAPH},
    _Msg.GRAPH: {1: _Msg.NODE, 5: _Msg.TENSOR, 15: _Msg.SPARSE},
    _Msg.NODE: {5: _Msg.ATTRIBUTE},
    _Msg.ATTRIBUTE: {
        5: _Msg.TENSOR,
        6: _Msg.GRAPH,
        10: _Msg.TENSOR,
        11: _Msg.GRAPH,
        22: _Msg.SPARSE,
        23: _Msg.SPARSE,
    },
    _Msg.SPARSE: {1: _Msg.TENSOR, 2: _Msg.TENSOR},
    _Msg.FUNCTION: {7: _Msg.NODE, 11: _Msg.ATTRIBUTE},
    _Msg.TENSOR: {},
}


@dataclass
class StripResult:
    """The stripped ModelProto bytes."""

    data: bytes


class _Walker:
    """One strip pass over one buffer."""

    def __init__(self, buf: Buffer, max_depth: int, max_bytes: int) -> None:
        self.buf = buf
        self.max_depth = max_depth
        self.max_bytes = max_bytes

    # -- primitive readers -------------------------------------------------------------------

    def varint(self, pos: int, end: int, what: str) -> tuple[int, int]:
        """Decode an unsigned varint at ``pos``; return (value, next position)."""
        return decode_varint(self.buf, pos, end, what)

    def skip_field(self, wire: int, pos: int, end: int, what: str) -> int:
        """Return the position after a field's value whose tag ended at ``pos``."""
        if wire == _VARINT:
            return self.varint(pos, end, what)[1]
        if wire == _I64:
            if pos + 8 > end:
                raise MalformedModelError(f"truncated protobuf: {what} (fixed64) runs past the end")
            return pos + 8
        if wire == _I32:
            if pos + 4 > end:
                raise MalformedModelError(f"truncated protobuf: {what} (fixed32) runs past the end")
            return pos + 4
        if wire == _LEN:
            length, pos = self.varint(pos, end, what + " length")
            if length > end - pos:
                raise MalformedModelError(
                    f"truncated protobuf: {what} claims more than the {end - pos} bytes that remain"
                )
            return pos + length
        if wire in (3, 4):
            raise MalformedModelError(f"malformed protobuf: {what} uses the obsolete group wire type {wire}")
        raise MalformedModelError(f"malformed protobuf: {what} has invalid wire type {wire}")

    def tag(self, pos: int, end: int, mtype: _Msg) -> tuple[int, int, int]:
        """Decode a tag; return (field number, wire type, next position)."""
        key, pos = self.varint(pos, end, f"{mtype.value} field tag")
        number = key >> 3
        if number == 0 or number >= 1 << 29:
            raise MalformedModelError(f"malformed protobuf: invalid field number {number} in {mtype.value}")
        return number, key & 7, pos

    # -- the walk ----------------------------------------------------------------------------

    def strip(self, start: int, end: int, mtype: _Msg, depth: int) -> bytearray | None:
        """Strip one message spanning ``[start, end)``.

        Returns ``None`` when nothing inside changes (the caller then copies the original bytes
        as part of a longer run), or the replacement message body.
        """
        if depth > self.max_depth:
            raise ResourceLimitError(
                f"ONNX protobuf nesting deeper than {self.max_depth} messages (at a {mtype.value})"
            )
        if mtype is _Msg.TENSOR:
            return self.strip_tensor(start, end)
        children = _CHILDREN[mtype]
        out: bytearray | None = None
        run_start = start  # start of the pending run of bytes copied unchanged
        pos = start
        while pos < end:
            field_start = pos
            number, wire, pos = self.tag(pos, end, mtype)
            child = children.get(number)
            if child is None or wire != _LEN:
                pos = self.skip_field(wire, pos, end, f"{mtype.value} field {number}")
                continue
            tag_end = pos
            length, pos = self.varint(pos, end, f"{mtype.value} field {number} length")
            if length > end - pos:
                raise MalformedModelError(
                    f"truncated protobuf: {mtype.value} field {number} ({child.value}) claims more than "
                    f"the {end - pos} bytes that remain"
                )
            child_end = pos + length
            body = self.strip(pos, child_end, child, depth + 1)
            if body is not None:
                if out is None:
                    out = bytearray()
                self.append(out, run_start, field_start)
                out += self.buf[field_start:tag_end]
                out += _encode_varint(len(body))
                out += body
                del body
                self.check_size(out)
                run_start = child_end
            pos = child_end
        if out is None:
            return None
        self.append(out, run_start, end)
        return out

    def strip_tensor(self, start: int, end: int) -> bytearray | None:
        """Drop a TensorProto's payload fields (keeping small integer/floating tensors' values)."""
        # Pass 1: find data_type, dims and the kept payload's data size; payloads are skipped,
        # not read.
        data_type = 0
        numel = 1
        payload: dict[int, int] = {}  # payload field number -> data bytes (tags, lengths excluded)
        pos = start
        while pos < end:
            number, wire, pos = self.tag(pos, end, _Msg.TENSOR)
            if number == _T_DATA_TYPE and wire == _VARINT:
                data_type, pos = self.varint(pos, end, "TensorProto data_type")
            elif number == _T_DIMS and wire == _VARINT:
                dim, pos = self.varint(pos, end, "TensorProto dims")
                numel = _mul_dim(numel, dim)
            elif number == _T_DIMS and wire == _LEN:
                length, pos = self.varint(pos, end, "TensorProto dims length")
                if length > end - pos:
                    raise MalformedModelError("truncated protobuf: TensorProto dims run past the end")
                packed_end = pos + length
                while pos < packed_end:
                    dim, pos = self.varint(pos, packed_end, "TensorProto dims")
                    numel = _mul_dim(numel, dim)
            else:
                value_start = pos
                pos = self.skip_field(wire, pos, end, f"TensorProto field {number}")
                if number in _T_PAYLOAD_FIELDS:
                    if wire == _LEN:  # measure the data only, not its length prefix
                        value_start = self.varint(value_start, end, "TensorProto payload length")[1]
                    payload[number] = payload.get(number, 0) + pos - value_start
        typed_field = _KEPT_PAYLOAD_FIELD.get(data_type)
        kept_fields = (typed_field, _T_RAW_DATA) if typed_field is not None else ()
        keep = (
            typed_field is not None
            and 0 <= numel <= SMALL_TENSOR_ELEMENTS
            and sum(size for number, size in payload.items() if number in kept_fields) <= SMALL_PAYLOAD_BYTES
        )
        if not payload or (keep and all(number in kept_fields for number in payload)):
            return None
        # Pass 2: copy everything but the dropped payload fields.
        out = bytearray()
        run_start = start
        pos = start
        while pos < end:
            field_start = pos
            number, wire, pos = self.tag(pos, end, _Msg.TENSOR)
            pos = self.skip_field(wire, pos, end, f"TensorProto field {number}")
            if number not in _T_PAYLOAD_FIELDS or (keep and number in kept_fields):
                continue
            self.append(out, run_start, field_start)
            run_start = pos
        self.append(out, run_start, end)
        return out

    def append(self, out: bytearray, start: int, end: int) -> None:
        """Copy input bytes ``[start, end)`` to ``out``, within the size cap."""
        if end > start:
            if len(out) + (end - start) > self.max_bytes:
                self.too_big()
            out += self.buf[start:end]

    def check_size(self, out: bytearray) -> None:
        """Raise the size-cap error when ``out`` has grown past it."""
        if len(out) > self.max_bytes:
            self.too_big()

    def too_big(self) -> None:
        """Raise the stripped-size cap error."""
        raise ResourceLimitError(
            f"ONNX graph structure exceeds {self.max_bytes // (1024 * 1024)} MiB even without tensor data"
        )


def decode_varint(buf: Buffer, pos: int, end: int, what: str) -> tuple[int, int]:
    """Decode an unsigned varint at ``buf[pos]`` that must end before ``end``.

    Returns (value, next position); raises :class:`MalformedModelError` naming ``what`` when
    the varint runs past ``end`` or is longer than 10 bytes.
    """
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise MalformedModelError(f"truncated protobuf: {what} runs past the end of its message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise MalformedModelError(f"malformed protobuf: {what} is a varint longer than 10 bytes")


def _mul_dim(numel: int, dim: int) -> int:
    """Multiply the element count by one raw (unsigned varint) dim; -1 marks "not small"."""
    if numel < 0 or dim >= 1 << 63:  # a negative int64 dim; the reader reports it later
        return -1
    return min(numel * dim, 1 << 62)


def _encode_varint(value: int) -> bytes:
    """Encode an unsigned varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def strip_model_proto(
    buf: Buffer,
    *,
    max_depth: int = limits.MAX_PROTO_DEPTH,
    max_bytes: int = limits.MAX_ONNX_STRIPPED_BYTES,
) -> StripResult:
    """Return a copy of the serialized ``ModelProto`` in ``buf`` without tensor payloads.

    Only tags, lengths and the kept fields are read from ``buf``; skipped payload bytes are never
    touched.  Raises :class:`MalformedModelError` for truncated or invalid wire data and
    :class:`ResourceLimitError` past ``max_depth`` nesting or ``max_bytes`` of output.
    """
    walker = _Walker(buf, max_depth, max_bytes)
    body = walker.strip(0, len(buf), _Msg.MODEL, 1)
    if body is None:  # nothing to drop: the input is already payload-free
        if len(buf) > max_bytes:
            walker.too_big()
        return StripResult(bytes(buf[0 : len(buf)]))
    return StripResult(bytes(body))
