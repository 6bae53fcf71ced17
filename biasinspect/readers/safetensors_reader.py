"""Read a ``.safetensors`` file's header (never its data) and describe its convolutions.

Layout: an 8-byte little-endian u64 ``N``, then ``N`` bytes of UTF-8 JSON, then the tensor
data.  The header is validated as the safetensors library validates it (``read_metadata`` and
``Metadata::validate`` in ``safetensors/src/tensor.rs``), so that a file this module accepts is
one the library would load:

* ``N`` must fit in the file and be at most :data:`limits.MAX_SAFETENSORS_HEADER_BYTES`;
* the header must be UTF-8 JSON whose first non-whitespace character is ``{`` (the library
  accepts leading whitespace, so this module does too), an object without duplicate keys;
* ``__metadata__`` is absent, ``null`` or an object of strings;
* every other entry is ``{"dtype": <known>, "shape": [uint...], "data_offsets": [begin, end]}``
  (unknown extra keys are ignored, as serde does);
* sorted by offsets, the tensors tile the data exactly: each begins where the previous one
  ended, ``end >= begin``, no tensor runs past the file and the last one ends at its end;
* element count and bit count fit in a u64 and ``end - begin`` equals ``numel * bits / 8``
  (sub-byte dtypes must fill whole bytes).

dtypes map to the names used by :mod:`biasinspect.readers.tensors`.  Integer dtypes (``I8``,
``U8``...) are not parameters: an int8 tensor in a safetensors file is usually a packed,
quantized weight whose stored shape is not the layer's, so it is neither counted in
``model_params`` nor taken as a conv (the state-dict rules warn about it), exactly as a plain
integer tensor in a PyTorch state dict is treated.
"""

from __future__ import annotations

import struct
from typing import Any

from biasinspect import limits
from biasinspect.errors import MalformedModelError, ResourceLimitError
from biasinspect.model import ModelDescription
from biasinspect.readers.files import parse_json_object, quote
from biasinspect.readers.state_dict import describe_state_dict
from biasinspect.readers.tensors import TensorInfo
from biasinspect.source import ByteSource, Location, opened

FORMAT = "safetensors"

DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 8),
    "F4": ("float4_e2m1", 4),
    "F6_E2M3": ("float6_e2m3", 6),
    "F6_E3M2": ("float6_e3m2", 6),
    "U8": ("uint8", 8),
    "I8": ("int8", 8),
    "F8_E5M2": ("float8_e5m2", 8),
    "F8_E4M3": ("float8_e4m3fn", 8),
    "F8_E8M0": ("float8_e8m0fnu", 8),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "I16": ("int16", 16),
    "U16": ("uint16", 16),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "I32": ("int32", 32),
    "U32": ("uint32", 32),
    "F32": ("float32", 32),
    "C64": ("complex64", 64),
    "F64": ("float64", 64),
    "I64": ("int64", 64),
    "U64": ("uint64", 64),
}
"""safetensors dtype -> (TensorInfo dtype name, bits per element), as in the Rust crate."""

_U64_LIMIT = 2**64


def _is_uint(value: object) -> bool:
    """A JSON unsigned integer that fits a u64 (``bool`` is not an integer here)."""
    return type(value) is int and 0 <= value < _U64_LIMIT


def _read_header(source: ByteSource) -> tuple[bytes, int]:
    """The raw header bytes and the number of data bytes after it (a remote source fetches the
    prefix with the first block, so a typical header costs one request and a large one two)."""
    file_size = source.size
    prefix = source.read_at(0, 8)
    if len(prefix) < 8:
        raise MalformedModelError(
            f"file too small for a safetensors header: {len(prefix)} bytes, need at least 8"
        )
    (length,) = struct.unpack("<Q", prefix)
    if length > file_size - 8:
        raise MalformedModelError(
            # The declared length is not quoted: these 8 bytes may not be a length at all (a
            # secret file named *.safetensors), and no message echoes a file's bytes.
            f"header length exceeds the {file_size - 8} bytes after the 8-byte prefix"
        )
    if length > limits.MAX_SAFETENSORS_HEADER_BYTES:
        raise ResourceLimitError(
            f"safetensors header length exceeds the {limits.MAX_SAFETENSORS_HEADER_BYTES}-byte limit"
        )
    header = source.read_at(8, length)
    if len(header) != length:
        raise MalformedModelError(f"header truncated: read {len(header)} of {length} bytes")
    return header, file_size - 8 - length


def _parse_json(header: bytes) -> dict[str, Any]:
    # serde_json rejects NaN/Infinity and lone surrogates as json.loads does not; the library
    # also requires the header to start with '{' (after whitespace).
    return parse_json_object(header, "header", strict_constants=True, require_brace=True)


def _entry(name: str, value: object) -> tuple[str, tuple[int, ...], int, int, int]:
    """Validate one tensor entry: (dtype name, shape, begin, end, bits per element)."""
    tensor = f"tensor {quote(name)}"
    if not isinstance(value, dict):
        raise MalformedModelError(f"{tensor}: header entry is not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in value:
            raise MalformedModelError(f"{tensor}: header entry has no {key!r}")
    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MalformedModelError(f"{tensor}: unknown dtype {quote(dtype)}")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(_is_uint(dim) for dim in shape):
        raise MalformedModelError(f"{tensor}: shape {quote(shape)} is not a list of unsigned integers")
    offsets = value["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise MalformedModelError(
            f"{tensor}: data_offsets {quote(offsets)} is not a pair of unsigned integers"
        )
    dtype_name, bits = DTYPES[dtype]
    return dtype_name, tuple(shape), offsets[0], offsets[1], bits


def _checked_numel(shape: tuple[int, ...], bits: int) -> int | None:
    """Element count of ``shape``, or ``None`` once it (or its bit count) reaches 2**64.

    Checked after every dim, as the library's ``try_fold(1, checked_mul)`` does: multiplying
    out a header of many huge dims before checking would cost time quadratic in the number
    of dims (and give the same verdict: once 2**64 is passed, the library has failed).  The
    running count stays below 2**64, so every step is cheap; a zero dim reached before any
    overflow makes the count 0 for good, as in the library.
    """
    numel = 1
    for dim in shape:
        numel *= dim
        if numel >= _U64_LIMIT:
            return None
    return None if numel * bits >= _U64_LIMIT else numel


def _validate_layout(entries: list[tuple[str, str, tuple[int, ...], int, int, int]], data_size: int) -> None:
    """Check that the tensors tile the data exactly, as ``Metadata::validate`` does."""
    ordered = sorted(entries, key=lambda entry: (entry[3], entry[4]))
    position = 0
    for name, _dtype, shape, begin, end, bits in ordered:
        tensor = f"tensor {quote(name)}"
        if begin != position or end < begin:
            if end < begin:
                problem = "end before begin"
            elif begin < position:
                problem = f"overlap the previous tensor, which ends at byte {position}"
            else:
                problem = f"leave a gap after byte {position}"
            raise MalformedModelError(f"{tensor}: data_offsets [{begin}, {end}] {problem}")
        if end > data_size:
            raise MalformedModelError(
                f"{tensor}: data_offsets [{begin}, {end}] run past the end of the {data_size} data bytes"
            )
        position = end
        numel = _checked_numel(shape, bits)
        if numel is None:
            raise MalformedModelError(f"{tensor}: shape {quote(list(shape))} overflows a 64-bit size")
        if (numel * bits) % 8:
            raise MalformedModelError(f"{tensor}: {numel} elements of {bits} bits do not fill whole bytes")
        if end - begin != numel * bits // 8:
            raise MalformedModelError(
                f"{tensor}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape"
                f" {quote(list(shape))} needs {numel * bits // 8}"
            )
    if position != data_size:
        raise MalformedModelError(
            f"tensor data ends at byte {position} but the file has {data_size} data bytes"
        )


def tensors_from_safetensors(location: Location) -> dict[str, TensorInfo]:
    """Shapes and dtypes of every tensor in a safetensors file (a source or a local path), in
    header order.

    Reads and validates only the header; raises a :class:`BiasInspectError` subclass for a
    file the safetensors library would reject.
    """
    with opened(location) as source:
        header, data_size = _read_header(source)
    parsed = _parse_json(header)
    metadata = parsed.get("__metadata__")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise MalformedModelError("__metadata__ is not an object of strings")
    entries: list[tuple[str, str, tuple[int, ...], int, int, int]] = []
    for name, value in parsed.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end, bits = _entry(name, value)
        entries.append((name, dtype, shape, begin, end, bits))
    _validate_layout(entries, data_size)
    return {name: TensorInfo(shape=shape, dtype=dtype) for name, dtype, shape, *_ in entries}


def read_safetensors(location: Location) -> list[ModelDescription]:
    """Describe the one weight set of a safetensors file (format ``"safetensors"``).

    The header's order is sorted (by dtype, then name), not the modules' registration order,
    so the state-dict rules run with ``registration_order=False``.
    """
    with opened(location) as source:
        tensors = tensors_from_safetensors(source)
        return [describe_state_dict(tensors, path=source.name, format=FORMAT, registration_order=False)]
