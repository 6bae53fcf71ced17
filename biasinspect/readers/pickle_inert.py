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

Caps: the stream length is bounded by ``limits.MAX_PICKLE_BYTES`` and the number of opcodes plus
created objects by ``limits.MAX_PICKLE_OBJECTS``.  The interpreter has no recursion; objects are
shared references (``DUP``/``GET`` never copy), so memo and ``DUP`` bombs cost one reference each.
Anything structurally wrong (truncation, unknown opcode, stack underflow, missing memo key) is a
:class:`~biasinspect.errors.MalformedModelError` whose message starts with ``malformed pickle:``.
"""

from __future__ import annotations

import codecs
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from biasinspect import limits
from biasinspect.errors import MalformedModelError, ResourceLimitError, UnsupportedFormatError
from biasinspect.readers.tensors import TensorInfo

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

_MAX_INT_TEXT = int(limits.MAX_PICKLE_INT_BYTES * 8 * 0.302) + 2
"""Decimal digits of the largest integer a text (protocol 0) INT/LONG may spell."""


# --------------------------------------------------------------------------------------------
# Stubs


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


class _IdKey:
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


# --------------------------------------------------------------------------------------------
# Global classification

_UNSAFE_MODULES = frozenset(
    {
        "os",
        "posix",
        "nt",
        "subprocess",
        "_posixsubprocess",
        "_winapi",
        "runpy",
        "importlib",
        "imp",
        "sys",
        "shutil",
        "socket",
        "_socket",
        "ssl",
        "pty",
        "webbrowser",
        "code",
        "codeop",
        "ctypes",
        "_ctypes",
        "pickle",
        "_pickle",
        "cPickle",
        "dill",
        "cloudpickle",
        "marshal",
        "multiprocessing",
        "_multiprocessing",
        "concurrent",
        "asyncio",
        "threading",
        "_thread",
        "signal",
        "timeit",
        "cProfile",
        "profile",
        "pdb",
        "bdb",
        "trace",
        "pydoc",
        "doctest",
        "pkgutil",
        "zipimport",
        "http",
        "urllib",
        "urllib2",
        "ftplib",
        "smtplib",
        "telnetlib",
        "xmlrpc",
        "requests",
        "tempfile",
        "fileinput",
        "platform",
        "ensurepip",
        "venv",
        "pip",
        "setuptools",
        "distutils",
        "tkinter",
        "turtle",
        "idlelib",
        "commands",
        "popen2",
        "gc",
        "inspect",
        "torch.hub",
        "torch.utils.cpp_extension",
        "torch.package",
        "torch.jit",
        "torch._dynamo",
        "numpy.testing",
        "numpy.f2py",
        "numpy.distutils",
        "numpy.ctypeslib",
    }
)
"""Module families (the module or any submodule) whose globals run code or touch the system."""

_UNSAFE_EXACT = frozenset(
    {
        "builtins.exec",
        "builtins.eval",
        "builtins.compile",
        "builtins.open",
        "builtins.__import__",
        "builtins.getattr",
        "builtins.setattr",
        "builtins.delattr",
        "builtins.globals",
        "builtins.locals",
        "builtins.vars",
        "builtins.input",
        "builtins.breakpoint",
        "builtins.exit",
        "builtins.quit",
        "builtins.help",
        "builtins.execfile",
        "builtins.file",
        "builtins.reload",
        "builtins.apply",
        "builtins.__builtins__",
        "builtins.memoryview",
        "builtins.type",
        "builtins.super",
        "types.FunctionType",
        "types.CodeType",
        "types.LambdaType",
        "types.MethodType",
        "types.ModuleType",
        "types.new_class",
        "operator.attrgetter",
        "operator.methodcaller",
        "_operator.attrgetter",
        "_operator.methodcaller",
        "functools.reduce",
        "_functools.reduce",
        "codecs.open",
        "io.open",
        "_io.open",
        "io.FileIO",
        "_io.FileIO",
        "io.open_code",
        "_io.open_code",
        "torch.load",
        "torch.serialization.load",
        "torch.serialization._load",
        "torch.fx.graph_module.reduce_graph_module",
        "torch.fx.graph_module.reduce_package_graph_module",
        "torch.fx.graph_module.reduce_deploy_graph_module",
        "torch.fx.graph_module._exec_with_source",
        "torch.fx.graph_module._forward_from_src",
        "numpy.load",
        "numpy.lib.npyio.load",
        "numpy.lib._npyio_impl.load",
    }
)
"""Exact dotted names that run code (or open files) when called during unpickling."""

_UNSAFE_LEAVES = frozenset(
    {
        "system",
        "popen",
        "popen2",
        "popen3",
        "popen4",
        "Popen",
        "exec",
        "eval",
        "execfile",
        "__import__",
        "execv",
        "execve",
        "execvp",
        "execvpe",
        "execl",
        "execle",
        "execlp",
        "execlpe",
        "spawnv",
        "spawnve",
        "spawnl",
        "spawnle",
        "spawnlp",
        "spawnvp",
        "posix_spawn",
        "posix_spawnp",
        "fork",
        "forkpty",
        "check_output",
        "check_call",
        "getoutput",
        "getstatusoutput",
        "run_path",
        "run_module",
        "_run_code",
        "_run_module_code",
        "import_module",
        "load_inline",
        "load_library",
        "startfile",
        "__getattribute__",
        "__globals__",
        "__builtins__",
        "__subclasses__",
        "__code__",
        "__reduce__",
        "__reduce_ex__",
        "__setstate__",
        "__init__",
        "__new__",
        "__class__",
        "__dict__",
    }
)
"""Attribute names that denote code execution whatever module they are reached through."""

_ROOT_MODULE_NAMES = frozenset(
    {"torch", "numpy", "np", "builtins", "__builtin__", "torchvision", "collections"}
)
"""Top-level package names that never appear inside a safe global's dotted path."""

_SAFE_EXACT = frozenset(
    {
        "collections.OrderedDict",
        "collections.defaultdict",
        "collections.deque",
        "collections.Counter",
        "builtins.set",
        "builtins.frozenset",
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "builtins.int",
        "builtins.float",
        "builtins.complex",
        "builtins.bool",
        "builtins.str",
        "builtins.bytes",
        "builtins.bytearray",
        "builtins.slice",
        "builtins.range",
        "builtins.object",
        "builtins.NoneType",
        "builtins.Ellipsis",
        "builtins.NotImplemented",
        "copyreg._reconstructor",
        "copyreg.__newobj__",
        "copyreg.__newobj_ex__",
        "_codecs.encode",
        "codecs.encode",
        "functools.partial",
        "argparse.Namespace",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        "decimal.Decimal",
        "fractions.Fraction",
        "uuid.UUID",
        "re._compile",
        "torch.Size",
        "torch.device",
        "torch.Tensor",
        "torch.storage._load_from_bytes",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        "torch.storage._LegacyStorage",
        "torch._tensor._rebuild_from_type",
        "torch._tensor._rebuild_from_type_v2",
        "torch.serialization._get_layout",
        "torch.nn.parameter.Parameter",
        "torch.nn.parameter.Buffer",
        "torch.nn.parameter.UninitializedParameter",
        "torch.nn.parameter.UninitializedBuffer",
        "torch.nn.utils.weight_norm.WeightNorm",
        "torch.nn.utils.spectral_norm.SpectralNorm",
        "torch.nn.utils.spectral_norm.SpectralNormStateDictHook",
        "torch.nn.utils.spectral_norm.SpectralNormLoadStateDictPreHook",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.ndarray",
        "numpy.dtype",
    }
)
"""Known-harmless constructors and rebuild helpers (exact dotted names)."""

_SAFE_PREFIXES = (
    "torch._utils._rebuild_",
    "torch.nn.modules.",
    "torch.ao.nn.",
    "torch.nn.quantized.",
    "torch.nn.intrinsic.",
    "torch.nn.qat.",
    "torch.ao.quantization.",
    "torch.nn.utils.parametrize.",
    "torch.nn.utils.parametrizations.",
    "torch.nn.functional.",
    "numpy.dtypes.",
    "torchvision.models.",
    "torchvision.ops.",
)
"""Module families of known nn-module classes and rebuild helpers."""

_TORCH_DTYPES: dict[str, str] = {
    "float32": "float32",
    "float": "float32",
    "float64": "float64",
    "double": "float64",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "complex32": "complex32",
    "chalf": "complex32",
    "complex64": "complex64",
    "cfloat": "complex64",
    "complex128": "complex128",
    "cdouble": "complex128",
    "uint8": "uint8",
    "int8": "int8",
    "int16": "int16",
    "short": "int16",
    "int32": "int32",
    "int": "int32",
    "int64": "int64",
    "long": "int64",
    "bool": "bool",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "qint8": "qint8",
    "quint8": "quint8",
    "qint32": "qint32",
    "quint4x2": "quint4x2",
    "quint2x4": "quint2x4",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e4m3fnuz": "float8_e4m3fnuz",
    "float8_e5m2": "float8_e5m2",
    "float8_e5m2fnuz": "float8_e5m2fnuz",
    "float8_e8m0fnu": "float8_e8m0fnu",
    "float4_e2m1fn_x2": "float4_e2m1",
}
"""``torch.<name>`` dtype globals -> TensorInfo dtype names."""

_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}
"""Typed-storage class names -> element dtype."""

_NUMPY_DTYPES: dict[str, str] = {
    "f2": "float16",
    "f4": "float32",
    "f8": "float64",
    "c8": "complex64",
    "c16": "complex128",
    "i1": "int8",
    "i2": "int16",
    "i4": "int32",
    "i8": "int64",
    "u1": "uint8",
    "u2": "uint16",
    "u4": "uint32",
    "u8": "uint64",
    "b1": "bool",
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "bool": "bool",
}

_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}
"""Bytes per element, for storage-bounds checks."""

_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "exceptions": "builtins"}
"""Python 2 module names that ``fix_imports`` maps (torch.load uses it for protocol < 3)."""


def itemsize(dtype: str) -> int | None:
    """Bytes per element of a dtype name, when known."""
    return _ITEMSIZE.get(dtype)


def classify_global(dotted: str, attribute: str | None = None) -> str:
    """Classify a global a pickle names: ``"safe"``, ``"unsafe"`` or ``"unknown"``.

    ``"unsafe"``: it would run code or touch the system under ``torch.load(weights_only=False)``
    (os/subprocess/builtins.exec/... families, see ``_UNSAFE_*``).  ``"safe"``: a known torch /
    numpy / collections rebuild helper or nn-module class.  Everything else is ``"unknown"``: it
    would be imported (running that module's import-time code) and maybe called.

    ``attribute`` is the name part of the GLOBAL / STACK_GLOBAL opcode when the caller knows it
    (``dotted`` then ends with it).  Protocol >= 4 resolves a dotted attribute through module
    attributes (``torch.nn.modules.conv`` + ``torch.hub.load`` reaches ``torch.hub.load``), so a
    dotted attribute part is never safe, whatever module it starts from.  The path's prefixes and
    every run inside the attribute walk are checked against the unsafe module families; runs that
    start inside the module part are not (``mypkg.code.Net`` imports the user's ``mypkg.code``, not
    the standard library's ``code``: unknown, not unsafe).
    """
    module, _, name = dotted.rpartition(".")
    module = _PY2_MODULES.get(module, module)
    full = f"{module}.{name}"
    if full in _UNSAFE_EXACT:
        return "unsafe"
    if full in _TS_PICKLE_HELPERS and (attribute is None or "." not in attribute):
        # TorchScript's own list/type-tag rebuilders (torch.jit is otherwise an unsafe family).
        return "safe"
    parts = full.split(".")
    walk_start = len(parts) - attribute.count(".") - 1 if attribute and "." in attribute else len(parts)
    for start in [0, *range(max(walk_start, 1), len(parts))]:
        for end in range(start + 1, len(parts) + 1):
            if ".".join(parts[start:end]) in _UNSAFE_MODULES or (
                start > 0 and ".".join(parts[start:end]) in _UNSAFE_EXACT
            ):
                return "unsafe"
    if any(part in _UNSAFE_LEAVES for part in parts[1:]):
        return "unsafe"
    if attribute is not None and "." in attribute:
        return "unknown"
    if any(part in _ROOT_MODULE_NAMES for part in parts[1:]):
        # Without the attribute part (a caller that has only the dotted name), a top-level package
        # name deeper in the path means an attribute walk out of the safe family.
        return "unknown"
    if full in _SAFE_EXACT or full.startswith(_SAFE_PREFIXES):
        return "safe"
    if module == "torch" and (name in _TORCH_DTYPES or name in _STORAGE_DTYPES or name in _TORCH_ENUMS):
        return "safe"
    if module == "torch.storage" and name.endswith("Storage"):
        return "safe"
    return "unknown"


_TORCH_ENUMS = frozenset(
    {
        "strided",
        "sparse_coo",
        "sparse_csr",
        "sparse_csc",
        "sparse_bsr",
        "sparse_bsc",
        "_mkldnn",
        "contiguous_format",
        "channels_last",
        "channels_last_3d",
        "preserve_format",
        "per_tensor_affine",
        "per_channel_affine",
        "per_channel_affine_float_qparams",
        "per_tensor_symmetric",
        "per_channel_symmetric",
    }
)
"""Layout / memory-format / qscheme constants that pickles name as ``torch.<x>``."""


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
                f"malformed pickle: truncated (an opcode at byte {self.consumed} asks for {n:,} bytes "
                "past the end)"
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
        module = _PY2_MODULES.get(module, module)
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
        return _IdKey(obj)

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
                stack.append(_utf8(read(n)))
            elif op == 0x8C:  # SHORT_BINUNICODE
                stack.append(_utf8(read(read(1)[0])))
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
                stack.append(_parse_float(readline()))
            elif op == 0x49:  # I INT
                stack.append(_parse_int(readline()))
            elif op == 0x4C:  # L LONG
                line = readline()
                stack.append(_parse_int(line[:-1] if line.endswith(b"L") else line))
            elif op == 0x8A:  # LONG1
                stack.append(int.from_bytes(read(read(1)[0]), "little", signed=True))
            elif op == 0x8B:  # LONG4
                (n,) = unpack("<i", read(4))
                if n < 0:
                    raise MalformedModelError("malformed pickle: LONG4 with negative length")
                if n > limits.MAX_PICKLE_INT_BYTES:
                    raise _int_too_large(f"{n * 8:,} bits")
                stack.append(int.from_bytes(read(n), "little", signed=True))
            elif op == 0x53:  # S STRING
                stack.append(_parse_string(readline()))
            elif op == 0x54:  # T BINSTRING
                (n,) = unpack("<i", read(4))
                if n < 0:
                    raise MalformedModelError("malformed pickle: BINSTRING with negative length")
                stack.append(_latin(read(n)))
            elif op == 0x55:  # U SHORT_BINSTRING
                stack.append(_latin(read(read(1)[0])))
            elif op == 0x56:  # V UNICODE
                stack.append(_raw_unicode(readline()))
            elif op == 0x8D:  # BINUNICODE8
                (n,) = unpack("<Q", read(8))
                stack.append(_utf8(read(n)))
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
                stack.append(get_memo(_parse_int(readline())))
            elif op == 0x6A:  # j LONG_BINGET
                stack.append(get_memo(unpack("<I", read(4))[0]))
            elif op == 0x70:  # p PUT
                memo[_parse_int(readline())] = top()
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
                    f"malformed pickle: unknown opcode 0x{op:02x} at byte {self._src.consumed - 1}"
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
            if target.func_name in _NUMPY_RECONSTRUCT:
                target.tensor = _numpy_tensor(state)
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
        if name in _TS_LIST_BUILDERS and len(args) == 1 and isinstance(args[0], list):
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
        handler = _REBUILDERS.get(name)
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
            dtype = _STORAGE_DTYPES.get(type_name)
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


_TS_LIST_BUILDERS = frozenset(
    {
        "torch.jit._pickle.build_intlist",
        "torch.jit._pickle.build_doublelist",
        "torch.jit._pickle.build_boollist",
        "torch.jit._pickle.build_tensorlist",
        "torch.jit._pickle.build_complexlist",
    }
)
"""TorchScript pickles wrap typed lists in these; the list itself is what they rebuild."""

_TS_PICKLE_HELPERS = _TS_LIST_BUILDERS | {
    "torch.jit._pickle.build_tensor_from_id",
    "torch.jit._pickle.restore_type_tag",
}
"""The only torch.jit names a TorchScript data.pkl needs (exact names, never a prefix)."""

_NUMPY_RECONSTRUCT = frozenset({"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"})


# --------------------------------------------------------------------------------------------
# Tensor rebuild helpers (argument layouts from torch/_utils.py; nothing here calls torch)


def _shape(value: object, what: str) -> tuple[int, ...]:
    if isinstance(value, Call) and value.func_name == "torch.Size" and len(value.args) == 1:
        value = value.args[0]
    if not isinstance(value, (tuple, list)):
        raise MalformedModelError(f"malformed pickle: {what} of a tensor is not a tuple")
    dims: list[int] = []
    for dim in value:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0 or dim >= 1 << 62:
            raise MalformedModelError(f"malformed pickle: {what} of a tensor holds a non-size value")
        dims.append(dim)
    count = 1
    for dim in dims:
        count *= dim
    if count >= 1 << 63:
        raise MalformedModelError(f"malformed pickle: tensor shape {dims} has more than 2**63 elements")
    return tuple(dims)


def _offset(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedModelError("malformed pickle: tensor storage offset is not a non-negative int")
    return value


def _dtype_of_ref(value: object) -> str:
    if isinstance(value, GlobalRef) and value.module == "torch" and value.name in _TORCH_DTYPES:
        return _TORCH_DTYPES[value.name]
    return "unknown"


def _from_storage(
    storage: object, offset: object, size: object, what: str
) -> tuple[TensorInfo, StorageRef | None]:
    shape = _shape(size, what)
    off = _offset(offset)
    if isinstance(storage, StorageRef):
        dtype = storage.dtype or "unknown"
        return TensorInfo(shape, dtype, storage.key, off + storage.view_offset), storage
    # Storage we could not model (opaque blob, nested too deep): the shape is still a fact.
    return TensorInfo(shape, "unknown", None, off), None


def _rb_tensor_v2(u: InertUnpickler, args: tuple[object, ...]) -> object:
    if len(args) < 4:
        raise MalformedModelError("malformed pickle: _rebuild_tensor_v2 needs at least 4 arguments")
    info, storage = _from_storage(args[0], args[1], args[2], "size")
    _shape(args[3], "stride")
    return TensorRef(info, False, storage)


def _rb_tensor_v3(u: InertUnpickler, args: tuple[object, ...]) -> object:
    # (storage [untyped], storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
    if len(args) < 7:
        raise MalformedModelError("malformed pickle: _rebuild_tensor_v3 needs at least 7 arguments")
    info, storage = _from_storage(args[0], args[1], args[2], "size")
    _shape(args[3], "stride")
    dtype = _dtype_of_ref(args[6])
    return TensorRef(TensorInfo(info.shape, dtype, info.storage_key, info.storage_offset), False, storage)


def _rb_device_tensor(u: InertUnpickler, args: tuple[object, ...]) -> object:
    # (data [cpu tensor or numpy array], dtype, device, requires_grad)
    data = tensor_of(args[0]) if args else None
    if data is None or len(args) < 2:
        return Call(GlobalRef("torch._utils", "_rebuild_device_tensor"), args)
    dtype = _dtype_of_ref(args[1])
    info = TensorInfo(
        data.info.shape,
        dtype if dtype != "unknown" else data.info.dtype,
        data.info.storage_key,
        data.info.storage_offset,
    )
    return TensorRef(info, False, data.storage)


def _rb_qtensor(u: InertUnpickler, args: tuple[object, ...]) -> object:
    if len(args) < 4:
        raise MalformedModelError("malformed pickle: _rebuild_qtensor needs at least 4 arguments")
    info, storage = _from_storage(args[0], args[1], args[2], "size")
    return TensorRef(info, False, storage)


def _rb_parameter(u: InertUnpickler, args: tuple[object, ...]) -> object:
    if not args:
        raise MalformedModelError("malformed pickle: _rebuild_parameter without data")
    data = tensor_of(args[0])
    if data is None:
        return Call(GlobalRef("torch._utils", "_rebuild_parameter"), args)
    return TensorRef(data.info, True, data.storage)


def _rb_wrapper_subclass(u: InertUnpickler, args: tuple[object, ...]) -> object:
    # (cls, dtype, size, stride, storage_offset, layout, device, requires_grad)
    if len(args) < 5:
        raise MalformedModelError("malformed pickle: _rebuild_wrapper_subclass needs at least 5 arguments")
    info = TensorInfo(_shape(args[2], "size"), _dtype_of_ref(args[1]), None, _offset(args[4]))
    return TensorRef(info, False, None)


def _rb_meta(u: InertUnpickler, args: tuple[object, ...]) -> object:
    # (dtype, size, stride, requires_grad)
    if len(args) < 2:
        raise MalformedModelError("malformed pickle: _rebuild_meta_tensor_no_storage needs 2 arguments")
    return TensorRef(TensorInfo(_shape(args[1], "size"), _dtype_of_ref(args[0])), False, None)


def _rb_from_type(u: InertUnpickler, args: tuple[object, ...]) -> object:
    # (func, new_type, args, state): emulate only when func is itself a known rebuilder.
    if len(args) >= 3 and isinstance(args[0], GlobalRef) and isinstance(args[2], tuple):
        handler = _REBUILDERS.get(args[0].dotted)
        if handler is not None and handler is not _rb_from_type:
            inner = tensor_of(handler(u, args[2]))
            if inner is not None:
                is_param = isinstance(args[1], GlobalRef) and args[1].dotted in (
                    "torch.nn.parameter.Parameter",
                    "torch.nn.parameter.UninitializedParameter",
                )
                return TensorRef(inner.info, inner.is_parameter or is_param, inner.storage)
    # The helper calls func(*args): whatever func is, it runs under torch.load.
    if args:
        u.note_indirect_call(args[0])
    return Call(GlobalRef("torch._tensor", "_rebuild_from_type_v2"), args)


_Rebuilder = Callable[[InertUnpickler, tuple[object, ...]], object]

_REBUILDERS: dict[str, _Rebuilder] = {
    "torch._utils._rebuild_tensor_v2": _rb_tensor_v2,
    "torch._utils._rebuild_tensor": _rb_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rb_tensor_v3,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rb_device_tensor,
    "torch._utils._rebuild_device_tensor_from_numpy": _rb_device_tensor,
    "torch._utils._rebuild_qtensor": _rb_qtensor,
    "torch._utils._rebuild_parameter": _rb_parameter,
    "torch._utils._rebuild_parameter_with_state": _rb_parameter,
    "torch._utils._rebuild_wrapper_subclass": _rb_wrapper_subclass,
    "torch._utils._rebuild_meta_tensor_no_storage": _rb_meta,
    "torch._tensor._rebuild_from_type_v2": _rb_from_type,
    "torch._tensor._rebuild_from_type": _rb_from_type,
}


def _numpy_tensor(state: object) -> TensorRef | None:
    """numpy ``ndarray.__setstate__`` state: (version, shape, dtype, is_fortran, rawdata)."""
    if not isinstance(state, tuple) or len(state) != 5:
        return None
    shape_obj, dtype_obj = state[1], state[2]
    try:
        shape = _shape(shape_obj, "shape")
    except MalformedModelError:
        return None
    dtype = "unknown"
    if isinstance(dtype_obj, Call) and dtype_obj.args and isinstance(dtype_obj.args[0], str):
        dtype = _NUMPY_DTYPES.get(dtype_obj.args[0], "unknown")
    return TensorRef(TensorInfo(shape, dtype), False, None)


# --------------------------------------------------------------------------------------------
# Text-argument parsing (protocol 0)


def _utf8(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def _latin(raw: bytes) -> str:
    # Python 2 ``str``; checkpoints keep ASCII names, latin-1 never fails.
    return raw.decode("latin-1")


def _raw_unicode(raw: bytes) -> str:
    try:
        return raw.decode("raw-unicode-escape")
    except UnicodeDecodeError as e:
        raise MalformedModelError("malformed pickle: bad UNICODE argument") from e


def _int_too_large(size: str) -> Exception:
    return UnsupportedFormatError(
        f"unsupported: the pickle holds an integer of {size}, over the "
        f"{limits.MAX_PICKLE_INT_BYTES * 8:,}-bit limit (no model value is that large)"
    )


def _parse_int(raw: bytes) -> int:
    if raw == b"00":
        return 0
    if raw == b"01":
        return 1
    if len(raw) > _MAX_INT_TEXT:
        raise _int_too_large(f"{len(raw):,} digits")
    try:
        return int(raw)
    except ValueError as e:
        raise MalformedModelError("malformed pickle: bad integer argument") from e


def _parse_float(raw: bytes) -> float:
    try:
        return float(raw)
    except ValueError as e:
        raise MalformedModelError("malformed pickle: bad float argument") from e


def _parse_string(raw: bytes) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[:1] in (b"'", b'"'):
        raw = raw[1:-1]
    else:
        raise MalformedModelError("malformed pickle: STRING argument is not quoted")
    try:
        decoded = codecs.escape_decode(raw)[0]
    except ValueError as e:
        raise MalformedModelError("malformed pickle: bad STRING escape") from e
    return _latin(bytes(decoded))


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
