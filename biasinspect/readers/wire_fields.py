"""Field-by-field protobuf reading over a :class:`~biasinspect.source.ByteSource`, without a schema.

Readers of protobuf formats whose schema is not a dependency (CoreML) walk messages as
``(field number, wire type, value)`` triples.  A length-delimited field is returned as a
:class:`Span` (offset and length) and is read only if the caller asks for it, so weight arrays
are skipped by offset and never fetched.  Bytes are pulled through a small block cache, so a
local file costs a few ``pread`` calls and a remote one a few range requests.

Every varint and length is checked against its enclosing message, group and undefined wire types
are refused, and callers bound their own nesting.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from biasinspect.errors import MalformedModelError, ResourceLimitError
from biasinspect.source import ByteSource

VARINT = 0
I64 = 1
LEN = 2
I32 = 5

_BLOCK = 64 * 1024


@dataclass(frozen=True)
class Span:
    """A length-delimited field's bytes: ``length`` bytes at ``offset`` of the source."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.offset + self.length


class WireReader:
    """Cached random access to one source, with protobuf field iteration."""

    def __init__(self, source: ByteSource, *, max_bytes_read: int) -> None:
        self.source = source
        self.size = source.size
        self._blocks: dict[int, bytes] = {}
        self._max_bytes_read = max_bytes_read
        self.bytes_read = 0

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            if len(self._blocks) > 64:
                self._blocks.clear()
            block = self.source.read_at(index * _BLOCK, _BLOCK)
            self.bytes_read += len(block)
            if self.bytes_read > self._max_bytes_read:
                raise ResourceLimitError(
                    f"reading the model structure took more than {self._max_bytes_read:,} bytes"
                )
            self._blocks[index] = block
        return block

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (the caller has checked they lie inside a message)."""
        if length > self._max_bytes_read:
            raise ResourceLimitError(f"a field of {length:,} bytes is larger than the model structure may be")
        first, last = offset // _BLOCK, (offset + max(length, 1) - 1) // _BLOCK
        if first == last:
            start = offset - first * _BLOCK
            return self._block(first)[start : start + length]
        chunks = [self._block(index) for index in range(first, last + 1)]
        joined = b"".join(chunks)
        start = offset - first * _BLOCK
        return joined[start : start + length]

    def _byte(self, position: int) -> int:
        block = self._block(position // _BLOCK)
        index = position % _BLOCK
        if index >= len(block):
            raise MalformedModelError("truncated protobuf: a varint runs past the end of the file")
        return block[index]

    def varint(self, position: int, end: int) -> tuple[int, int]:
        """Decode one varint at ``position`` (ending before ``end``): (value, next position)."""
        value = 0
        for shift in range(0, 70, 7):
            if position >= end:
                raise MalformedModelError("truncated protobuf: a varint runs past the end of its message")
            byte = self._byte(position)
            position += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value & 0xFFFFFFFFFFFFFFFF, position
        raise MalformedModelError("malformed protobuf: a varint longer than 10 bytes")

    def fields(self, span: Span) -> Iterator[tuple[int, int, int | Span]]:
        """The fields of the message in ``span``: (number, wire type, varint value or Span)."""
        position, end = span.offset, span.end
        if end > self.size:
            raise MalformedModelError("truncated protobuf: a message runs past the end of the file")
        while position < end:
            key, position = self.varint(position, end)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise MalformedModelError("malformed protobuf: field number 0")
            if wire == VARINT:
                value, position = self.varint(position, end)
                yield number, wire, value
            elif wire == LEN:
                length, position = self.varint(position, end)
                if length > end - position:
                    raise MalformedModelError(
                        f"truncated protobuf: field {number} declares {length:,} bytes past the end of its message"
                    )
                yield number, wire, Span(position, length)
                position += length
            elif wire in (I64, I32):
                width = 8 if wire == I64 else 4
                if width > end - position:
                    raise MalformedModelError("truncated protobuf: a fixed-width field runs past its message")
                yield number, wire, Span(position, width)
                position += width
            else:
                raise MalformedModelError(f"malformed protobuf: wire type {wire} in field {number}")

    def string(self, span: Span, what: str) -> str:
        """A string field's text (invalid UTF-8 is replaced, never trusted)."""
        if span.length > 64 * 1024:
            raise ResourceLimitError(f"{what} is {span.length:,} bytes long")
        return self.read(span.offset, span.length).decode("utf-8", errors="replace")

    def packed_varints(self, span: Span) -> list[int]:
        """A packed repeated varint field's values."""
        values: list[int] = []
        position = span.offset
        while position < span.end:
            value, position = self.varint(position, span.end)
            values.append(value)
        return values

    def fixed32(self, span: Span) -> int:
        """A fixed32 field's value."""
        return int(struct.unpack("<I", self.read(span.offset, 4))[0])


__all__ = ["I32", "I64", "LEN", "VARINT", "Span", "WireReader"]
