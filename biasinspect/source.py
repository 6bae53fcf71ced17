"""Random-access byte sources: the one way readers get at a file's bytes.

A reader is handed a :class:`ByteSource` and never cares whether it is a local file (read through
``mmap``/``pread``) or a remote one (read by ranges; see issue 10).  ``open_source`` is the only
place that decides which.

Contract every implementation keeps:

* ``size`` is known up front (a remote source learns it from the first response);
* ``read_at(offset, length)`` returns exactly ``length`` bytes, or fewer only at the end of the
  file, and never reads past the caps in :mod:`biasinspect.limits`;
* ``name`` is what messages show (for a URL: credentials redacted);
* ``sibling(relative)`` opens another file next to this one (a shard, an ``.mlpackage`` member),
  refusing names that climb out of the source's folder;
* nothing here interprets the bytes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import TracebackType
from typing import Protocol, runtime_checkable

from biasinspect.errors import UnreadableFileError
from biasinspect.readers.files import open_regular_file


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

    def sibling(self, relative: str) -> ByteSource:
        """Another source next to this one (``relative`` may not climb out of this folder)."""
        ...

    def close(self) -> None:
        """Release the file descriptor or connection."""
        ...


class LocalSource:
    """A regular local file, opened without blocking (a FIFO is refused, never waited on)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = os.fspath(path)
        if "\0" in self.name:
            raise UnreadableFileError("invalid path (contains a NUL byte)")
        self._file = open_regular_file(self.path)
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

    def sibling(self, relative: str) -> LocalSource:
        """Open ``relative`` next to this file; names that climb out of its folder are refused."""
        folder = self.path.parent
        candidate = folder / relative
        resolved_folder = os.path.realpath(folder)
        resolved = os.path.realpath(candidate)
        if os.path.commonpath([resolved_folder, resolved]) != resolved_folder:
            raise UnreadableFileError(f"{relative!r} lies outside the model's folder")
        return LocalSource(candidate)

    def close(self) -> None:
        """Close the descriptor."""
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


def open_source(location: str | os.PathLike[str]) -> ByteSource:
    """A :class:`ByteSource` for a local path (URLs arrive with issue 10)."""
    return LocalSource(location)


__all__ = ["ByteSource", "LocalSource", "SourceFile", "open_source"]
