"""What an inert unpickling produces: stubs for globals, calls, storages and tensors, and the
decoding of protocol-0 text arguments.

Nothing here imports or calls anything a pickle names; see :mod:`biasinspect.readers.pickle_inert`.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from biasinspect import limits
from biasinspect.errors import MalformedModelError, UnsupportedFormatError
from biasinspect.readers.tensors import TensorInfo

__all__ = [
    "Call",
    "GlobalRef",
    "IdKey",
    "OpaqueRef",
    "PDict",
    "StorageRef",
    "TensorRef",
    "int_too_large",
    "latin",
    "parse_float",
    "parse_int",
    "parse_string",
    "raw_unicode",
    "tensor_of",
    "utf8",
]


@dataclass(frozen=True)
class GlobalRef:
    """A global a pickle names (``module``, ``name``); never imported."""

    module: str
    name: str

    @property
    def dotted(self) -> str:
        """``module.name``."""
        return f"{self.module}.{self.name}"


class Call:
    """The inert result of ``func(*args)`` / ``cls.__new__(cls, *args)`` in a pickle.

    ``state`` is what ``BUILD`` would have passed to ``__setstate__`` (the last one wins);
    ``items``/``listitems`` collect ``SETITEM``/``APPEND`` applied to the stub; ``tensor`` is set
    when the stub denotes a recognised array (numpy ``_reconstruct`` + ``BUILD``).
    """

    __slots__ = ("args", "func", "items", "kwargs", "listitems", "state", "tensor")

    def __init__(self, func: object, args: tuple[object, ...], kwargs: object = None) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.state: object = None
        self.items: list[tuple[object, object]] | None = None
        self.listitems: list[object] | None = None
        self.tensor: TensorRef | None = None

    @property
    def func_name(self) -> str | None:
        """Dotted name of the callable when it is a plain global, else ``None``."""
        return self.func.dotted if isinstance(self.func, GlobalRef) else None

    def __repr__(self) -> str:  # shallow on purpose: never walk arbitrary (deep) arguments
        return f"Call({self.func_name or '<dynamic>'})"


class PDict(dict[object, object]):
    """A dict built by a pickled ``collections.OrderedDict()``/``dict()`` call (keeps ``BUILD`` state)."""

    __slots__ = ("cls", "state")

    def __init__(self, cls: str) -> None:
        super().__init__()
        self.cls = cls
        self.state: object = None


class StorageRef:
    """A torch storage named by a persistent id; its bytes are never read."""

    __slots__ = ("dtype", "key", "numel", "type_name", "view_offset")

    # The persistent id's device location is deliberately not kept: it may be any pickled object
    # graph, and turning one into text can take minutes (str() of a deep / shared structure).
    def __init__(self, type_name: str, dtype: str | None, key: str, numel: int | None) -> None:
        self.type_name = type_name
        self.dtype = dtype
        self.key = key
        self.numel = numel
        self.view_offset = 0

    def __repr__(self) -> str:
        return f"StorageRef({self.type_name}, {self.key!r})"


class TensorRef:
    """A tensor rebuilt from a known torch helper: shape/dtype facts and whether it is a Parameter."""

    __slots__ = ("info", "is_parameter", "storage")

    def __init__(self, info: TensorInfo, is_parameter: bool, storage: StorageRef | None) -> None:
        self.info = info
        self.is_parameter = is_parameter
        self.storage = storage

    def __repr__(self) -> str:
        return f"TensorRef({list(self.info.shape)}, {self.info.dtype})"


class OpaqueRef:
    """Something a pickle produced that we cannot and need not model (buffers, extensions, ids)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return f"OpaqueRef({self.what})"


class IdKey:
    """Wraps a dict key that is not a plain scalar, hashed by identity.

    Hashing arbitrary pickled objects (e.g. a 100k-deep tuple) recurses in C without a depth
    check; readers only ever look up string keys, so other keys just need to be distinct.
    """

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj


def tensor_of(obj: object) -> TensorRef | None:
    """The tensor an unpickled object denotes (a :class:`TensorRef` or an array-like stub), if any."""
    if isinstance(obj, TensorRef):
        return obj
    if isinstance(obj, Call):
        return obj.tensor
    return None


_MAX_INT_TEXT = int(limits.MAX_PICKLE_INT_BYTES * 8 * 0.302) + 2
"""Decimal digits of the largest integer a text (protocol 0) INT/LONG may spell."""

# --------------------------------------------------------------------------------------------
# Text-argument parsing (protocol 0)


def utf8(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def latin(raw: bytes) -> str:
    # Python 2 ``str``; checkpoints keep ASCII names, latin-1 never fails.
    return raw.decode("latin-1")


def raw_unicode(raw: bytes) -> str:
    try:
        return raw.decode("raw-unicode-escape")
    except UnicodeDecodeError as e:
        raise MalformedModelError("malformed pickle: bad UNICODE argument") from e


def int_too_large(size: str) -> Exception:
    return UnsupportedFormatError(
        f"unsupported: the pickle holds an integer of {size}, over the "
        f"{limits.MAX_PICKLE_INT_BYTES * 8:,}-bit limit (no model value is that large)"
    )


def parse_int(raw: bytes) -> int:
    if raw == b"00":
        return 0
    if raw == b"01":
        return 1
    if len(raw) > _MAX_INT_TEXT:
        raise int_too_large(f"{len(raw):,} digits")
    try:
        return int(raw)
    except ValueError as e:
        raise MalformedModelError("malformed pickle: bad integer argument") from e


def parse_float(raw: bytes) -> float:
    try:
        return float(raw)
    except ValueError as e:
        raise MalformedModelError("malformed pickle: bad float argument") from e


def parse_string(raw: bytes) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[:1] in (b"'", b'"'):
        raw = raw[1:-1]
    else:
        raise MalformedModelError("malformed pickle: STRING argument is not quoted")
    try:
        decoded = codecs.escape_decode(raw)[0]
    except ValueError as e:
        raise MalformedModelError("malformed pickle: bad STRING escape") from e
    return latin(bytes(decoded))
