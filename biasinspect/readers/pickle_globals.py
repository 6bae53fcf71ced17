"""Which globals a pickle may name: the classification behind ``unsafe_callables``.

:func:`classify_global` sorts every dotted name an inert unpickling met into ``safe`` (torch's
rebuild helpers, containers, dtypes...), ``unsafe`` (the code-running families: os, subprocess,
builtins.exec, ...) or ``unknown``; the dtype tables map the names pickles use for dtypes and
storages to biasinspect's dtype names.  Pure data and string tests: nothing is imported.
"""

from __future__ import annotations

__all__ = [
    "NUMPY_DTYPES",
    "PY2_MODULES",
    "STORAGE_DTYPES",
    "TORCH_DTYPES",
    "TS_LIST_BUILDERS",
    "TS_PICKLE_HELPERS",
    "classify_global",
    "itemsize",
]

TS_LIST_BUILDERS = frozenset(
    {
        "torch.jit._pickle.build_intlist",
        "torch.jit._pickle.build_doublelist",
        "torch.jit._pickle.build_boollist",
        "torch.jit._pickle.build_tensorlist",
        "torch.jit._pickle.build_complexlist",
    }
)
"""TorchScript pickles wrap typed lists in these; the list itself is what they rebuild."""

TS_PICKLE_HELPERS = TS_LIST_BUILDERS | {
    "torch.jit._pickle.build_tensor_from_id",
    "torch.jit._pickle.restore_type_tag",
}
"""The only torch.jit names a TorchScript data.pkl needs (exact names, never a prefix)."""


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
        # ndarray.__reduce_ex__(5): frombuffer(buf, dtype).reshape(shape, order), nothing else.
        "numpy.core.numeric._frombuffer",
        "numpy._core.numeric._frombuffer",
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

TORCH_DTYPES: dict[str, str] = {
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

STORAGE_DTYPES: dict[str, str] = {
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

NUMPY_DTYPES: dict[str, str] = {
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

PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "exceptions": "builtins"}
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
    module = PY2_MODULES.get(module, module)
    full = f"{module}.{name}"
    if full in _UNSAFE_EXACT:
        return "unsafe"
    if full in TS_PICKLE_HELPERS and (attribute is None or "." not in attribute):
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
    if module == "torch" and (name in TORCH_DTYPES or name in STORAGE_DTYPES or name in _TORCH_ENUMS):
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
