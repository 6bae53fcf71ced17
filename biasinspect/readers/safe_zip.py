"""A capped, read-only zip reader that implements :class:`~biasinspect.readers.archive.Archive`.

The central directory is parsed here (not by :mod:`zipfile`) so that every structural check is
ours and every failure maps to a :class:`~biasinspect.errors.BiasInspectError`:

* the end record must be found and consistent (``MalformedModelError`` "truncated zip" otherwise);
* every local header is checked against its central-directory entry (name, method, sizes, CRC
  unless a data descriptor is used) and member spans may not overlap -- archives whose two
  directories disagree are refused, since different tools would read different bytes;
* members are decompressed only on request, with ``limits.MAX_ZIP_MEMBER_BYTES``,
  ``limits.MAX_ZIP_TOTAL_BYTES`` and ``limits.MAX_ZIP_RATIO`` enforced while inflating (declared
  sizes are not trusted); nothing is ever extracted to disk.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from types import TracebackType

from biasinspect import limits
from biasinspect.errors import (
    MalformedModelError,
    ResourceLimitError,
    UnsupportedFormatError,
)
from biasinspect.source import ByteSource, LocalSource, Location

__all__ = ["AMBIGUOUS_ZIP", "MAX_CENTRAL_DIRECTORY_BYTES", "SafeZip", "ZipEntry"]

AMBIGUOUS_ZIP = (
    "refused as unsafe: zip readers could disagree about this archive, and torch.load might run "
    "what was not inspected"
)
"""How a refusal of an archive that other readers would read differently ends."""

MAX_CENTRAL_DIRECTORY_BYTES = 256 * 1024 * 1024
"""Largest central directory read into memory (1M members with long names fit comfortably)."""

_EOCD = struct.Struct("<IHHHHIIH")
_EOCD_SIG = 0x06054B50
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_ZIP64_LOCATOR_SIG = 0x07064B50
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_ZIP64_EOCD_SIG = 0x06064B50
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_SIG = 0x02014B50
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG = 0x04034B50
_STORED = 0
_DEFLATED = 8
_CHUNK = 1 << 20
_PREFIX_CHUNK = 1 << 16
_PREFIX_SLACK = 1 << 20
"""Compressed bytes read for a member's prefix beyond the prefix's own length."""


@dataclass(frozen=True)
class ZipEntry:
    """One central-directory entry, with the data offset verified against its local header."""

    name: str
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int


class SafeZip:
    """Read-only view of a zip file: ``names()``, ``size(name)``, ``read(name, limit)``,
    ``read_prefix(name, count)``.

    Use as a context manager (or call :meth:`close`).  Construction parses and validates the
    whole directory structure but decompresses nothing.
    """

    def __init__(self, location: Location) -> None:
        # A path is opened here and closed by close(); a given source stays its owner's to close.
        self._owned = isinstance(location, (str, os.PathLike))
        self._source: ByteSource = (
            LocalSource(location) if isinstance(location, (str, os.PathLike)) else location
        )
        self.name = self._source.name
        self._total_read = 0
        try:
            self._size = self._source.size
            self._entries = self._parse()
        except BaseException:
            self.close()
            raise
        self._by_name = {entry.name: entry for entry in self._entries}

    # -- Archive protocol ---------------------------------------------------------------------

    def names(self) -> list[str]:
        """All member names, in central-directory order."""
        return [entry.name for entry in self._entries]

    def size(self, name: str) -> int:
        """Declared uncompressed size of a member (KeyError if absent)."""
        return self._by_name[name].size

    def stored_span(self, name: str) -> tuple[int, int] | None:
        """``(offset, size)`` of a stored (uncompressed, unencrypted) member's bytes in the archive
        file, for readers that hand a window of the file to a parser; ``None`` for other members.
        KeyError if absent."""
        entry = self._by_name[name]
        if entry.method != _STORED or entry.flags & 0x1 or entry.compressed_size != entry.size:
            return None
        if entry.data_offset + entry.size > self._size:
            raise MalformedModelError(f"truncated zip: {name!r} extends past the end of the file")
        return entry.data_offset, entry.size

    def read(self, name: str, limit: int) -> bytes:
        """Decompress one member (KeyError if absent), refusing past ``limit`` or the archive caps."""
        entry = self._by_name[name]
        cap = min(limit, limits.MAX_ZIP_MEMBER_BYTES)
        left_total = limits.MAX_ZIP_TOTAL_BYTES - self._total_read
        if entry.size > cap:
            raise ResourceLimitError(
                f"zip member {name!r} declares {entry.size:,} bytes, over the {cap:,}-byte limit"
            )
        if entry.size > left_total:
            raise ResourceLimitError(
                f"zip member {name!r} would take the archive past the "
                f"{limits.MAX_ZIP_TOTAL_BYTES:,}-byte decompression limit"
            )
        if entry.flags & 0x1:
            raise UnsupportedFormatError(f"zip member {name!r} is encrypted")
        if entry.method == _STORED:
            if entry.compressed_size != entry.size:
                raise MalformedModelError(f"zip member {name!r}: stored sizes disagree")
            data = self._read_at(entry.data_offset, entry.size, name)
        elif entry.method == _DEFLATED:
            data = self._inflate(entry)
        else:
            raise UnsupportedFormatError(
                f"zip member {name!r} uses compression method {entry.method} (only stored/deflate)"
            )
        if zlib.crc32(data) != entry.crc:
            raise MalformedModelError(f"zip member {name!r}: CRC-32 mismatch (corrupt data)")
        self._total_read += len(data)
        return data

    def read_prefix(self, name: str, count: int) -> bytes:
        """The first ``count`` bytes of a member (all of it when shorter), decompressing only
        what they need (KeyError if absent).  For headers of members whose data is never read
        (a ``.npy`` array's header): the CRC covers the whole member, so it cannot be checked."""
        entry = self._by_name[name]
        if entry.flags & 0x1:
            raise UnsupportedFormatError(f"zip member {name!r} is encrypted")
        want = max(0, min(count, entry.size, limits.MAX_ZIP_MEMBER_BYTES))
        if entry.method == _STORED:
            if entry.compressed_size != entry.size:
                raise MalformedModelError(f"zip member {name!r}: stored sizes disagree")
            return self._read_at(entry.data_offset, want, name)
        if entry.method != _DEFLATED:
            raise UnsupportedFormatError(
                f"zip member {name!r} uses compression method {entry.method} (only stored/deflate)"
            )
        # No ratio check: at most ``want`` bytes are inflated (arrays of zeros compress far past
        # any ratio cap).  A real deflate stream needs little more input than the output it
        # gives; a stream that stalls (empty blocks) is refused past this budget.
        budget = min(entry.compressed_size, want + _PREFIX_SLACK)
        if entry.data_offset + budget > self._size:
            raise MalformedModelError(f"truncated zip: member {name!r} extends past the end of the file")
        out = bytearray()
        inflater = zlib.decompressobj(-15)
        pending = b""
        offset = entry.data_offset
        try:
            while len(out) < want and not inflater.eof:
                if not pending:
                    if budget <= 0:
                        raise MalformedModelError(
                            f"zip member {name!r}: its first {want:,} bytes do not inflate from the "
                            f"first {min(entry.compressed_size, want + _PREFIX_SLACK):,} compressed bytes"
                        )
                    pending = self._source.read_at(offset, min(_PREFIX_CHUNK, budget))
                    offset += len(pending)
                    if not pending:
                        raise MalformedModelError(
                            f"truncated zip: member {name!r} extends past the end of the file"
                        )
                    budget -= len(pending)
                out += inflater.decompress(pending, want - len(out))
                pending = inflater.unconsumed_tail
        except zlib.error as e:
            raise MalformedModelError(f"zip member {name!r}: corrupt deflate data ({e})") from e
        if len(out) < want:
            raise MalformedModelError(f"zip member {name!r}: deflate stream ends early (truncated)")
        self._total_read += len(out)
        return bytes(out)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the underlying file (when this archive opened it)."""
        if self._owned:
            self._source.close()

    def __enter__(self) -> SafeZip:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _read_at(self, offset: int, n: int, what: str) -> bytes:
        if offset < 0 or n < 0 or offset + n > self._size:
            raise MalformedModelError(f"truncated zip: {what} extends past the end of the file")
        data = self._source.read_at(offset, n)
        if len(data) != n:
            raise MalformedModelError(f"truncated zip: {what} extends past the end of the file")
        return data

    def _not_zip(self, head: bytes) -> Exception:
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return MalformedModelError("truncated zip: end-of-central-directory record not found")
        return UnsupportedFormatError("not a zip archive")

    def _find_eocd(self) -> tuple[int, tuple[int, ...]]:
        """The end record torch's zip reader (miniz) and :mod:`zipfile` both use: the last
        signature in the file.  Its comment must end exactly at the end of the file; otherwise
        readers disagree about which record counts (an earlier, harmless directory could be
        shown to one reader and a later one to torch), and the archive is refused."""
        head = self._read_at(0, min(4, self._size), "header")
        if self._size < _EOCD.size:
            raise self._not_zip(head)
        span = min(self._size, _EOCD.size + 0xFFFF)
        tail = self._read_at(self._size - span, span, "end record")
        pos = tail.rfind(b"PK\x05\x06")
        if pos < 0:
            raise self._not_zip(head)
        if pos + _EOCD.size > len(tail):
            raise MalformedModelError(
                f"malformed zip: an end-of-central-directory record is cut short by the end of the "
                f"file; {AMBIGUOUS_ZIP}"
            )
        fields = _EOCD.unpack_from(tail, pos)
        if pos + _EOCD.size + fields[7] != len(tail):
            raise MalformedModelError(
                f"malformed zip: the last end record's comment length does not "
                f"end at the end of the file; {AMBIGUOUS_ZIP}"
            )
        return self._size - span + pos, fields

    def _parse(self) -> list[ZipEntry]:
        eocd_at, (_sig, disk, cd_disk, _n_disk, count, cd_size, cd_offset, _clen) = self._find_eocd()
        if disk != 0 or cd_disk != 0:
            raise UnsupportedFormatError("multi-disk (spanned) zip archives are not supported")
        cd_end = eocd_at
        needs_zip64 = count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF
        loc_at = eocd_at - _ZIP64_LOCATOR.size
        locator = self._read_at(loc_at, _ZIP64_LOCATOR.size, "zip64 locator") if loc_at >= 0 else b""
        if locator[:4] == b"PK\x06\x07":
            # torch's writer always emits the zip64 records, so the directory ends before them.
            _sig, _d, eocd64_at, _t = _ZIP64_LOCATOR.unpack(locator)
            if eocd64_at + _ZIP64_EOCD.size > loc_at:
                raise MalformedModelError("malformed zip: zip64 end record offset is out of range")
            rec = _ZIP64_EOCD.unpack(self._read_at(eocd64_at, _ZIP64_EOCD.size, "zip64 end record"))
            if rec[0] != _ZIP64_EOCD_SIG:
                raise MalformedModelError("malformed zip: bad zip64 end-of-central-directory record")
            if not needs_zip64 and (rec[7], rec[8], rec[9]) != (count, cd_size, cd_offset):
                raise MalformedModelError(
                    f"malformed zip: zip64 and classic end records disagree; {AMBIGUOUS_ZIP}"
                )
            count, cd_size, cd_offset = rec[7], rec[8], rec[9]
            cd_end = eocd64_at
        elif needs_zip64:
            raise MalformedModelError("truncated zip: zip64 end-record locator missing")
        if count > limits.MAX_ZIP_MEMBERS:
            raise ResourceLimitError(
                f"zip archive lists {count:,} members, over the {limits.MAX_ZIP_MEMBERS:,}-member limit"
            )
        if cd_size > MAX_CENTRAL_DIRECTORY_BYTES:
            raise ResourceLimitError(
                f"zip central directory is {cd_size:,} bytes, over the "
                f"{MAX_CENTRAL_DIRECTORY_BYTES:,}-byte limit"
            )
        if cd_offset + cd_size != cd_end:
            # Data prepended or removed: offsets no longer point where they claim.
            raise MalformedModelError(
                "malformed zip: central directory does not end where the end record says "
                f"(truncated, or data added before the archive); {AMBIGUOUS_ZIP}"
            )
        directory = self._read_at(cd_offset, cd_size, "central directory")
        entries = self._parse_directory(directory, count)
        self._check_locals(entries, cd_offset)
        return entries

    def _parse_directory(self, directory: bytes, count: int) -> list[ZipEntry]:
        entries: list[ZipEntry] = []
        seen: set[bytes] = set()
        pos = 0
        for index in range(count):
            if pos + _CENTRAL.size > len(directory):
                raise MalformedModelError(f"malformed zip: central directory entry {index} is cut short")
            (
                sig,
                _vm,
                _vn,
                flags,
                method,
                _t,
                _d,
                crc,
                csize,
                usize,
                nlen,
                xlen,
                clen,
                disk_start,
                _ia,
                _ea,
                offset,
            ) = _CENTRAL.unpack_from(directory, pos)
            if sig != _CENTRAL_SIG:
                raise MalformedModelError(f"malformed zip: bad signature in central directory entry {index}")
            start = pos + _CENTRAL.size
            end = start + nlen + xlen + clen
            if end > len(directory):
                raise MalformedModelError(f"malformed zip: central directory entry {index} is cut short")
            raw_name = directory[start : start + nlen]
            extra = directory[start + nlen : start + nlen + xlen]
            pos = end
            name = _decode_name(raw_name, flags)
            usize, csize, offset = _zip64_sizes(extra, usize, csize, offset, disk_start, name)
            # torch's zip reader (miniz) looks names up ignoring ASCII case: ``a/DATA.PKL`` is
            # ``a/data.pkl`` to it, so two names equal but for case are one name twice.
            folded = raw_name.lower()
            if folded in seen:
                raise MalformedModelError(
                    f"malformed zip: member {name!r} appears twice (names compared ignoring case, "
                    f"as torch does); {AMBIGUOUS_ZIP}"
                )
            seen.add(folded)
            entries.append(ZipEntry(name, method, flags, crc, csize, usize, offset, -1))
        if pos != len(directory):
            raise MalformedModelError("malformed zip: central directory size disagrees with its entries")
        return entries

    def _check_locals(self, entries: list[ZipEntry], cd_offset: int) -> None:
        checked: list[ZipEntry] = []
        for entry in entries:
            head = self._read_at(entry.header_offset, _LOCAL.size, f"local header of {entry.name!r}")
            (sig, _v, flags, method, _t, _d, crc, csize, usize, nlen, xlen) = _LOCAL.unpack(head)
            if sig != _LOCAL_SIG:
                raise MalformedModelError(
                    f"malformed zip: member {entry.name!r} has no local header at its offset"
                )
            tail = self._read_at(
                entry.header_offset + _LOCAL.size, nlen + xlen, f"local header of {entry.name!r}"
            )
            local_name = _decode_name(tail[:nlen], flags)
            problems: list[str] = []
            if local_name != entry.name:
                problems.append(f"name {local_name!r}")
            if method != entry.method:
                problems.append("compression method")
            if not flags & 0x8:
                if usize == 0xFFFFFFFF or csize == 0xFFFFFFFF:
                    usize, csize = _local_zip64(tail[nlen:], usize, csize)
                if csize != entry.compressed_size or usize != entry.size:
                    problems.append("sizes")
                if crc != entry.crc:
                    problems.append("CRC")
            if problems:
                raise MalformedModelError(
                    f"malformed zip: local header and central directory disagree for member "
                    f"{entry.name!r} ({', '.join(problems)}); {AMBIGUOUS_ZIP}"
                )
            data_offset = entry.header_offset + _LOCAL.size + nlen + xlen
            checked.append(
                ZipEntry(
                    entry.name,
                    entry.method,
                    entry.flags,
                    entry.crc,
                    entry.compressed_size,
                    entry.size,
                    entry.header_offset,
                    data_offset,
                )
            )
        # Member data may not overlap another member or the directory (overlap = zip-bomb trick).
        ordered = sorted(checked, key=lambda e: e.header_offset)
        for current, following in zip(ordered, [*ordered[1:], None], strict=True):
            limit = following.header_offset if following is not None else cd_offset
            if current.data_offset + current.compressed_size > limit:
                raise MalformedModelError(
                    f"malformed zip: member {current.name!r} overlaps other data; {AMBIGUOUS_ZIP}"
                )
        entries[:] = checked

    def _inflate(self, entry: ZipEntry) -> bytes:
        name = entry.name
        if entry.size > 0 and (
            entry.compressed_size == 0 or entry.size > entry.compressed_size * limits.MAX_ZIP_RATIO
        ):
            raise ResourceLimitError(
                f"zip member {name!r} claims a compression ratio over {limits.MAX_ZIP_RATIO}:1 (zip bomb?)"
            )
        out = bytearray()
        inflater = zlib.decompressobj(-15)
        offset = entry.data_offset
        remaining = entry.compressed_size
        if offset + remaining > self._size:
            raise MalformedModelError(f"truncated zip: member {name!r} extends past the end of the file")
        try:
            while remaining > 0 and not inflater.eof:
                chunk = self._source.read_at(offset, min(_CHUNK, remaining))
                offset += len(chunk)
                if not chunk:
                    raise MalformedModelError(
                        f"truncated zip: member {name!r} extends past the end of the file"
                    )
                remaining -= len(chunk)
                while chunk:
                    # Never inflate more than one byte past the declared size.
                    room = entry.size + 1 - len(out)
                    out += inflater.decompress(chunk, room)
                    if len(out) > entry.size:
                        raise MalformedModelError(
                            f"zip member {name!r} inflates past its declared size of {entry.size:,} bytes"
                        )
                    chunk = inflater.unconsumed_tail
                    if inflater.eof:
                        break
        except zlib.error as e:
            raise MalformedModelError(f"zip member {name!r}: corrupt deflate data ({e})") from e
        if not inflater.eof or len(out) != entry.size:
            raise MalformedModelError(f"zip member {name!r}: deflate stream ends early (truncated)")
        return bytes(out)


def _decode_name(raw: bytes, flags: int) -> str:
    if flags & 0x800:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MalformedModelError("malformed zip: member name is not valid UTF-8") from e
    return raw.decode("cp437")


def _zip64_sizes(
    extra: bytes, usize: int, csize: int, offset: int, disk: int, name: str
) -> tuple[int, int, int]:
    """Apply the zip64 extra field (0x0001) to the central-directory sizes that overflowed."""
    if usize != 0xFFFFFFFF and csize != 0xFFFFFFFF and offset != 0xFFFFFFFF and disk != 0xFFFF:
        return usize, csize, offset
    values = _extra_field(extra, 0x0001)
    if values is None:
        raise MalformedModelError(f"malformed zip: member {name!r} lacks its zip64 extra field")
    fields = [usize, csize, offset]
    pos = 0
    for i in range(3):
        if fields[i] == 0xFFFFFFFF:
            if pos + 8 > len(values):
                raise MalformedModelError(f"malformed zip: member {name!r} has a short zip64 extra field")
            fields[i] = struct.unpack_from("<Q", values, pos)[0]
            pos += 8
    return fields[0], fields[1], fields[2]


def _local_zip64(extra: bytes, usize: int, csize: int) -> tuple[int, int]:
    values = _extra_field(extra, 0x0001)
    if values is None or len(values) < 16:
        return usize, csize
    new_usize, new_csize = struct.unpack_from("<QQ", values, 0)
    return new_usize, new_csize


def _extra_field(extra: bytes, wanted: int) -> bytes | None:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + size]
        if tag == wanted:
            return body
        pos += 4 + size
    return None
