"""A tensor as readers see it: a name's shape and dtype, never its data."""

from __future__ import annotations

from dataclasses import dataclass

FLOATING_DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1",
        "float6_e2m3",
        "float6_e3m2",
        "complex64",
        "complex128",
        "complex32",
    }
)
"""dtypes whose tensors count as parameters."""

QUANTIZED_DTYPES = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})
"""Quantized dtypes (PyTorch quantized tensors); these count as parameters too."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor.  ``storage_key`` names its storage, when known,
    so that two names sharing one storage (tied weights, EMA aliases) can be recognised."""

    shape: tuple[int, ...]
    dtype: str
    storage_key: str | None = None
    storage_offset: int = 0

    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def is_parameter_dtype(self) -> bool:
        """True for floating-point and quantized dtypes: the ones model_params counts."""
        return self.dtype in FLOATING_DTYPES or self.dtype in QUANTIZED_DTYPES


def untied_width(shape: tuple[int, ...], spatial_rank: int) -> int | None:
    """C_out of a tensor shaped [C_out, *spatial] or [1, C_out, *spatial] (how an untied bias of
    a conv with ``spatial_rank`` spatial axes is stored); None for any other rank."""
    if len(shape) == spatial_rank + 1:
        return shape[0]
    if len(shape) == spatial_rank + 2 and shape[0] == 1:
        return shape[1]
    return None


def added_bias_layout(
    shape: tuple[int, ...], spatial_rank: int, widths: tuple[int, ...]
) -> tuple[int, tuple[int, ...]] | None:
    """(C_out, shape in the conv output's layout) of a tensor that a separate module or parameter
    adds to a conv's output: ``[C_out, *spatial]`` or ``[1, C_out, *spatial]`` as stored (untied,
    or tied when every spatial extent is 1), ``[C_out]`` as ``[C_out, 1, ...]`` (tied, the way
    such a module views it before adding).  None for any other shape, or a C_out not in
    ``widths`` (the conv's possible output widths)."""
    width = untied_width(shape, spatial_rank)
    if width is not None and width in widths:
        return width, shape
    if len(shape) == 1 and shape[0] in widths:
        return shape[0], (shape[0],) + (1,) * spatial_rank
    return None


def untied_spatial(shape: tuple[int | None, ...] | None, spatial_rank: int) -> tuple[int | None, ...] | None:
    """The output size an untied bias term ``[(1,) C_out, *spatial]`` fixes: its spatial extents,
    with extents of 1 (which broadcast over any size) unknown; None when it fixes nothing."""
    if shape is None or spatial_rank == 0 or len(shape) not in (spatial_rank + 1, spatial_rank + 2):
        return None
    if len(shape) == spatial_rank + 2 and shape[0] != 1:
        return None
    spatial = shape[-spatial_rank:]
    if not any(dim is not None and dim > 1 for dim in spatial):
        return None
    return tuple(dim if dim is not None and dim > 1 else None for dim in spatial)


def split_name(name: str) -> tuple[str, str]:
    """``"a.b.c"`` -> ``("a.b", "c")``; a name without a dot lives in the root module ``""``."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def join_name(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` alone at the root (dotted module and tensor names)."""
    return f"{prefix}.{name}" if prefix else name
