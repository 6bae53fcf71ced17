"""Exceptions raised by biasinspect.

Every failure a user can cause with a file is a :class:`BiasInspectError`.  The CLI turns it
into one line, ``biasinspect: PATH: reason``, and exit code 2; anything else escaping a reader
is a bug.  Messages name the file, node or tensor concerned so that the line stands alone.
"""

from __future__ import annotations


class BiasInspectError(Exception):
    """Base class: an input could not be inspected.  ``str(error)`` is the reason."""


class UsageError(BiasInspectError):
    """The command line or API call itself is wrong (bad flag value, bad calc shape)."""


class UnreadableFileError(BiasInspectError):
    """The path cannot be read: missing, a directory loop, a FIFO, permission denied."""


class UnsupportedFormatError(BiasInspectError):
    """The bytes are not any model format biasinspect reads."""


class MalformedModelError(BiasInspectError):
    """The file claims a known format but its structure is broken or inconsistent."""


class ResourceLimitError(BiasInspectError):
    """Reading the file would exceed a documented cap (size, depth, node budget, ratio)."""
