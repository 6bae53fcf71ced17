"""Opening user files and parsing their JSON: the pieces every reader shares."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from biasinspect.errors import MalformedModelError, UnreadableFileError


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

    This is the only way biasinspect opens a user's file.  The open itself is non-blocking (and
    never makes a terminal the controlling one), and the regular-file check is made on the opened
    descriptor, not on an earlier ``stat`` of the name: a FIFO swapped in between a check and a
    blocking open would hang the run.  Anything that is not a regular file is refused before a
    byte is read.
    """
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise unreadable(error, path) from error
    except ValueError as error:  # an embedded NUL byte
        raise UnreadableFileError("invalid path (contains a NUL byte)") from error
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


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""A ``\\uD800``-``\\uDFFF`` escape: the only way a surrogate can reach a decoded JSON string
(strict UTF-8 decoding already rejects encoded surrogates)."""

QUOTE_CHARS = 200
"""Longest name or value quoted in an error message (hostile headers hold megabyte names)."""


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, ending in ``...`` when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters (with ``...``), for one-line messages.

    Lists and tuples show their first 8 items at most, so a hostile shape of a million dims
    does not become a megabyte-long message.
    """
    if isinstance(value, (list, tuple)) and len(value) > 8:
        shown = ", ".join(quote(item, limit) for item in value[:8])
        text = f"[{shown}, ... ({len(value)} items)]"
    else:
        text = repr(value)
    return shorten(text, limit)


def _lone_surrogate(document: object) -> str | None:
    """The first string (key or value) holding a lone surrogate, walking iteratively."""
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            strings: list[str] = [value]
        elif isinstance(value, dict):
            strings = list(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            strings = []
            stack.extend(value)
        else:
            continue
        for text in strings:
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return text
    return None


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(
    raw: bytes, what: str, *, strict_constants: bool = False, require_brace: bool = False
) -> dict[str, Any]:
    """Decode ``raw`` as UTF-8 JSON whose top level is an object, as a strict parser would.

    Beyond :func:`json.loads`: duplicate keys and lone surrogate escapes (``"\\ud800"``, which
    serde_json and other strict parsers reject) are errors; with ``strict_constants``, so are
    ``NaN``/``Infinity``; with ``require_brace``, the first non-whitespace byte must be ``{``.
    Every failure is a one-line :class:`MalformedModelError` starting with ``what`` (e.g.
    ``header`` -> ``header is not valid JSON: ...``), except a duplicate key:
    ``duplicate key 'k' in <what>``.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MalformedModelError(f"{what} is not valid UTF-8 (byte {error.start})") from error
    if require_brace and not text.lstrip(" \t\r\n").startswith("{"):
        raise MalformedModelError(f"{what} does not start with '{{'")
    try:
        parsed = json.loads(
            text,
            object_pairs_hook=reject_duplicate_keys,
            parse_constant=_reject_constant if strict_constants else None,
        )
    except DuplicateKeyError as error:
        raise MalformedModelError(f"duplicate key {quote(error.key)} in {what}") from error
    except RecursionError as error:
        raise MalformedModelError(f"{what} JSON is nested too deeply") from error
    except ValueError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MalformedModelError(f"{what} is not valid JSON: {shorten(reason)}") from error
    if not isinstance(parsed, dict):
        raise MalformedModelError(f"{what} is not a JSON object")
    if _SURROGATE_ESCAPE.search(text) is not None:
        bad = _lone_surrogate(parsed)
        if bad is not None:
            # repr() shows the surrogate as a \udxxx escape, so the message stays printable.
            raise MalformedModelError(f"{what} is not valid JSON: lone surrogate in string {quote(bad)}")
    return parsed


TAR_BLOCK = 512
"""A tar header block."""

REFUSED_TAR = (
    "refused as unsafe: the file starts with a valid tar header, so torch.load reads it as a "
    "legacy tar-format checkpoint (unpickling its members) whatever else it looks like; "
    "biasinspect does not read that format"
)


def is_tar_header(head: bytes) -> bool:
    """True when ``head`` starts with a block that Python's :mod:`tarfile` accepts as a first
    header -- exactly the test ``torch.load`` makes (``tarfile.open``) on every file that does not
    start with a zip local header, before it tries the legacy pickle format.  Only the header
    bytes are parsed; nothing is extracted."""
    import tarfile

    block = head[:TAR_BLOCK]
    if len(block) < TAR_BLOCK:
        return False
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    except (ValueError, OverflowError, UnicodeError):  # header fields tarfile itself chokes on
        return False
    return True
