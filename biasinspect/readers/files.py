"""Opening user files and parsing their JSON: the pieces every reader shares."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from biasinspect.errors import UnreadableFileError


def open_regular_file(path: Path) -> BinaryIO:
    """Open a regular file for binary reading, with OS errors as one-line UnreadableFileErrors.

    The open itself is non-blocking, so a FIFO (or a shard index naming one) is refused instead of
    hanging the run; anything that is not a regular file is refused before a byte is read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError as error:
        raise UnreadableFileError("no such file or directory") from error
    except PermissionError as error:
        raise UnreadableFileError("permission denied") from error
    except IsADirectoryError as error:
        raise UnreadableFileError("is a directory") from error
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnreadableFileError("symbolic link loop") from error
        raise UnreadableFileError(f"cannot open: {error.strerror or error}") from error
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise UnreadableFileError("is a directory")  # Linux opens folders read-only without EISDIR
        if not stat.S_ISREG(mode):
            raise UnreadableFileError("not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (json.loads would silently keep the last)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads` that raises :class:`DuplicateKeyError`."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result
