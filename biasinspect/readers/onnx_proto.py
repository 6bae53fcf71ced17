"""ONNX protobuf vocabulary shared by the ONNX reader's modules: dtype and attribute codes,
conv-like ops and where they keep their inputs, attribute and tensor accessors, subgraph iteration."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from biasinspect import limits
from biasinspect.errors import MalformedModelError, UnsupportedFormatError
from biasinspect.model import Dim, MaybeShape

_INT64_MAX = (1 << 63) - 1

# onnx.TensorProto.DataType values.
_FLOAT_TYPES = frozenset({1, 10, 11, 14, 15, 16, 17, 18, 19, 20, 23, 24, 27, 28})
_SMALL_INT_TYPES = frozenset({2, 3, 4, 5, 21, 22, 25, 26})  # (u)int8/16/4/2
_FLOAT = 1
_INT32 = 6
_INT64 = 7
_FLOAT16 = 10
_DOUBLE = 11
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# onnx.AttributeProto.AttributeType values.
_A_INT, _A_STRING, _A_GRAPH, _A_INTS, _A_GRAPHS = 2, 3, 5, 7, 10

_DEFAULT_DOMAINS = ("", "ai.onnx")
_MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class _ConvSpec:
    """Where a conv-like op keeps its inputs."""

    x: int
    weight: int
    bias: int | None
    transposed: bool = False
    channels_last: bool = False
    quantized: bool = False
    """Integer arithmetic: an int32 bias input is a quantized parameter (counted in model_params)."""


_CONV_SPECS: dict[tuple[str, str], _ConvSpec] = {
    ("", "Conv"): _ConvSpec(0, 1, 2),
    ("", "ConvTranspose"): _ConvSpec(0, 1, 2, transposed=True),
    ("", "QLinearConv"): _ConvSpec(0, 3, 8, quantized=True),
    ("", "ConvInteger"): _ConvSpec(0, 1, None, quantized=True),
    (_MS_DOMAIN, "FusedConv"): _ConvSpec(0, 1, 2),
    (_MS_DOMAIN, "NhwcConv"): _ConvSpec(0, 1, 2, channels_last=True),
    # onnxruntime's contrib QLinearConv: the ONNX op plus a ``channels_last`` attribute.
    (_MS_DOMAIN, "QLinearConv"): _ConvSpec(0, 3, 8, quantized=True),
}


def _dims_text(dims: Sequence[Dim]) -> str:
    """A dims list for a message, shortened past eight dims (a hostile one may hold thousands)."""
    shown = ", ".join("?" if d is None else str(d) for d in dims[:8])
    return f"[{shown}, ... ({len(dims)} dims)]" if len(dims) > 8 else f"[{shown}]"


def _check_dims(dims: Sequence[Dim], what: str) -> None:
    """Refuse a shape past the caps: more than :data:`~biasinspect.limits.MAX_ONNX_RANK` dims
    (unsupported), or known dims whose product overflows int64 (malformed).  No real tensor comes
    near either, and every later product of dims stays bounded because of it."""
    if len(dims) > limits.MAX_ONNX_RANK:
        raise UnsupportedFormatError(
            f"{what} has {len(dims):,} dims, more than the {limits.MAX_ONNX_RANK} supported"
        )
    count = 1
    for dim in dims:
        if dim is not None and dim > 0:
            count *= dim
            if count > _INT64_MAX:
                raise MalformedModelError(f"{what} has dims {_dims_text(dims)} whose product overflows int64")


def _kernel_shape(node: Any) -> tuple[int, ...] | None:
    """A conv node's ``kernel_shape`` attribute, checked like a tensor's dims."""
    kernel = _attr_ints(node, "kernel_shape")
    if kernel is not None:
        _check_dims(kernel, f"node '{node.name or node.op_type}': kernel_shape")
    return kernel


def _sane_shape(shape: MaybeShape) -> MaybeShape:
    """``shape``, or None when it is past the caps of :func:`_check_dims` (a size computed here from
    a file's values, which then counts as unknown rather than refusing the file)."""
    if shape is None or len(shape) > limits.MAX_ONNX_RANK:
        return None
    count = 1
    for dim in shape:
        if dim is not None and dim > 0:
            count *= dim
            if count > _INT64_MAX:
                return None
    return shape


def _dims_of_tensor(tensor: Any, what: str, name: str | None = None) -> tuple[int, ...]:
    """A (Sparse)TensorProto's dims, checked: negative dims or an int64-overflowing size are
    malformed, too many dims unsupported."""
    if name is None:
        name = str(tensor.name)
    dims = tuple(int(d) for d in tensor.dims)
    for dim in dims:
        if dim < 0:
            raise MalformedModelError(f"{what} '{name}' has a negative dimension {dim}")
    _check_dims(dims, f"{what} '{name}'")
    return dims


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _attr(node: Any, name: str) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute
    return None


def _attr_int(node: Any, name: str, default: int) -> int:
    attribute = _attr(node, name)
    if attribute is None or attribute.type != _A_INT:
        return default
    return int(attribute.i)


def _attr_ints(node: Any, name: str) -> tuple[int, ...] | None:
    attribute = _attr(node, name)
    if attribute is None or attribute.type != _A_INTS:
        return None
    if len(attribute.ints) > 2 * limits.MAX_ONNX_RANK:  # pads hold two values per axis
        raise UnsupportedFormatError(
            f"node '{node.name or node.op_type}': attribute '{name}' has {len(attribute.ints):,} values, "
            f"more than the {2 * limits.MAX_ONNX_RANK} supported"
        )
    return tuple(int(v) for v in attribute.ints)


def _attr_str(node: Any, name: str, default: str) -> str:
    attribute = _attr(node, name)
    if attribute is None or attribute.type != _A_STRING:
        return default
    return bytes(attribute.s).decode("utf-8", "replace")


def _is_default_domain(node: Any) -> bool:
    return str(node.domain) in _DEFAULT_DOMAINS


def _conv_spec(node: Any) -> _ConvSpec | None:
    domain = "" if _is_default_domain(node) else str(node.domain)
    return _CONV_SPECS.get((domain, str(node.op_type)))


def _type_shape(type_proto: Any, name: str = "") -> tuple[int, MaybeShape]:
    """(elem_type, shape) of a TypeProto; elem_type 0 and shape None when unknown.  A shape past
    the caps (see :func:`_check_dims`) is refused, naming value ``name``."""
    if type_proto.WhichOneof("value") != "tensor_type":
        return 0, None
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return int(tensor_type.elem_type), None
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.WhichOneof("value") == "dim_value" and dim.dim_value >= 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(None)
    _check_dims(dims, f"value '{name}'")
    return int(tensor_type.elem_type), tuple(dims)


# Kept small tensors (see protowire): dtype -> (typed payload field, struct code of raw_data).
_VALUE_LAYOUT = {
    _INT32: ("int32_data", "i"),
    _INT64: ("int64_data", "q"),
    _FLOAT: ("float_data", "f"),
    _DOUBLE: ("double_data", "d"),
    _FLOAT16: ("int32_data", "e"),
}


def _tensor_values(tensor: Any, integer: bool = False) -> list[float] | None:
    """The values of a small integer/floating tensor whose data the stripped copy kept (with
    ``integer``, of an INT32/INT64 one only)."""
    if integer and tensor.data_type not in (_INT32, _INT64):
        return None
    layout = _VALUE_LAYOUT.get(int(tensor.data_type))
    if layout is None or tensor.data_location == _EXTERNAL or any(d < 0 for d in tensor.dims):
        return None
    count = _numel([int(d) for d in tensor.dims])
    field_name, code = layout
    typed = getattr(tensor, field_name)
    if count and len(typed) == count:
        if tensor.data_type == _FLOAT16:  # float16 bit patterns stored as int32
            return list(struct.unpack(f"<{count}e", struct.pack(f"<{count}H", *(v & 0xFFFF for v in typed))))
        return list(typed)
    raw = bytes(tensor.raw_data)
    if raw and len(raw) == count * struct.calcsize(code):
        return list(struct.unpack(f"<{count}{code}", raw))
    return None


def _subgraphs_of_attribute(attribute: Any) -> Iterator[tuple[str, Any]]:
    """(label, GraphProto) for the graph(s) an attribute holds."""
    if attribute.type == _A_GRAPH or (attribute.type == 0 and attribute.HasField("g")):
        yield str(attribute.name), attribute.g
    elif attribute.type == _A_GRAPHS:
        for index, graph in enumerate(attribute.graphs):
            yield f"{attribute.name}[{index}]", graph


def _subgraphs(node: Any) -> Iterator[tuple[str, Any]]:
    """(label, GraphProto) for every graph attribute of a node."""
    for attribute in node.attribute:
        yield from _subgraphs_of_attribute(attribute)


def _nested_nodes(nodes: Iterable[Any]) -> Iterator[Any]:
    """Every node of a node list and of all the subgraphs inside it, at any depth (iteratively)."""
    pending = [iter(nodes)]
    while pending:
        node = next(pending[-1], None)
        if node is None:
            pending.pop()
            continue
        yield node
        for _, graph in _subgraphs(node):
            pending.append(iter(graph.node))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
