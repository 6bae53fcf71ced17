"""A minimal, bounds-checked FlatBuffers table reader over a :class:`~biasinspect.source.ByteSource`.

Only what a schema-driven walk needs: tables, scalars, vectors of scalars, vectors of tables and
strings.  Every offset is checked against the file size before it is followed, so a hostile file
ends in :class:`~biasinspect.errors.MalformedModelError`, never in an ``IndexError`` or a read far
past the end.  Bytes are fetched through ``read_at`` in cached pages, so a 600 MB model whose
weights sit inline costs only the pages its tables live on (weight vectors are never touched:
the reader asks for their length, never their elements).

FlatBuffers offsets (``uoffset``) are unsigned and always point forward, so a table walk cannot
loop; vtable offsets are signed and are only used to find a table's field slots.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterator

from biasinspect.errors import MalformedModelError
from biasinspect.source import ByteSource

_PAGE = 64 * 1024
_MAX_PAGES = 256
"""At most 16 MiB of pages kept in memory at once."""

_SCALAR = {
    "b": 1,
    "B": 1,
    "h": 2,
    "H": 2,
    "i": 4,
    "I": 4,
    "q": 8,
    "Q": 8,
    "f": 4,
    "d": 8,
    "?": 1,
}


class PagedBytes:
    """Random access to a source's bytes through a small LRU cache of fixed-size pages."""

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.size = source.size
        self._pages: OrderedDict[int, bytes] = OrderedDict()

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or MalformedModelError past the end."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise MalformedModelError(
                f"flatbuffer offset {offset} (+{length} bytes) lies outside the file ({self.size} bytes)"
            )
        first, last = offset // _PAGE, (offset + length - 1) // _PAGE if length else offset // _PAGE
        if first == last:
            page = self._page(first)
            start = offset - first * _PAGE
            return page[start : start + length]
        if length > _PAGE * 16:
            return self.source.read_at(offset, length)
        parts = [self._page(index) for index in range(first, last + 1)]
        joined = b"".join(parts)
        start = offset - first * _PAGE
        return joined[start : start + length]

    def _page(self, index: int) -> bytes:
        page = self._pages.get(index)
        if page is not None:
            self._pages.move_to_end(index)
            return page
        page = self.source.read_at(index * _PAGE, _PAGE)
        self._pages[index] = page
        if len(self._pages) > _MAX_PAGES:
            self._pages.popitem(last=False)
        return page

    def unpack(self, fmt: str, offset: int) -> int | float | bool:
        """One little-endian scalar of struct format ``fmt`` at ``offset``."""
        value: int | float | bool = struct.unpack("<" + fmt, self.read(offset, _SCALAR[fmt]))[0]
        return value


class Table:
    """One flatbuffer table: its position and the vtable slots of its fields."""

    __slots__ = ("_slots", "buf", "pos")

    def __init__(self, buf: PagedBytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        vtable = pos - int(buf.unpack("i", pos))
        vtable_size = int(buf.unpack("H", vtable))
        if vtable_size < 4 or vtable_size % 2:
            raise MalformedModelError(f"flatbuffer vtable at {vtable} has a bad size {vtable_size}")
        raw = buf.read(vtable + 4, vtable_size - 4)
        self._slots: tuple[int, ...] = struct.unpack(f"<{len(raw) // 2}H", raw)

    def _field(self, index: int) -> int | None:
        if index >= len(self._slots) or self._slots[index] == 0:
            return None
        return self.pos + self._slots[index]

    def has(self, index: int) -> bool:
        """Whether field ``index`` is present."""
        return self._field(index) is not None

    def scalar(self, index: int, fmt: str, default: int | float | bool = 0) -> int | float | bool:
        """A scalar field, or ``default`` when absent."""
        where = self._field(index)
        return default if where is None else self.buf.unpack(fmt, where)

    def integer(self, index: int, fmt: str, default: int = 0) -> int:
        """An integer field, or ``default`` when absent."""
        return int(self.scalar(index, fmt, default))

    def _target(self, index: int) -> int | None:
        where = self._field(index)
        if where is None:
            return None
        return where + int(self.buf.unpack("I", where))

    def table(self, index: int) -> Table | None:
        """A sub-table field (also a union's value), or ``None`` when absent."""
        target = self._target(index)
        return None if target is None else Table(self.buf, target)

    def vector_length(self, index: int) -> int | None:
        """The element count of a vector field (its elements are not read); ``None`` when absent."""
        target = self._target(index)
        return None if target is None else int(self.buf.unpack("I", target))

    def _vector(self, index: int, element_size: int) -> tuple[int, int] | None:
        target = self._target(index)
        if target is None:
            return None
        count = int(self.buf.unpack("I", target))
        if target + 4 + count * element_size > self.buf.size:
            raise MalformedModelError(
                f"flatbuffer vector at {target} claims {count} elements, past the end of the file"
            )
        return target + 4, count

    def scalars(self, index: int, fmt: str, limit: int) -> tuple[int, ...] | None:
        """A vector of integers (at most ``limit`` elements), or ``None`` when absent."""
        size = _SCALAR[fmt]
        found = self._vector(index, size)
        if found is None:
            return None
        start, count = found
        if count > limit:
            raise MalformedModelError(f"flatbuffer vector of {count:,} elements exceeds {limit:,}")
        return tuple(
            int(value) for value in struct.unpack(f"<{count}{fmt}", self.buf.read(start, count * size))
        )

    def tables(self, index: int, limit: int) -> Iterator[Table]:
        """The tables of a vector-of-tables field, lazily (nothing when absent)."""
        found = self._vector(index, 4)
        if found is None:
            return
        start, count = found
        if count > limit:
            raise MalformedModelError(f"flatbuffer vector of {count:,} tables exceeds {limit:,}")
        for position in range(start, start + 4 * count, 4):
            yield Table(self.buf, position + int(self.buf.unpack("I", position)))

    def table_count(self, index: int) -> int:
        """Element count of a vector-of-tables field (0 when absent)."""
        found = self._vector(index, 4)
        return 0 if found is None else found[1]

    def string(self, index: int, limit: int = 4096) -> str | None:
        """A string field (cut at ``limit`` bytes, decoded leniently), or ``None`` when absent."""
        found = self._vector(index, 1)
        if found is None:
            return None
        start, count = found
        return self.buf.read(start, min(count, limit)).decode("utf-8", "replace")


def root_table(buf: PagedBytes) -> Table:
    """The root table of a flatbuffer (the uoffset in its first four bytes)."""
    return Table(buf, int(buf.unpack("I", 0)))


__all__ = ["PagedBytes", "Table", "root_table"]
