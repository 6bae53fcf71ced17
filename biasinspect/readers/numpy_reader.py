"""NumPy parameter lists: ``.npz`` archives, ``.npy`` arrays and pickled lists of arrays.

This is where untied biases historically lived: Lasagne's ``untie_biases=True`` nets, saved
with ``np.savez(f, *lasagne.layers.get_all_param_values(net))`` (members ``arr_0.npy``,
``arr_1.npy``, ... in parameter order), and Theano-era pickles of ``{'param_values': [...]}`` or
of a plain list of arrays.  Such files hold no names and no graph: only arrays in order.

Reading
    A ``.npy`` file is its header: magic ``\\x93NUMPY``, version, header length, and a Python dict
    literal ``{'descr': ..., 'fortran_order': ..., 'shape': ...}`` parsed with
    :func:`ast.literal_eval` (nothing is evaluated; numpy parses it the same way).  Array data is
    never read, only its size checked against the file; ``numpy.load`` is never called.  A
    ``.npz`` is a zip of ``.npy`` members read through
    :class:`~biasinspect.readers.safe_zip.SafeZip`, only each member's first bytes (its header)
    decompressed.  Members named ``arr_<n>.npy`` are taken in ``n`` order (how ``np.savez(f,
    *arrays)`` numbers them and how Lasagne reads them back), others in archive order.  An
    object array (``dtype=object``) needs ``numpy.load(allow_pickle=True)``, which would
    unpickle its payload: that payload is not read, and the array is reported among the
    model's ``unsafe_callables``.

Pairing (from order and shape, or from names; every report says which in a warning)
    Each 3-, 4- or 5-D floating-point array ``W`` is read as a conv weight ``[C_out, C_in/groups,
    *kernel]``, and the array right after it as its bias when that array is floating point and
    its dim 0 is ``C_out``: ``[C_out]`` is tied, ``[C_out, *spatial]`` (one axis per kernel axis)
    is untied and gives the conv's output size.  When exactly four ``[C_out]`` vectors follow
    ``W``, they are read as a Lasagne ``BatchNormLayer`` (beta, gamma, mean, inv_std) after a
    bias-free conv.  Lists with names (an ``.npz`` saved with keywords, e.g. Chainer's
    ``save_npz`` or a state dict) pair by name instead when the weight's name is scoped and ends
    in ``W``/``weight``: ``conv1/W`` takes ``conv1/b`` (``conv1.weight`` takes ``conv1.bias``)
    wherever it is in the list, or no bias; a scoped bias of another shape is a term of kind
    other.  A transposed conv mostly cannot be told from a conv here: Lasagne stores its
    weight as ``[C_in, C_out, *kernel]``, which looks like a conv's.  Only when the bias found
    for the weight has dim 0 equal to the weight's dim 1 and not its dim 0 is the layer read as a
    transposed conv (groups 1), with a note; a warning says the rest are read as convs.

model_params
    The number of elements of all floating-point arrays (Lasagne's ``get_all_param_values``
    includes a batch norm's mean and inv_std, so they count).
"""

from __future__ import annotations

import ast
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from biasinspect.errors import MalformedModelError, ResourceLimitError, UnsupportedFormatError
from biasinspect.model import BiasSource, BiasTerm, ConvNode, ModelDescription
from biasinspect.readers.safe_zip import SafeZip
from biasinspect.readers.tensors import FLOATING_DTYPES, TensorInfo
from biasinspect.source import ByteSource, Location, opened

__all__ = [
    "NPY_MAGIC",
    "NpyHeader",
    "describe_parameter_list",
    "parameter_list_of",
    "parse_npy_header",
    "read_numpy",
]

NPY_MAGIC = b"\x93NUMPY"

MAX_NPY_HEADER_BYTES = 65_536
"""Largest ``.npy`` header read (numpy itself refuses past 10,000 bytes unless told otherwise)."""

_PREAMBLE = {1: struct.Struct("<H"), 2: struct.Struct("<I"), 3: struct.Struct("<I")}
_DESCR = re.compile(r"^([<>|=]?)([a-zA-Z])(\d*)$")
_FLOAT_NAMES = {
    "f": {2: "float16", 4: "float32", 8: "float64", 16: "float128"},
    "c": {8: "complex64", 16: "complex128", 32: "complex256"},
}
_INT_NAMES = {"i": "int", "u": "uint"}
_OBJECT = "object"
_ARR_NAME = re.compile(r"^arr_(\d+)\.npy$")
_BIAS_LEAVES = ("b", "bias", "biases")
"""Leaf names of a bias next to a scoped weight name (Chainer ``/b``, PyTorch ``.bias``)."""
_WEIGHT_LEAVES = ("W", "w", "weight", "weights")
_BATCH_NORM_VECTORS = 4
"""Lasagne's BatchNormLayer keeps beta, gamma, mean and inv_std: four [C] vectors."""
_MAX_BATCH_NORM_RUN = _BATCH_NORM_VECTORS + 1

PAIRING_WARNING = (
    "layers are paired from the order and shapes of an unnamed parameter list: each 3-5-D floating "
    "array is read as a conv weight [C_out, C_in/groups, *kernel] and the array right after it, when "
    "its dim 0 is C_out, as its bias ([C_out] tied, [C_out, *spatial] untied)"
)
NAMED_PAIRING_WARNING = (
    "conv weights with a scoped name (conv1/W, conv1.weight) are paired with the bias of the same "
    "scope (conv1/b, conv1.bias), wherever it is in the list; a weight without one has no bias"
)
TRANSPOSED_WARNING = (
    "a transposed conv cannot be told from a conv in a parameter list unless the bias found for its "
    "weight has the weight's dim 1, not dim 0, as its length: any other weight is read as a conv's"
)


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header declares."""

    shape: tuple[int, ...]
    dtype: str
    """``float32``-style name; ``object`` for object arrays; the descr itself for other kinds."""
    itemsize: int | None
    """Bytes per element; None when unknown (object, structured and unsized dtypes): the data
    size is then not checked."""
    fortran_order: bool
    data_offset: int

    def nbytes(self) -> int | None:
        """Bytes of array data the header promises (None when unknown)."""
        if self.itemsize is None:
            return None
        return TensorInfo(self.shape, self.dtype).numel() * self.itemsize


# --------------------------------------------------------------------------------------------
# .npy headers


def preamble_length(head: bytes, what: str) -> int:
    """Bytes of magic, version and header length, plus the header length: the bytes a header
    reader needs, from the file's first 12 bytes."""
    if len(head) < 10 or not head.startswith(NPY_MAGIC):
        raise MalformedModelError(
            f"{_at(what)}truncated .npy header"
            if head.startswith(NPY_MAGIC[: len(head)])
            else f"{_at(what)}not a .npy array (bad magic)"
        )
    major, minor = head[6], head[7]
    layout = _PREAMBLE.get(major)
    if layout is None or minor != 0:
        raise UnsupportedFormatError(
            f"{_at(what)}.npy format version {major}.{minor} is not supported (1.0, 2.0, 3.0)"
        )
    if len(head) < 8 + layout.size:
        raise MalformedModelError(f"{_at(what)}truncated .npy header")
    (length,) = layout.unpack_from(head, 8)
    if length > MAX_NPY_HEADER_BYTES:
        raise ResourceLimitError(
            f"{_at(what)}.npy header is {length:,} bytes, over the {MAX_NPY_HEADER_BYTES:,}-byte limit"
        )
    return 8 + layout.size + int(length)


def parse_npy_header(data: bytes, what: str) -> NpyHeader:
    """Parse a ``.npy`` header from the first bytes of an array file (at least
    :func:`preamble_length` of them).  ``what`` names the npz member in messages ("" for a file)."""
    end = preamble_length(data[:12], what)
    if len(data) < end:
        raise MalformedModelError(f"{_at(what)}truncated .npy header")
    start = 8 + _PREAMBLE[data[6]].size
    raw = data[start:end]
    try:
        text = raw.decode("utf-8" if data[6] == 3 else "latin-1")
    except UnicodeDecodeError as e:
        raise MalformedModelError(f"{_at(what)}.npy header is not valid UTF-8") from e
    try:
        fields = ast.literal_eval(text.strip())
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as e:
        raise MalformedModelError(f"{_at(what)}.npy header is not a Python literal") from e
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise MalformedModelError(
            f"{_at(what)}.npy header is not a dict of exactly 'descr', 'fortran_order' and 'shape'"
        )
    fortran = fields["fortran_order"]
    if not isinstance(fortran, bool):
        raise MalformedModelError(f"{_at(what)}.npy header's fortran_order is not True or False")
    shape = _checked_shape(fields["shape"], what)
    dtype, itemsize = _dtype_of_descr(fields["descr"], what)
    return NpyHeader(shape, dtype, itemsize, fortran, end)


def _checked_shape(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple):
        raise MalformedModelError(f"{_at(what)}.npy header's shape is not a tuple")
    count = 1
    for dim in value:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise MalformedModelError(
                f"{_at(what)}.npy shape {_short(value)} holds a value that is not a size"
            )
        count *= dim
        if count >= 1 << 63:
            raise MalformedModelError(f"{_at(what)}.npy shape {_short(value)} has more than 2**63 elements")
    return value


def _at(what: str) -> str:
    """Message prefix naming the npz member (nothing for a lone .npy: the path says it)."""
    return f"{what}: " if what else ""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dtype_of_descr(descr: object, what: str) -> tuple[str, int | None]:
    if isinstance(descr, list):
        return "structured", None  # a record dtype: not a parameter, size left unchecked
    if not isinstance(descr, str):
        raise MalformedModelError(f"{_at(what)}.npy header's descr is not a dtype string")
    match = _DESCR.match(descr)
    if match is None:
        return descr[:40], None  # datetime units and the like: never a parameter
    kind, digits = match.group(2), match.group(3)
    size = int(digits) if digits else None
    if kind == "O":
        return _OBJECT, None
    if kind in _FLOAT_NAMES:
        name = _FLOAT_NAMES[kind].get(size or 0)
        return (name, size) if name is not None else (descr, size)
    if kind in _INT_NAMES and size in (1, 2, 4, 8):
        return f"{_INT_NAMES[kind]}{size * 8}", size
    if kind == "b" and size == 1:
        return "bool", 1
    if kind in ("U",) and size is not None:
        return descr, size * 4
    if kind in ("S", "V", "a") and size is not None:
        return descr, size
    return descr, None


# --------------------------------------------------------------------------------------------
# Files


def read_numpy(location: Location) -> list[ModelDescription]:
    """Read a ``.npy`` array or a ``.npz`` archive of them (decided by the content), from a
    :class:`~biasinspect.source.ByteSource` or a local path."""
    with opened(location) as source:
        head = source.read_at(0, len(NPY_MAGIC))
        if head.startswith(NPY_MAGIC):
            return [_read_npy(source)]
        if head.startswith(b"PK"):
            return _read_npz(source)
    raise UnsupportedFormatError("not a NumPy .npy or .npz file")


def _read_npy(source: ByteSource) -> ModelDescription:
    first = source.read_at(0, 12)
    need = preamble_length(first, "")
    data = source.read_at(0, max(need, len(first)))
    header = parse_npy_header(data, "")
    _check_data_size(header, source.size, "the file")
    path = source.name
    warnings: list[str] = []
    unsafe: list[str] = []
    _note_object(header, "array", warnings, unsafe)
    arrays = [("array", TensorInfo(header.shape, header.dtype))]
    return describe_parameter_list(
        arrays, path=str(path), format="numpy", warnings=warnings, unsafe_callables=unsafe
    )


def _read_npz(source: ByteSource) -> list[ModelDescription]:
    path = source.name
    with SafeZip(source) as archive:
        names = archive.names()
        members = [name for name in names if name.endswith(".npy")]
        others = [name for name in names if not name.endswith(".npy")]
        if others:
            # A torch.save archive (which torch.load would unpickle) is a torch file whatever
            # its first member is called.
            from biasinspect.readers.torch_reader import classify_zip, read_torch_zip

            try:
                classify_zip(names)
            except UnsupportedFormatError:
                pass
            else:
                return read_torch_zip(source)
        if not members:
            raise UnsupportedFormatError("zip archive holds no .npy arrays (not a NumPy .npz)")
        if all(_ARR_NAME.match(name) for name in members):
            members.sort(key=lambda name: int(name[len("arr_") : -len(".npy")]))
        warnings: list[str] = []
        unsafe: list[str] = []
        if others:
            warnings.append(f"{len(others):,} zip member(s) that are not .npy arrays were ignored")
        arrays: list[tuple[str, TensorInfo]] = []
        for member in members:
            what = f"npz member {member!r}"
            first = archive.read_prefix(member, 12)
            header = parse_npy_header(archive.read_prefix(member, preamble_length(first, what)), what)
            _check_data_size(header, archive.size(member), what)
            key = member[: -len(".npy")]
            _note_object(header, key, warnings, unsafe)
            arrays.append((key, TensorInfo(header.shape, header.dtype)))
    return [
        describe_parameter_list(
            arrays, path=str(path), format="numpy", warnings=warnings, unsafe_callables=unsafe
        )
    ]


def _check_data_size(header: NpyHeader, available: int, where: str) -> None:
    nbytes = header.nbytes()
    if nbytes is not None and header.data_offset + nbytes > available:
        raise MalformedModelError(
            f"truncated array: {where} holds {max(0, available - header.data_offset):,} bytes of data "
            f"but the .npy header declares {nbytes:,}"
        )


def _note_object(header: NpyHeader, name: str, warnings: list[str], unsafe: list[str]) -> None:
    if header.dtype == _OBJECT:
        unsafe.append(f"<pickled object array not inspected: {name}>")
        warnings.append(
            f"{name} is an object array: numpy.load(allow_pickle=True) would unpickle its payload "
            "(which can run code); the payload was not read"
        )


# --------------------------------------------------------------------------------------------
# Pickles


def parameter_list_of(root: object) -> tuple[list[tuple[str, TensorInfo]], str | None] | None:
    """The arrays of an unpickled Theano-era parameter list, ``(arrays, location)``: a plain
    list (or tuple) of arrays, or a dict ``{'param_values': [arrays...]}``; None otherwise."""
    from biasinspect.readers.pickle_inert import tensor_of

    location: str | None = None
    items = root
    if isinstance(root, dict) and "param_values" in root:
        items, location = root["param_values"], "param_values"
    if not isinstance(items, (list, tuple)) or not items:
        return None
    arrays: list[tuple[str, TensorInfo]] = []
    for index, item in enumerate(items):
        tensor = tensor_of(item)
        if tensor is None:
            return None
        arrays.append((f"{location or ''}[{index}]", tensor.info))
    return arrays, location


# --------------------------------------------------------------------------------------------
# Pairing


def _is_floating(info: TensorInfo) -> bool:
    return info.dtype in FLOATING_DTYPES or info.dtype in ("float128", "complex256")


def describe_parameter_list(
    arrays: Sequence[tuple[str, TensorInfo]],
    *,
    path: str,
    format: str,
    location: str | None = None,
    warnings: Sequence[str] = (),
    unsafe_callables: Sequence[str] = (),
) -> ModelDescription:
    """Describe the convolutions of an ordered list of arrays (module docstring)."""
    convs: list[ConvNode] = []
    taken: set[int] = set()
    positions = {name: index for index, (name, _info) in enumerate(arrays)}
    by_order = by_name = False
    for index, (name, info) in enumerate(arrays):
        rank = len(info.shape)
        if index in taken or not 3 <= rank <= 5 or not _is_floating(info) or _is_bias_name(name):
            continue
        conv, named = _conv_at(arrays, index, taken, positions)
        convs.append(conv)
        by_name, by_order = by_name or named, by_order or not named
    own = list(warnings)
    if by_order:
        own.append(PAIRING_WARNING)
    if by_name:
        own.append(NAMED_PAIRING_WARNING)
    if convs:
        own.append(TRANSPOSED_WARNING)
    else:
        own.append("no conv-like array (3-D to 5-D, floating point) in the parameter list")
    return ModelDescription(
        path=path,
        format=format,
        convs=tuple(convs),
        model_params=sum(info.numel() for _, info in arrays if _is_floating(info)),
        warnings=tuple(own),
        location=location,
        unsafe_callables=tuple(unsafe_callables),
    )


def _scope_and_leaf(name: str) -> tuple[str, str] | None:
    """``("conv1/", "W")`` for ``conv1/W`` (``("conv1.", "W")`` for ``conv1.W``); None for a name
    without a scope."""
    cut = max(name.rfind("/"), name.rfind("."))
    return (name[: cut + 1], name[cut + 1 :]) if cut > 0 else None


def _is_bias_name(name: str) -> bool:
    scoped = _scope_and_leaf(name)
    return scoped is not None and scoped[1] in _BIAS_LEAVES


def _bias_index(
    arrays: Sequence[tuple[str, TensorInfo]], index: int, positions: dict[str, int]
) -> tuple[bool, int | None]:
    """``(by_name, index of the bias candidate or None)``: a scoped weight name (``conv1/W``,
    ``conv1.weight``) takes the bias of its own scope wherever it is, or none; any other name
    takes the next array, unless four [C_out] vectors follow (a batch norm, see the caller)."""
    scoped = _scope_and_leaf(arrays[index][0])
    if scoped is not None and scoped[1] in _WEIGHT_LEAVES:
        for leaf in _BIAS_LEAVES:
            found = positions.get(scoped[0] + leaf)
            if found is not None and found != index:
                return True, found
        return True, None
    return False, index + 1 if index + 1 < len(arrays) else None


def _conv_at(
    arrays: Sequence[tuple[str, TensorInfo]], index: int, taken: set[int], positions: dict[str, int]
) -> tuple[ConvNode, bool]:
    name, info = arrays[index]
    c_out, spatial_rank = info.shape[0], len(info.shape) - 2
    by_name, candidate = _bias_index(arrays, index, positions)
    vectors = 0
    if not by_name:
        for _, following in arrays[index + 1 : index + 1 + _MAX_BATCH_NORM_RUN]:
            if following.shape != (c_out,) or not _is_floating(following):
                break
            vectors += 1
    terms: tuple[BiasTerm, ...] = ()
    output_spatial: tuple[int, ...] | None = None
    followed_by: str | None = None
    notes: list[str] = []
    transposed, groups = False, None
    if vectors == _BATCH_NORM_VECTORS:
        followed_by = "BatchNorm"
        notes.append(
            "four [C_out] vectors follow a conv weight: read as a batch norm's beta, gamma, mean "
            "and inv_std after a bias-free conv (from order and shape)"
        )
        taken.update(range(index + 1, index + 1 + _BATCH_NORM_VECTORS))
    elif candidate is not None:
        bias_name, bias = arrays[candidate]
        bias_rank = len(bias.shape)
        fits = _is_floating(bias) and bias_rank in (1, spatial_rank + 1)
        if fits and bias.shape[0] != c_out and bias.shape[0] == info.shape[1]:
            # Lasagne's TransposedConv2DLayer keeps W as [C_in, C_out, *kernel] and b as [C_out].
            transposed, groups = True, 1
            notes.append(
                f"ConvTranspose inferred from the length of its bias ({bias.shape[0]} = weight dim 1, not dim 0)"
            )
        if fits and bias.shape[0] == (info.shape[1] if transposed else c_out):
            # An untied bias is an ``add`` term: a conv's own (``conv``) bias is always tied.
            source = BiasSource.CONV if bias_rank == 1 else BiasSource.ADD
            terms = (BiasTerm(bias_name, bias.shape, source),)
            if bias_rank > 1:
                output_spatial = bias.shape[1:]
            taken.add(candidate)
        elif by_name:
            # Named as this conv's bias but of no layout we know: reported, never dropped.
            terms = (BiasTerm(bias_name, bias.shape, BiasSource.ADD, aligned=False),)
            taken.add(candidate)
    return ConvNode(
        name=name,
        op=f"ConvTranspose{spatial_rank}d" if transposed else f"Conv{spatial_rank}d",
        weight_name=name,
        weight_shape=info.shape,
        transposed=transposed,
        groups=groups,
        kernel_shape=info.shape[2:],
        output_spatial=output_spatial,
        bias_terms=terms,
        followed_by=followed_by,
        notes=tuple(notes),
    ), by_name
