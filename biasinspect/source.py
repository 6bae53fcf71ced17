"""Random-access byte sources: the one way readers get at a file's bytes.

A reader is handed a :class:`ByteSource` and never cares whether it is a local file (read through
``mmap``/``pread``) or a remote one (read by ranges; see issue 10).  ``open_source`` is the only
place that decides which.

Contract every implementation keeps:

* ``size`` is known up front (a remote source learns it from the first response);
* ``read_at(offset, length)`` returns exactly ``length`` bytes, or fewer only at the end of the
  file, and never reads past the caps in :mod:`biasinspect.limits`;
* ``name`` is what messages show (for a URL: credentials redacted);
* ``view()`` is a read-only buffer over the whole file (``len``, indexing and slicing) for
  readers that walk a structure in place: an ``mmap`` locally (zero-copy; pages never touched
  are never read), a lazily fetched block cache remotely (only the blocks indexed are fetched);
* ``sibling(relative)`` opens another file next to this one (a shard, an ``.mlpackage`` member),
  refusing names that climb out of the source's folder;
* nothing here interprets the bytes.

Readers take ``ByteSource | path``: :func:`opened` turns a path into a :class:`LocalSource` (and
closes it) and passes a source through untouched, so tests and callers may hand either.
"""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Protocol, SupportsIndex, overload, runtime_checkable

from biasinspect.errors import UnreadableFileError
from biasinspect.readers.files import open_regular_file


class NotFoundError(UnreadableFileError):
    """The file does not exist (no such local file; HTTP 404; no such object)."""


class OutsideFolderError(UnreadableFileError):
    """A sibling name that leads out of the source's folder."""


@runtime_checkable
class ByteSource(Protocol):
    """A read-only, random-access view of one file's bytes."""

    name: str
    """Display name: a local path as given, or a redacted URL."""

    @property
    def size(self) -> int:
        """Total size in bytes."""
        ...

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only at the end of the file)."""
        ...

    def view(self) -> Buffer:
        """A read-only buffer over the whole file (valid until ``close``)."""
        ...

    def sibling(self, relative: str) -> ByteSource:
        """Another source next to this one (``relative`` may not climb out of this folder)."""
        ...

    def locate(self, relative: str) -> str:
        """The name ``sibling(relative)`` would have (nothing is opened or checked)."""
        ...

    def close(self) -> None:
        """Release the file descriptor or connection."""
        ...


class Buffer(Protocol):
    """The read-only buffer protocol readers walk: ``len``, ``buf[i]`` and ``buf[a:b]``."""

    def __len__(self) -> int: ...

    @overload
    def __getitem__(self, index: SupportsIndex) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> bytes | memoryview: ...

    def __getitem__(self, index: SupportsIndex | slice) -> int | bytes | memoryview: ...


class LocalSource:
    """A regular local file, opened without blocking (a FIFO is refused, never waited on)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = os.fspath(path)
        if "\0" in self.name:
            raise UnreadableFileError("invalid path (contains a NUL byte)")
        self._file = open_regular_file(self.path)
        self._map: mmap.mmap | None = None
        try:
            self._size = os.fstat(self._file.fileno()).st_size
        except OSError as error:
            self._file.close()
            raise UnreadableFileError(f"cannot stat: {error.strerror or error}") from error

    @property
    def size(self) -> int:
        """Total size in bytes (at open time)."""
        return self._size

    def fileno(self) -> int:
        """The open descriptor, for ``mmap`` by readers that want a zero-copy view."""
        return self._file.fileno()

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only at the end of the file)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self._size - offset))
        try:
            return os.pread(self._file.fileno(), length, offset) if length else b""
        except OSError as error:
            raise UnreadableFileError(f"cannot read: {error.strerror or error}") from error

    def view(self) -> Buffer:
        """An ``mmap`` of the file: zero-copy, and pages never indexed are never read."""
        if self._size == 0:
            return b""
        if self._map is None:
            try:
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as error:
                raise UnreadableFileError(f"cannot map the file: {error}") from error
        return self._map

    def locate(self, relative: str) -> str:
        """``relative`` joined to this file's folder, normalised (nothing is opened)."""
        return os.path.normpath(os.path.join(self.path.parent, relative))

    def sibling(self, relative: str) -> LocalSource:
        """Open ``relative`` next to this file; names that climb out of its folder are refused."""
        folder = self.path.parent
        candidate = folder / relative
        resolved_folder = os.path.realpath(folder)
        resolved = os.path.realpath(candidate)
        if os.path.commonpath([resolved_folder, resolved]) != resolved_folder:
            raise OutsideFolderError(f"{relative!r} lies outside the model's folder")
        try:
            return LocalSource(candidate)  # opened first, never checked by name first
        except UnreadableFileError as error:
            if isinstance(error.__cause__, FileNotFoundError):
                raise NotFoundError(str(error)) from error
            raise

    def close(self) -> None:
        """Close the map and the descriptor."""
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> LocalSource:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class SourceFile(io.RawIOBase):
    """A seekable read-only file object over a :class:`ByteSource` (for zipfile-like or h5py-like
    consumers that want a file); every read goes through ``read_at``."""

    def __init__(self, source: ByteSource) -> None:
        super().__init__()
        self._source = source
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._source.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._source.read_at(self._position, len(buffer))
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def is_url(location: str | os.PathLike[str]) -> bool:
    """``location`` is a URL (``scheme://...``) rather than a local path."""
    text = os.fspath(location)
    scheme, separator, _rest = text.partition("://")
    return bool(separator) and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()


def open_source(location: str | os.PathLike[str], *, timeout: float | None = None) -> ByteSource:
    """A :class:`ByteSource` for a local path or a URL (``timeout``: seconds per network request)."""
    if is_url(location):
        from biasinspect.remote import open_remote

        return open_remote(os.fspath(location), timeout=timeout)
    return LocalSource(location)


Location = ByteSource | str | os.PathLike[str]
"""What a reader entry point accepts: an open source, or a local path."""


@contextmanager
def opened(location: Location) -> Iterator[ByteSource]:
    """``location`` as a source: a given source is passed through (and left open); a path is
    opened as a :class:`LocalSource` and closed afterwards."""
    if isinstance(location, (str, os.PathLike)):
        source = LocalSource(location)
        try:
            yield source
        finally:
            source.close()
    else:
        yield location


def buffered(source: ByteSource, buffer_size: int = 64 * 1024) -> io.BufferedReader:
    """A buffered, seekable file object over ``source`` (for stream consumers such as pickles)."""
    return io.BufferedReader(SourceFile(source), buffer_size=buffer_size)


__all__ = [
    "Buffer",
    "ByteSource",
    "LocalSource",
    "Location",
    "NotFoundError",
    "OutsideFolderError",
    "SourceFile",
    "buffered",
    "is_url",
    "open_source",
    "opened",
]
