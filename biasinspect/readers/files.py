"""Opening user files and parsing their JSON: the pieces every reader shares."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from biasinspect.errors import UnreadableFileError


def unreadable(error: OSError, path: Path) -> UnreadableFileError:
    """The one-line reason for an OS error met while stat-ing or opening ``path``."""
    if isinstance(error, FileNotFoundError):
        return UnreadableFileError(
            "broken symbolic link" if path.is_symlink() else "no such file or directory"
        )
    if isinstance(error, PermissionError):
        return UnreadableFileError("permission denied")
    if isinstance(error, IsADirectoryError):
        return UnreadableFileError("is a directory")
    if error.errno == errno.ELOOP:
        return UnreadableFileError("symbolic link loop")
    return UnreadableFileError(f"cannot open: {error.strerror or error}")


def check_file_mode(mode: int) -> None:
    """Refuse anything but a regular file, saying what it is instead."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise UnreadableFileError("is a directory")
    kind = (
        "a FIFO" if stat.S_ISFIFO(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else None
    )  # fmt: skip
    raise UnreadableFileError("not a regular file" + (f" ({kind})" if kind else ""))


def open_regular_file(path: Path) -> BinaryIO:
    """Open a regular file for binary reading, with OS errors as one-line UnreadableFileErrors.

    The open itself is non-blocking, so a FIFO (or a shard index naming one) is refused instead of
    hanging the run; anything that is not a regular file is refused before a byte is read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise unreadable(error, path) from error
    try:
        # Linux opens folders read-only without EISDIR, so the mode check covers them too.
        check_file_mode(os.fstat(descriptor).st_mode)
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
