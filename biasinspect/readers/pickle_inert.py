"""An inert pickle reader: the security core of the PyTorch readers.

This module never calls :mod:`pickle`'s loaders and never imports a module named by a pickle.
It is an opcode-level interpreter (protocols 0-5) whose only effects are building plain
Python containers and inert stubs:

* every ``GLOBAL``/``STACK_GLOBAL``/``INST`` name becomes a :class:`GlobalRef` recording the
  dotted name -- nothing is imported, whatever the name;
* ``REDUCE``/``NEWOBJ``/``NEWOBJ_EX``/``OBJ``/``INST`` become :class:`Call` stubs, and ``BUILD``
  records its state on the stub -- nothing is called;
* persistent ids (torch storages) become :class:`StorageRef` stubs;
* calls of the known torch tensor-rebuild helpers become :class:`TensorRef` objects carrying a
  :class:`~biasinspect.readers.tensors.TensorInfo` (shape and dtype only; no storage byte is read).

Every referenced global is recorded and classified (:func:`classify_global`) so that readers can
warn about pickles that would run code under ``torch.load(weights_only=False)``.

The stubs and text-argument decoding live in :mod:`~biasinspect.readers.pickle_values`, the
global classification in :mod:`~biasinspect.readers.pickle_globals` and the tensor rebuild
helpers in :mod:`~biasinspect.readers.pickle_tensors`; every public name is re-exported here.

Caps: the stream length is bounded by ``limits.MAX_PICKLE_BYTES`` and the number of opcodes plus
created objects by ``limits.MAX_PICKLE_OBJECTS``.  The interpreter has no recursion; objects are
shared references (``DUP``/``GET`` never copy), so memo and ``DUP`` bombs cost one reference each.
Anything structurally wrong (truncation, unknown opcode, stack underflow, missing memo key) is a
:class:`~biasinspect.errors.MalformedModelError` whose message starts with ``malformed pickle:``.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from biasinspect import limits
from biasinspect.errors import MalformedModelError, ResourceLimitError, UnsupportedFormatError
from biasinspect.readers.pickle_globals import (
    PY2_MODULES,
    STORAGE_DTYPES,
    TS_LIST_BUILDERS,
    classify_global,
    itemsize,
)
from biasinspect.readers.pickle_tensors import NUMPY_RECONSTRUCT, REBUILDERS, numpy_tensor
from biasinspect.readers.pickle_values import (
    Call,
    GlobalRef,
    IdKey,
    OpaqueRef,
    PDict,
    StorageRef,
    TensorRef,
    int_too_large,
    latin,
    parse_float,
    parse_int,
    parse_string,
    raw_unicode,
    tensor_of,
    utf8,
)

__all__ = [
    "LEGACY_MAGIC",
    "Call",
    "GlobalRef",
    "InertPickle",
    "InertUnpickler",
    "OpaqueRef",
    "PDict",
    "StorageRef",
    "TensorRef",
    "classify_global",
    "describe_value",
    "guard",
    "is_plain_value",
    "itemsize",
    "load_inert",
    "tensor_of",
]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
"""The first pickled object of a legacy (non-zip) ``torch.save`` file."""

NESTED_BLOB_NOT_INSPECTED = "<nested storage blob not inspected>"
"""Reported as an unsafe callable when storage blobs nest deeper than :data:`MAX_NESTED_BLOBS`
(torch.load would unpickle the blob; we did not look inside)."""

MAX_NESTED_BLOBS = 2
"""Deepest nesting of ``torch.storage._load_from_bytes`` blobs followed (plain pickles of
tensors embed a legacy torch.save stream per storage; a blob inside a blob is followed once)."""

ZIP_BLOB_NOT_INSPECTED = "<zip storage blob not inspected>"
"""Reported as an unsafe callable for a ``torch.storage._load_from_bytes`` blob in the zip format:
torch.load would read it as a whole zip checkpoint (its data.pkl unpickled); torch never writes
one, and the inert reader does not open it."""

OTHER_BLOB_NOT_INSPECTED = "<storage blob torch.load would read differently>"
"""Reported as an unsafe callable for a storage blob that is not a byte string, or whose first
pickle is computed (a call or a global that may equal the legacy magic number): torch.load would
go on reading it where the inert reader stops."""


# --------------------------------------------------------------------------------------------
# Byte sources


class _Source:
    """Bounded reads from a pickle stream.

    ``remaining`` is the smaller of the byte cap and the bytes actually available; asking past
    it is truncation when the data ran out and a ResourceLimitError when the cap did.
    """

    def __init__(
        self,
        read: Callable[[int], bytes],
        readline: Callable[[int], bytes],
        max_bytes: int,
        available: int | None,
    ) -> None:
        self._read = read
        self._readline = readline
        self._max_bytes = max_bytes
        self._size_bound = available is not None and available <= max_bytes
        self.remaining = min(max_bytes, available) if available is not None else max_bytes
        self.consumed = 0

    def _past_end(self, n: int) -> Exception:
        if self._size_bound:
            return MalformedModelError(
                f"malformed pickle: truncated (an opcode at byte {self.consumed} asks for more bytes "
                "than remain)"  # the count is the file's own bytes: never quoted
            )
        return ResourceLimitError(f"pickle is larger than the {self._max_bytes:,}-byte limit")

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes."""
        if n > self.remaining:
            raise self._past_end(n)
        data = self._read(n)
        if len(data) != n:
            raise MalformedModelError("malformed pickle: truncated (stream ended inside an opcode)")
        self.remaining -= n
        self.consumed += n
        return data

    def readline(self) -> bytes:
        """One newline-terminated line, without the newline."""
        data = self._readline(self.remaining)
        if not data.endswith(b"\n"):
            if len(data) >= self.remaining:
                raise self._past_end(len(data) + 1)
            raise MalformedModelError("malformed pickle: truncated (no newline after a text argument)")
        self.remaining -= len(data)
        self.consumed += len(data)
        return data[:-1]


def _bytes_source(data: bytes, max_bytes: int) -> _Source:
    """A source over an in-memory pickle."""
    view = memoryview(data)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = view[pos : pos + n].tobytes()
        pos += len(chunk)
        return chunk

    def readline(maxlen: int) -> bytes:
        nonlocal pos
        stop = pos + maxlen
        end = data.find(b"\n", pos, stop)
        if end >= 0:
            stop = end + 1
        chunk = view[pos:stop].tobytes()
        pos += len(chunk)
        return chunk

    return _Source(read, readline, max_bytes, len(data))


def _file_source(stream: BinaryIO, max_bytes: int, available: int | None) -> _Source:
    """A source over an open binary file, reading only as far as the pickle goes."""
    return _Source(stream.read, stream.readline, max_bytes, available)


# --------------------------------------------------------------------------------------------
# The interpreter


@dataclass
class InertPickle:
    """What :func:`load_inert` found: the root object plus every global the stream named."""

    root: object
    globals: dict[str, int]
    """Dotted global name -> times referenced, in first-reference order."""
    dynamic_calls: list[str]
    """Calls that run code outside the allowlist: callables that were themselves results of calls
    (gadget chains), and globals outside the known-safe set called by REDUCE, INST or OBJ
    (``torch.load(weights_only=False)`` would import their module and call them)."""
    bytes_read: int
    storages: list[StorageRef]
    """Every storage persistent id met, in order (to check the archive has them)."""
    attribute_paths: dict[str, str] = field(default_factory=dict)
    """Dotted global name -> its attribute part, for globals whose attribute part holds a dot
    (resolved through module attributes by protocol >= 4; never safe)."""

    def classify(self, dotted: str) -> str:
        """:func:`classify_global` of one recorded global, knowing its attribute part."""
        return classify_global(dotted, self.attribute_paths.get(dotted))

    def unsafe_callables(self) -> list[str]:
        """Sorted dotted names classified ``"unsafe"`` plus dynamic-call producers."""
        found = {name for name in self.globals if self.classify(name) == "unsafe"}
        found.update(self.dynamic_calls)
        return sorted(found)

    def unknown_globals(self) -> list[str]:
        """Sorted dotted names outside the allowlist that are not known-unsafe either."""
        return sorted(name for name in self.globals if self.classify(name) == "unknown")


_MARK = object()


class _Budget:
    """Counts opcodes and created objects against ``limits.MAX_PICKLE_OBJECTS``."""

    __slots__ = ("blobs", "left")

    def __init__(self, total: int) -> None:
        self.left = total
        self.blobs = 0  # nested storage blobs met so far (their storages' key prefix)


class InertUnpickler:
    """Interprets one or more consecutive pickles from a source without executing anything.

    ``load()`` may be called repeatedly (a legacy torch.save file is several pickles in a row).
    """

    def __init__(
        self,
        source: _Source,
        *,
        budget: _Budget | None = None,
        nested_depth: int = 0,
    ) -> None:
        self._src = source
        self._budget = budget or _Budget(limits.MAX_PICKLE_OBJECTS)
        self._nested_depth = nested_depth
        self.globals: dict[str, int] = {}
        self.dynamic_calls: list[str] = []
        self.storages: list[StorageRef] = []
        self.attribute_paths: dict[str, str] = {}

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = limits.MAX_PICKLE_BYTES) -> InertUnpickler:
        """An unpickler over an in-memory stream."""
        return cls(_bytes_source(data, max_bytes))

    @classmethod
    def from_file(
        cls, stream: BinaryIO, *, max_bytes: int = limits.MAX_PICKLE_BYTES, available: int | None = None
    ) -> InertUnpickler:
        """An unpickler over an open binary file (``available``: bytes left in the file, if known)."""
        return cls(_file_source(stream, max_bytes, available))

    @property
    def bytes_read(self) -> int:
        """Bytes consumed so far."""
        return self._src.consumed

    def result(self, root: object) -> InertPickle:
        """Package ``root`` with the globals seen so far."""
        return InertPickle(
            root,
            dict(self.globals),
            list(self.dynamic_calls),
            self._src.consumed,
            list(self.storages),
            dict(self.attribute_paths),
        )

    # -- helpers -------------------------------------------------------------------------------

    def _global(self, module: str, name: str) -> GlobalRef:
        module = PY2_MODULES.get(module, module)
        ref = GlobalRef(module, name)
        dotted = ref.dotted
        self.globals[dotted] = self.globals.get(dotted, 0) + 1
        if "." in name:
            self.attribute_paths[dotted] = name
        return ref

    def _spend(self, n: int = 1) -> None:
        self._budget.left -= n
        if self._budget.left < 0:
            raise ResourceLimitError(
                f"pickle needs more than {limits.MAX_PICKLE_OBJECTS:,} opcodes/objects (node budget)"
            )

    @staticmethod
    def _key(obj: object) -> object:
        if obj is None or isinstance(obj, (str, int, float, bytes, bool, GlobalRef)):
            return obj
        return IdKey(obj)

    # -- main loop -----------------------------------------------------------------------------

    def load(self) -> object:
        """Interpret one pickle up to its STOP opcode and return its (inert) root object."""
        read = self._src.read
        readline = self._src.readline
        stack: list[object] = []
        metastack: list[list[object]] = []
        memo: dict[int, object] = {}
        unpack = struct.unpack

        def pop() -> object:
            if not stack:
                raise MalformedModelError("malformed pickle: stack underflow")
            return stack.pop()

        def top() -> object:
            if not stack:
                raise MalformedModelError("malformed pickle: stack underflow")
            return stack[-1]

        def pop_mark() -> list[object]:
            nonlocal stack
            if not metastack:
                raise MalformedModelError("malformed pickle: MARK expected on the stack")
            items = stack
            stack = metastack.pop()
            return items

        def get_memo(idx: int) -> object:
            try:
                return memo[idx]
            except KeyError:
                raise MalformedModelError(f"malformed pickle: memo key {idx} is not defined") from None

        def text_global() -> GlobalRef:
            module = readline().decode("utf-8", "surrogateescape")
            name = readline().decode("utf-8", "surrogateescape")
            return self._global(module, name)

        while True:
            self._spend()
            op = read(1)[0]
            if op == 0x71:  # q BINPUT
                memo[read(1)[0]] = top()
            elif op == 0x68:  # h BINGET
                stack.append(get_memo(read(1)[0]))
            elif op == 0x94:  # MEMOIZE
                memo[len(memo)] = top()
            elif op == 0x58:  # X BINUNICODE
                (n,) = unpack("<I", read(4))
                stack.append(utf8(read(n)))
            elif op == 0x8C:  # SHORT_BINUNICODE
                stack.append(utf8(read(read(1)[0])))
            elif op == 0x4B:  # K BININT1
                stack.append(read(1)[0])
            elif op == 0x4D:  # M BININT2
                stack.append(unpack("<H", read(2))[0])
            elif op == 0x4A:  # J BININT
                stack.append(unpack("<i", read(4))[0])
            elif op == 0x28:  # ( MARK
                metastack.append(stack)
                stack = []
            elif op == 0x74:  # t TUPLE
                # pop_mark() rebinds ``stack``: take the items before naming ``stack.append``.
                items = pop_mark()
                stack.append(tuple(items))
            elif op == 0x29:  # ) EMPTY_TUPLE
                stack.append(())
            elif op == 0x85:  # TUPLE1
                stack.append((pop(),))
            elif op == 0x86:  # TUPLE2
                b = pop()
                a = pop()
                stack.append((a, b))
            elif op == 0x87:  # TUPLE3
                c = pop()
                b = pop()
                a = pop()
                stack.append((a, b, c))
            elif op == 0x52:  # R REDUCE
                args = pop()
                func = pop()
                stack.append(self._reduce(func, args))
            elif op == 0x51:  # Q BINPERSID
                stack.append(self._persistent(pop()))
            elif op == 0x50:  # P PERSID
                pid = readline().decode("ascii", "replace")
                stack.append(self._persistent(pid))
            elif op == 0x63:  # c GLOBAL
                stack.append(text_global())
            elif op == 0x93:  # STACK_GLOBAL
                name = pop()
                module = pop()
                if not isinstance(module, str) or not isinstance(name, str):
                    raise MalformedModelError("malformed pickle: STACK_GLOBAL needs two strings")
                stack.append(self._global(module, name))
            elif op == 0x81:  # NEWOBJ
                args = pop()
                cls = pop()
                stack.append(self._new(cls, args, None))
            elif op == 0x92:  # NEWOBJ_EX
                kwargs = pop()
                args = pop()
                cls = pop()
                stack.append(self._new(cls, args, kwargs))
            elif op == 0x62:  # b BUILD
                state = pop()
                self._build(top(), state)
            elif op == 0x7D:  # } EMPTY_DICT
                self._spend()
                stack.append({})
            elif op == 0x5D:  # ] EMPTY_LIST
                self._spend()
                stack.append([])
            elif op == 0x73:  # s SETITEM
                value = pop()
                key = pop()
                self._setitems(top(), [key, value])
            elif op == 0x75:  # u SETITEMS
                items = pop_mark()
                self._setitems(top(), items)
            elif op == 0x61:  # a APPEND
                value = pop()
                self._append(top(), [value])
            elif op == 0x65:  # e APPENDS
                items = pop_mark()
                self._append(top(), items)
            elif op == 0x4E:  # N NONE
                stack.append(None)
            elif op == 0x88:  # NEWTRUE
                stack.append(True)
            elif op == 0x89:  # NEWFALSE
                stack.append(False)
            elif op == 0x2E:  # . STOP
                return pop()
            elif op == 0x80:  # PROTO
                proto = read(1)[0]
                if proto > 5:
                    raise MalformedModelError(f"malformed pickle: unsupported protocol {proto}")
            elif op == 0x95:  # FRAME: frames are transparent to a byte-level reader
                read(8)
            elif op == 0x47:  # G BINFLOAT
                stack.append(unpack(">d", read(8))[0])
            elif op == 0x46:  # F FLOAT
                stack.append(parse_float(readline()))
            elif op == 0x49:  # I INT
                stack.append(parse_int(readline()))
            elif op == 0x4C:  # L LONG
                line = readline()
                stack.append(parse_int(line[:-1] if line.endswith(b"L") else line))
            elif op == 0x8A:  # LONG1
                stack.append(int.from_bytes(read(read(1)[0]), "little", signed=True))
            elif op == 0x8B:  # LONG4
                (n,) = unpack("<i", read(4))
                if n < 0:
                    raise MalformedModelError("malformed pickle: LONG4 with negative length")
                if n > limits.MAX_PICKLE_INT_BYTES:
                    raise int_too_large(f"{n * 8:,} bits")
                stack.append(int.from_bytes(read(n), "little", signed=True))
            elif op == 0x53:  # S STRING
                stack.append(parse_string(readline()))
            elif op == 0x54:  # T BINSTRING
                (n,) = unpack("<i", read(4))
                if n < 0:
                    raise MalformedModelError("malformed pickle: BINSTRING with negative length")
                stack.append(latin(read(n)))
            elif op == 0x55:  # U SHORT_BINSTRING
                stack.append(latin(read(read(1)[0])))
            elif op == 0x56:  # V UNICODE
                stack.append(raw_unicode(readline()))
            elif op == 0x8D:  # BINUNICODE8
                (n,) = unpack("<Q", read(8))
                stack.append(utf8(read(n)))
            elif op == 0x42:  # B BINBYTES
                (n,) = unpack("<I", read(4))
                stack.append(read(n))
            elif op == 0x43:  # C SHORT_BINBYTES
                stack.append(read(read(1)[0]))
            elif op == 0x8E:  # BINBYTES8
                (n,) = unpack("<Q", read(8))
                stack.append(read(n))
            elif op == 0x96:  # BYTEARRAY8
                (n,) = unpack("<Q", read(8))
                stack.append(bytearray(read(n)))
            elif op == 0x97:  # NEXT_BUFFER: out-of-band data is never available to us
                stack.append(OpaqueRef("out-of-band pickle buffer"))
            elif op == 0x98:  # READONLY_BUFFER
                top()
            elif op == 0x30:  # 0 POP
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif op == 0x31:  # 1 POP_MARK
                pop_mark()
            elif op == 0x32:  # 2 DUP
                stack.append(top())
            elif op == 0x67:  # g GET
                stack.append(get_memo(parse_int(readline())))
            elif op == 0x6A:  # j LONG_BINGET
                stack.append(get_memo(unpack("<I", read(4))[0]))
            elif op == 0x70:  # p PUT
                memo[parse_int(readline())] = top()
            elif op == 0x72:  # r LONG_BINPUT
                memo[unpack("<I", read(4))[0]] = top()
            elif op == 0x6C:  # l LIST
                items = pop_mark()
                stack.append(items)
            elif op == 0x64:  # d DICT
                items = pop_mark()
                d: dict[object, object] = {}
                self._setitems(d, items)
                stack.append(d)
            elif op == 0x8F:  # EMPTY_SET: sets are kept as lists (no hashing of pickled objects)
                stack.append([])
            elif op == 0x90:  # ADDITEMS
                items = pop_mark()
                target = top()
                if isinstance(target, list):
                    self._spend(len(items))
                    target.extend(items)
                else:
                    self._append(target, items)
            elif op == 0x91:  # FROZENSET
                items = pop_mark()
                stack.append(tuple(items))
            elif op == 0x69:  # i INST
                ref = text_global()
                items = pop_mark()
                self._note_called_global(ref)
                stack.append(self._new(ref, tuple(items), None))
            elif op == 0x6F:  # o OBJ
                items = pop_mark()
                if not items:
                    raise MalformedModelError("malformed pickle: OBJ without a class")
                self._note_called_global(items[0])
                stack.append(self._new(items[0], tuple(items[1:]), None))
            elif op == 0x82:  # EXT1
                stack.append(self._ext(read(1)[0]))
            elif op == 0x83:  # EXT2
                stack.append(self._ext(unpack("<H", read(2))[0]))
            elif op == 0x84:  # EXT4
                stack.append(self._ext(unpack("<i", read(4))[0]))
            else:
                raise MalformedModelError(
                    f"malformed pickle: unknown opcode at byte {self._src.consumed - 1}"
                )

    # -- opcode semantics ----------------------------------------------------------------------

    def _ext(self, code: int) -> GlobalRef:
        # The extension registry maps codes to globals at load time; we cannot know which.
        return self._global("copyreg.extension", str(code))

    def _setitems(self, target: object, items: list[object]) -> None:
        if len(items) % 2:
            raise MalformedModelError("malformed pickle: SETITEMS with an odd number of items")
        self._spend(len(items) // 2)
        if isinstance(target, dict):
            key = self._key
            for i in range(0, len(items), 2):
                target[key(items[i])] = items[i + 1]
        elif isinstance(target, Call):
            if target.items is None:
                target.items = []
            target.items.extend(zip(items[::2], items[1::2], strict=True))
        else:
            raise MalformedModelError("malformed pickle: SETITEM on an object that is not a dict")

    def _append(self, target: object, items: list[object]) -> None:
        self._spend(len(items))
        if isinstance(target, list):
            target.extend(items)
        elif isinstance(target, Call):
            if target.listitems is None:
                target.listitems = []
            target.listitems.extend(items)
        else:
            raise MalformedModelError("malformed pickle: APPEND on an object that is not a list")

    def _new(self, cls: object, args: object, kwargs: object) -> object:
        self._spend()
        if not isinstance(args, tuple):
            raise MalformedModelError("malformed pickle: NEWOBJ arguments are not a tuple")
        if not isinstance(cls, GlobalRef):
            self._note_dynamic(cls)
        elif cls.dotted in ("collections.OrderedDict", "builtins.dict") and not args:
            return PDict(cls.dotted)
        return Call(cls, args, kwargs)

    def _build(self, target: object, state: object) -> None:
        if isinstance(target, Call):
            target.state = state
            if target.func_name in NUMPY_RECONSTRUCT:
                target.tensor = numpy_tensor(state)
        elif isinstance(target, PDict):
            target.state = state
        # BUILD on anything else (plain containers, tensors) has no effect we need to model.

    def _note_dynamic(self, func: object) -> None:
        if isinstance(func, Call):
            self.dynamic_calls.append(func.func_name or "<dynamic call>")
        elif isinstance(func, (GlobalRef, PDict, TensorRef, StorageRef)):
            pass
        else:
            self.dynamic_calls.append(f"<call of a {type(func).__name__}>")

    def note_indirect_call(self, func: object) -> None:
        """Record ``func`` as called by an allow-listed helper (``_rebuild_from_type_v2``'s func,
        ``copyreg._reconstructor``'s base): a global outside the allowlist, or any non-global."""
        if isinstance(func, GlobalRef):
            self._note_called_global(func)
        else:
            self._note_dynamic(func)

    def _note_called_global(self, func: object) -> None:
        # Unlike NEWOBJ (cls.__new__), these opcodes call the named object itself: for a name
        # outside the allowlist that means importing its module and running it.
        if isinstance(func, GlobalRef) and classify_global(func.dotted, func.name) == "unknown":
            self.dynamic_calls.append(func.dotted)

    def _reduce(self, func: object, args: object) -> object:
        self._spend()
        if not isinstance(args, tuple):
            # pickle itself requires a tuple here.
            raise MalformedModelError("malformed pickle: REDUCE arguments are not a tuple")
        if not isinstance(func, GlobalRef):
            self._note_dynamic(func)
            return Call(func, args)
        name = func.dotted
        self._note_called_global(func)
        if name in ("collections.OrderedDict", "builtins.dict") and not args:
            return PDict(name)
        if name == "copyreg._reconstructor" and len(args) == 3:
            # Protocols 0/1 pickle objects as _reconstructor(cls, base, state): base.__new__(cls,
            # state) and, unless base is object, base.__init__(obj, state) -- base runs code.
            cls, base, _state = args
            if not (isinstance(base, GlobalRef) and base.dotted == "builtins.object"):
                self.note_indirect_call(base)
            return self._new(cls, (), None)
        if name == "copyreg.__newobj__" and args:
            return self._new(args[0], args[1:], None)
        if name == "copyreg.__newobj_ex__" and len(args) == 3:
            return self._new(args[0], args[1] if isinstance(args[1], tuple) else (), args[2])
        if name == "torch.Size" and len(args) == 1 and isinstance(args[0], (tuple, list)):
            return tuple(args[0])
        if name in TS_LIST_BUILDERS and len(args) == 1 and isinstance(args[0], list):
            return args[0]
        if name == "torch.jit._pickle.restore_type_tag" and len(args) == 2:
            return args[0]
        if name == "builtins.bytes" and not args:
            return b""  # how protocols 0-2 write b""
        if (
            name in ("_codecs.encode", "codecs.encode")
            and len(args) == 2
            and isinstance(args[0], str)
            and args[1] in ("latin1", "latin-1")
        ):
            # Protocols 0-2 pickle ``bytes`` as _codecs.encode(text, 'latin1'): decode it the same way.
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError as e:
                raise MalformedModelError("malformed pickle: bytes text is not latin-1") from e
        handler = REBUILDERS.get(name)
        if handler is not None:
            return handler(self, args)
        if name == "torch.storage._load_from_bytes":
            # torch.load(io.BytesIO(blob), weights_only=False) on whatever it is given.
            if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
                return self._storage_from_bytes(bytes(args[0]))
            self.dynamic_calls.append(OTHER_BLOB_NOT_INSPECTED)
        return Call(func, args)

    def _persistent(self, pid: object) -> object:
        self._spend()
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            stype, key, numel = pid[1], pid[2], pid[4]
            type_name = stype.name if isinstance(stype, GlobalRef) else str(type(stype).__name__)
            if not isinstance(key, (str, int)) or not isinstance(numel, int) or numel < 0:
                raise MalformedModelError("malformed pickle: bad storage persistent id")
            dtype = STORAGE_DTYPES.get(type_name)
            ref = StorageRef(type_name, dtype, str(key), numel)
            # Legacy format: ('storage', type, root_key, location, size, view_metadata)
            if len(pid) >= 6 and isinstance(pid[5], tuple) and len(pid[5]) == 3:
                _view_key, offset, view_size = pid[5]
                if isinstance(offset, int) and isinstance(view_size, int) and offset >= 0:
                    ref.view_offset = offset
                    ref.numel = view_size
            self.storages.append(ref)
            return ref
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "module" and isinstance(pid[1], GlobalRef):
            # Legacy torch.save(model) names each module class as ('module', cls, file, source);
            # torch.load resolves it to the class itself (the source text is only compared).
            return pid[1]
        return OpaqueRef("persistent id")

    def _storage_from_bytes(self, blob: bytes) -> object:
        """``torch.storage._load_from_bytes``: a legacy torch.save stream of one storage."""
        if self._nested_depth >= MAX_NESTED_BLOBS:
            # torch.load would unpickle this blob too (running whatever it names): never go quiet.
            self.dynamic_calls.append(NESTED_BLOB_NOT_INSPECTED)
            return OpaqueRef("nested storage blob")
        if blob.startswith(b"PK\x03\x04"):
            # torch.load checks for a zip first (torch.serialization._is_zipfile).
            self.dynamic_calls.append(ZIP_BLOB_NOT_INSPECTED)
            return OpaqueRef("zip storage blob")
        self._budget.blobs += 1
        blob_number = self._budget.blobs
        nested = InertUnpickler(
            _bytes_source(blob, len(blob)), budget=self._budget, nested_depth=self._nested_depth + 1
        )
        try:
            magic = nested.load()
            if not is_plain_value(magic):
                # A computed first value may equal the magic number under torch.load, which would
                # then unpickle the rest of the blob: never go quiet.
                nested.dynamic_calls.append(OTHER_BLOB_NOT_INSPECTED)
                return OpaqueRef("storage blob")
            if magic != LEGACY_MAGIC or isinstance(magic, bool):
                # torch.load raises after this first pickle, whose globals are merged below.
                return OpaqueRef("storage blob")
            nested.load()  # protocol version
            nested.load()  # sys_info
            obj = nested.load()
            nested.load()  # storage keys: torch.load unpickles this one too, so read its globals
        finally:
            for dotted, count in nested.globals.items():
                self.globals[dotted] = self.globals.get(dotted, 0) + count
            self.attribute_paths.update(nested.attribute_paths)
            self.dynamic_calls.extend(nested.dynamic_calls)
        if isinstance(obj, StorageRef):
            obj.key = f"inline:{blob_number}:{obj.key}"
        return obj


# --------------------------------------------------------------------------------------------
# Entry points


def is_plain_value(obj: object) -> bool:
    """True for values that equal an integer only when they are that integer: literals and
    containers.  False for call results, globals and stubs, whose real value (under torch.load)
    is unknown here."""
    return obj is None or isinstance(
        obj, (bool, int, float, complex, str, bytes, bytearray, tuple, list, dict)
    )


def describe_value(value: object) -> str:
    """A short, always-printable description of a pickled value for an error message (huge
    integers are not printable in full: ``str`` refuses past 4,300 digits)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() <= 64:
            return repr(value)
        return f"(an integer of {value.bit_length():,} bits)"
    if isinstance(value, (str, bytes)):
        text = repr(value[:40])
        return text if len(value) <= 40 else text + "..."
    if isinstance(value, (Call, GlobalRef)):
        return f"(computed by {value.func_name if isinstance(value, Call) else value.dotted})"
    return f"(a {type(value).__name__})"


def guard(action: Callable[[], object]) -> object:
    """Run an interpreter action mapping stray low-level errors to MalformedModelError."""
    try:
        return action()
    except (MalformedModelError, ResourceLimitError, UnsupportedFormatError):
        raise
    except (struct.error, IndexError, ValueError, OverflowError, UnicodeError, TypeError) as e:
        raise MalformedModelError(f"malformed pickle: {type(e).__name__}: {_one_line(e)}") from e
    except MemoryError as e:
        raise ResourceLimitError("pickle needs more memory than is available") from e
    except RecursionError as e:  # pragma: no cover - the interpreter does not recurse
        raise MalformedModelError("malformed pickle: nesting too deep") from e
    except OSError as e:
        raise MalformedModelError(f"malformed pickle: read error: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def load_inert(data: bytes | BinaryIO, *, max_bytes: int = limits.MAX_PICKLE_BYTES) -> InertPickle:
    """Interpret one pickle (bytes or an open binary file) inertly and return its root and globals.

    Raises MalformedModelError for broken streams and ResourceLimitError past the caps.
    Trailing bytes after STOP are ignored (a pickle with a zip appended reads as the pickle).
    """
    if isinstance(data, (bytes, bytearray)):
        unpickler = InertUnpickler.from_bytes(bytes(data), max_bytes=max_bytes)
    else:
        unpickler = InertUnpickler.from_file(data, max_bytes=max_bytes, available=_available(data))
    root = guard(unpickler.load)
    return unpickler.result(root)


def _available(stream: BinaryIO) -> int | None:
    try:
        here = stream.tell()
        end = stream.seek(0, io.SEEK_END)
        stream.seek(here)
        return end - here
    except (OSError, ValueError):
        return None
