"""Read an ONNX model's convolutions and their bias terms from the graph structure alone.

The file is never given to ``onnx.load``: :mod:`biasinspect.readers.protowire` walks it over an
``mmap`` (or, for a URL, over blocks fetched on demand) and produces a copy without tensor payloads, which is parsed and run through ONNX
shape inference (with data propagation).  External data files are never opened.

Convolutions
    ``Conv``, ``ConvTranspose``, ``QLinearConv`` and ``ConvInteger`` (default domain) and
    ``com.microsoft`` ``FusedConv`` / ``NhwcConv`` / ``QLinearConv``, found in the main graph, in ``If``/``Loop``/
    ``Scan`` bodies at any depth and in model-local functions (analysed once per call site, with
    the call's input shapes bound to the formal inputs; a function that is never called is
    analysed once with unknown inputs).  A layer is named by its node name, or ``<op>_<index>``
    when unnamed, except that nodes written by PyTorch's torch.export-based exporter are named
    by their module path from the node metadata (see :func:`_torch_module_path`); layers inside
    subgraphs are prefixed ``owner/attribute/`` and layers inside a function ``call_node/``.  ``NhwcConv`` weights are stored [M, k..., C/group] (ONNX Runtime's
    transformer transposes them so); they are reported in the [M, C/group, k...] layout.

Bias terms
    The conv's own bias input (input 2; input 8 for QLinearConv), source ``conv``; and the other
    operand of an ``Add`` that is the only consumer of the conv output, when that operand is a
    *parameter* (an initializer, a ``Constant``, a model-local function input bound to one, or
    anything computed only from those -- e.g. Reshape/Unsqueeze/Cast/DequantizeLinear/
    DynamicQuantizeLinear of an initializer) or takes its data from one through element-wise
    ops, with only scale-like operands computed at run time (onnxruntime's old dynamic
    quantization: the rule is in :mod:`biasinspect.readers.onnx_lineage`), source ``add``.  On the way to the ``Add``,
    single-consumer ``Cast``/``Identity``/``QuantizeLinear``/``DequantizeLinear`` nodes are
    followed (a QDQ-quantized graph puts a Q/DQ pair between the conv and its Add), so are
    ``Squeeze``/``Unsqueeze``/``Transpose`` (undone on the operand's shape, so that the term is
    in the conv output's layout: tf2onnx's Keras Conv1D, NHWC graphs), and for
    ``ConvInteger`` (whose int32 output is rescaled first) also one ``Mul``/``Div`` by an operand
    that does not grow the tensor and is a scalar or computed at run time (the rescale; a stored
    per-channel scale is a folded norm's, handled by the ``Mul+Add`` rule below).  A graph input
    operand (e.g. a residual connection) is not a parameter.  onnxruntime's QOperator
    ``com.microsoft`` ``QLinearAdd`` counts as an ``Add`` (its A or B operand).  An NhwcConv's
    Add operand is reported in channels-first order.  A conv with no bias term whose output feeds only a ``BatchNormalization`` gets ``followed_by=
    "BatchNormalization"``; one feeding only a ``Mul`` by a parameter whose output feeds only an
    ``Add`` of a parameter gets ``followed_by="Mul+Add"``.

model_params
    The number of elements of every floating-point or quantized *parameter* tensor in the model:
    initializers (sparse ones by their dense shape) and ``Constant``-node tensors (``value``,
    ``sparse_value``, ``value_float``, ``value_floats``) of the main graph, of every subgraph and
    of every model-local function body, each counted once per graph by name.  Floating-point
    dtypes (float16/32/64, bfloat16, float8/6/4 variants, complex) always count; 8-, 4-, 2- and
    16-bit integer dtypes (quantized weights and their zero points) always count; INT32 counts
    only when the tensor is a quantized bias (QLinearConv input 8, or DequantizeLinear input 0);
    INT64, UINT32, UINT64, BOOL and STRING tensors (shapes, indices, masks) never count.
    Training-info graphs are not counted.

Shapes
    ONNX shape inference (with data propagation) on the payload-free copy gives most shapes.
    Integer and floating tensors of at most 64 elements keep their values in that copy (shape
    vectors such as Reshape targets, and Resize/Upsample scales), so output sizes can be
    computed through them; larger tensors are shapes only.  Where inference leaves a size
    unknown, a few ops (shape-preserving and broadcasting ops, Reshape, Unsqueeze, Transpose,
    ConstantOfShape, Resize/Upsample and the conv arithmetic itself) are computed here.  When every
    model input has a fixed shape yet a conv's output size stays unknown, the conv gets a note.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from biasinspect.errors import (
    MalformedModelError,
    ResourceLimitError,
    UnsupportedFormatError,
)
from biasinspect.model import BiasSource, BiasTerm, ConvNode, Dim, MaybeShape, ModelDescription
from biasinspect.readers.onnx_lineage import derived_from_parameter
from biasinspect.readers.protowire import decode_varint, strip_model_proto
from biasinspect.source import Buffer, ByteSource, LocalSource, Location, opened

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

# Top-level ModelProto fields and their wire types: the first field of a real ONNX file is one
# of these, which tells an ONNX file from arbitrary bytes.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}

# Ops whose output has the shape of their first input (used when shape inference gave nothing).
_SHAPE_PRESERVING = frozenset(
    {
        "Identity",
        "Cast",
        "CastLike",
        "Floor",
        "Round",
        "Ceil",
        "Neg",
        "Abs",
        "Relu",
        "Sqrt",
        "Reciprocal",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "Clip",
    }
)
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})
_MS_QLINEAR_BINARY = frozenset({"QLinearAdd", "QLinearMul"})
"""com.microsoft (A, A_scale, A_zp, B, ...) ops whose output is A and B broadcast."""
_MS_QLINEAR_UNARY = frozenset(
    {"QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QuantizeLinear", "DequantizeLinear"}
)
"""com.microsoft ops whose output has the shape of their input 0."""
_MAX_EXPR_DEPTH = 64
"""How far back through producing nodes shape fallbacks and parameter checks look."""
_MAX_COMBINED_VALUES = 64
"""Most values a Concat of constants may hold to be followed (shape vectors and scales are short)."""
_MAX_FOLLOW = 16
"""How many pass-through nodes are followed from a conv output towards its bias Add."""
_MAX_FUNCTION_DEPTH = 32
"""Deepest chain of nested model-local function calls analysed."""

MAX_ONNX_FUNCTION_INSTANCES = 10_000
"""Cap on model-local function call sites after expanding nested calls (a function calling another
twice, 30 levels deep, would otherwise mean 2**30 analyses -- and as many in ONNX shape inference)."""

MAX_ONNX_WALK_NODES = 5_000_000
"""Cap on nodes visited while walking the main graph, subgraphs and function instances."""

MAX_ONNX_FUNCTION_INFERENCE_NODES = 1_000_000
"""Cap on the function-body nodes given to shape inference over all call sites (each distinct
call site infers its function with the functions it calls).  Past it, the remaining call sites
are walked without inference (shapes there may be unknown) and a warning says so."""


def _dims_of_tensor(tensor: Any, what: str, name: str | None = None) -> tuple[int, ...]:
    """A (Sparse)TensorProto's dims, checked: negative dims or an int64-overflowing size are malformed."""
    if name is None:
        name = str(tensor.name)
    dims = tuple(int(d) for d in tensor.dims)
    count = 1
    for dim in dims:
        if dim < 0:
            raise MalformedModelError(f"{what} '{name}' has a negative dimension {dim}")
        count *= dim
        if count > _INT64_MAX:
            raise MalformedModelError(f"{what} '{name}' has dims {list(dims)} whose product overflows int64")
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


def _type_shape(type_proto: Any) -> tuple[int, MaybeShape]:
    """(elem_type, shape) of a TypeProto; elem_type 0 and shape None when unknown."""
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


def _broadcast(shapes: Sequence[MaybeShape]) -> MaybeShape:
    """Numpy broadcasting of shapes with unknown dims; None if any rank is unknown."""
    if any(shape is None for shape in shapes):
        return None
    known = [shape for shape in shapes if shape is not None]
    rank = max((len(shape) for shape in known), default=0)
    result: list[Dim] = []
    for axis in range(rank):
        dims = [shape[axis - rank + len(shape)] for shape in known if axis - rank + len(shape) >= 0]
        concrete = {dim for dim in dims if dim is not None and dim != 1}
        if len(concrete) > 1:
            return None
        if concrete:
            result.append(concrete.pop())
        elif any(dim is None for dim in dims):
            result.append(None)
        else:
            result.append(1)
    return tuple(result)


def _conv_output_spatial(
    node: Any, transposed: bool, in_spatial: MaybeShape, kernel: MaybeShape
) -> MaybeShape:
    """Output spatial size from the input size and the node's attributes (None where unknown)."""
    if transposed:
        output_shape = _attr_ints(node, "output_shape")
        if output_shape:
            rank = (
                len(kernel) if kernel is not None else (len(in_spatial) if in_spatial is not None else None)
            )
            if rank is not None and len(output_shape) >= rank:
                return tuple(output_shape[len(output_shape) - rank :])
    if in_spatial is None:
        return None
    rank = len(in_spatial)
    if kernel is None or len(kernel) != rank:
        return tuple(None for _ in range(rank))
    strides = _attr_ints(node, "strides") or (1,) * rank
    dilations = _attr_ints(node, "dilations") or (1,) * rank
    pads = _attr_ints(node, "pads") or (0,) * (2 * rank)
    auto_pad = _attr_str(node, "auto_pad", "NOTSET")
    out_pad = _attr_ints(node, "output_padding") or (0,) * rank
    if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank or len(out_pad) != rank:
        return tuple(None for _ in range(rank))
    result: list[Dim] = []
    for axis in range(rank):
        size, k = in_spatial[axis], kernel[axis]
        stride, dilation = strides[axis], dilations[axis]
        if size is None or k is None or stride <= 0 or dilation <= 0:
            result.append(None)
            continue
        extent = dilation * (k - 1) + 1
        if transposed:
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out = size * stride
            else:
                total_pad = 0 if auto_pad == "VALID" else pads[axis] + pads[axis + rank]
                out = stride * (size - 1) + out_pad[axis] + extent - total_pad
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-size // stride)
        elif auto_pad == "VALID":
            out = (size - extent) // stride + 1
        else:
            out = (size + pads[axis] + pads[axis + rank] - extent) // stride + 1
        result.append(out if out >= 0 else None)
    return tuple(result)


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


def _free_names(graph: Any, depth: int = 0) -> set[str]:
    """Names a subgraph uses from enclosing scopes."""
    if depth > _MAX_EXPR_DEPTH:
        return set()
    defined = {str(t.name) for t in graph.initializer}
    defined.update(str(t.values.name) for t in graph.sparse_initializer)
    defined.update(str(v.name) for v in graph.input)
    used: set[str] = set()
    for node in graph.node:
        used.update(str(name) for name in node.input if name)
        for _, sub in _subgraphs(node):
            used.update(_free_names(sub, depth + 1))
        defined.update(str(name) for name in node.output)
    used.update(str(v.name) for v in graph.output)
    return used - defined


class _Scope:
    """One graph (main graph, subgraph or function body at one call site) and its lookups."""

    @classmethod
    def for_graph(cls, graph: Any, *, parent: _Scope | None = None, prefix: str = "") -> _Scope:
        """The scope of a GraphProto (the main graph or a subgraph)."""
        return cls(
            graph.node,
            initializers=graph.initializer,
            sparse_initializers=graph.sparse_initializer,
            inputs=[str(v.name) for v in graph.input],
            outputs=[str(v.name) for v in graph.output],
            value_infos=[*graph.input, *graph.value_info, *graph.output],
            parent=parent,
            prefix=prefix,
        )

    def __init__(
        self,
        nodes: Sequence[Any],
        *,
        initializers: Iterable[Any] = (),
        sparse_initializers: Iterable[Any] = (),
        inputs: Iterable[str] = (),
        outputs: Iterable[str] = (),
        value_infos: Iterable[Any] = (),
        parent: _Scope | None = None,
        prefix: str = "",
        bindings: dict[str, tuple[_Scope, str]] | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self.parent = parent
        self.prefix = prefix
        self.bindings = bindings or {}
        self.initializers: dict[str, Any] = {str(t.name): t for t in initializers}
        self.sparse: dict[str, Any] = {}
        for sparse in sparse_initializers:
            self.sparse[str(sparse.values.name)] = sparse
        self.inputs = {name for name in inputs if name}
        self.outputs = {name for name in outputs if name}
        self.types: dict[str, tuple[int, MaybeShape]] = {}
        for info in value_infos:
            self.types[str(info.name)] = _type_shape(info.type)
        self.producer: dict[str, tuple[int, int]] = {}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for slot, name in enumerate(node.output):
                if name:
                    self.producer.setdefault(str(name), (index, slot))
            used = {str(name) for name in node.input if name}
            for _, sub in _subgraphs(node):
                used |= _free_names(sub)
            for name in used:
                self.consumers.setdefault(name, []).append(index)
        self._param_memo: dict[str, bool] = {}
        self._shape_memo: dict[str, MaybeShape] = {}

    # -- name resolution -----------------------------------------------------------------------

    def defines(self, name: str) -> bool:
        return (
            name in self.initializers or name in self.sparse or name in self.producer or name in self.inputs
        )

    def owner(self, name: str) -> _Scope | None:
        """The innermost enclosing scope that defines ``name``."""
        scope: _Scope | None = self
        while scope is not None:
            if scope.defines(name):
                return scope
            scope = scope.parent
        return None

    def node_name(self, index: int) -> str:
        node = self.nodes[index]
        return str(node.name) or f"{node.op_type}_{index}"

    # -- facts about values --------------------------------------------------------------------

    def elem_type(self, name: str) -> int:
        scope = self.owner(name)
        if scope is None:
            return 0
        if name in scope.initializers:
            return int(scope.initializers[name].data_type)
        if name in scope.sparse:
            return int(scope.sparse[name].values.data_type)
        if name in scope.types and scope.types[name][0]:
            return scope.types[name][0]
        if name in scope.bindings:
            caller, actual = scope.bindings[name]
            return caller.elem_type(actual)
        return 0

    def shape(self, name: str, depth: int = 0) -> MaybeShape:
        """Best known shape of a value: stored dims, then inference, then a local fallback."""
        scope = self.owner(name)
        if scope is None or depth > _MAX_EXPR_DEPTH:
            return None
        if name in scope._shape_memo:
            return scope._shape_memo[name]
        scope._shape_memo[name] = None  # provisional: a cycle back to this value knows nothing
        result = scope._shape_uncached(name, depth)
        scope._shape_memo[name] = result
        return result

    def _shape_uncached(self, name: str, depth: int) -> MaybeShape:
        scope = self
        if name in scope.initializers:
            return _dims_of_tensor(scope.initializers[name], "initializer")
        if name in scope.sparse:
            return _dims_of_tensor(scope.sparse[name], "sparse initializer", name)
        inferred = scope.types.get(name, (0, None))[1]
        if name in scope.producer:
            index, slot = scope.producer[name]
            node = scope.nodes[index]
            if node.op_type == "Constant" and _is_default_domain(node):
                return _constant_shape(node)
            if inferred is not None and None not in inferred:
                return inferred
            fallback = scope._fallback_shape(node, slot, depth + 1)
            return _merge_shapes(inferred, fallback)
        if inferred is not None and None not in inferred:
            return inferred
        if name in scope.bindings:
            caller, actual = scope.bindings[name]
            return _merge_shapes(inferred, caller.shape(actual, depth + 1))
        return inferred

    def int_values(self, name: str) -> list[int] | None:
        """Values of a small constant integer tensor (shape vectors), when stored in the file."""
        values = self.values(name, integer=True)
        return None if values is None else [int(v) for v in values]

    def values(self, name: str, integer: bool = False, depth: int = 0) -> list[float] | None:
        """Values of a small constant integer or floating tensor (shape vectors, scales), when
        stored in the file; only integer tensors' with ``integer``.  A 1-D ``Concat`` or an
        ``Identity`` of such tensors is followed (the legacy torch exporter builds Resize scales as
        ``Concat(Constant [1, 1], Constant [2, 2])``)."""
        scope = self.owner(name)
        for _ in range(_MAX_EXPR_DEPTH):  # follows function inputs to their bound actuals
            if scope is None or depth > _MAX_EXPR_DEPTH:
                return None
            if name in scope.initializers:
                return _tensor_values(scope.initializers[name], integer)
            if name in scope.producer:
                node = scope.nodes[scope.producer[name][0]]
                if _is_default_domain(node) and node.op_type in ("Concat", "Identity"):
                    return scope._combined_values(node, integer, depth + 1)
                if node.op_type == "Constant" and _is_default_domain(node):
                    for attribute in node.attribute:
                        if attribute.name == "value" and attribute.HasField("t"):
                            return _tensor_values(attribute.t, integer)
                        if attribute.name == "value_ints":
                            return [int(v) for v in attribute.ints]
                        if attribute.name == "value_int":
                            return [int(attribute.i)]
                        if attribute.name == "value_floats" and not integer:
                            return [float(v) for v in attribute.floats]
                        if attribute.name == "value_float" and not integer:
                            return [float(attribute.f)]
                return None
            if name not in scope.bindings:
                return None
            caller, name = scope.bindings[name]
            scope = caller.owner(name)
        return None

    def _combined_values(self, node: Any, integer: bool, depth: int) -> list[float] | None:
        """Values of an ``Identity`` or a 1-D ``Concat`` of small constant tensors."""
        inputs = [str(i) for i in node.input]
        if node.op_type == "Concat" and _attr_int(node, "axis", 0) not in (0, -1):
            return None
        combined: list[float] = []
        for part in inputs if node.op_type == "Concat" else inputs[:1]:
            if not part:
                return None
            values = self.values(part, integer, depth)
            if values is None or len(combined) + len(values) > _MAX_COMBINED_VALUES:
                return None
            combined.extend(values)
        return combined

    def _fallback_shape(self, node: Any, slot: int, depth: int) -> MaybeShape:
        """Shape of a node output for the few ops that matter for biases and weights."""
        spec = _conv_spec(node)
        if spec is not None:
            return self._conv_output_shape(node, spec, depth) if slot == 0 else None
        op = str(node.op_type)
        inputs = [str(name) for name in node.input]
        if node.domain == _MS_DOMAIN and slot == 0 and inputs and inputs[0]:
            # onnxruntime's quantized element-wise ops, which ONNX shape inference does not know.
            if op in _MS_QLINEAR_BINARY and len(inputs) > 3 and inputs[3]:
                return _broadcast([self.shape(inputs[0], depth), self.shape(inputs[3], depth)])
            if op in _MS_QLINEAR_UNARY:
                return self.shape(inputs[0], depth)
            return None
        if not _is_default_domain(node):
            return None
        if op in _SHAPE_PRESERVING and inputs and inputs[0]:
            if op == "DynamicQuantizeLinear" and slot > 0:
                return ()
            return self.shape(inputs[0], depth) if slot == 0 else None
        if op in _BROADCASTING and len(inputs) == 2 and slot == 0:
            return _broadcast([self.shape(inputs[0], depth), self.shape(inputs[1], depth)])
        if op == "Unsqueeze" and inputs and slot == 0:
            base = self.shape(inputs[0], depth)
            axes = _attr_ints(node, "axes")
            if axes is None and len(inputs) > 1 and inputs[1]:
                values = self.int_values(inputs[1])
                axes = tuple(values) if values is not None else None
            if base is None or axes is None:
                return None
            rank = len(base) + len(axes)
            norm = sorted(a + rank if a < 0 else a for a in axes)
            if any(not 0 <= a < rank for a in norm) or len(set(norm)) != len(norm):
                return None
            rest = iter(base)
            return tuple(1 if axis in norm else next(rest) for axis in range(rank))
        if op == "Reshape" and len(inputs) > 1 and slot == 0:
            target = self.int_values(inputs[1])
            if target is None:
                return None
            base = self.shape(inputs[0], depth)
            allow_zero = _attr_int(node, "allowzero", 0)
            dims: list[Dim] = []
            for axis, value in enumerate(target):
                if value == 0 and not allow_zero:
                    dims.append(base[axis] if base is not None and axis < len(base) else None)
                else:
                    dims.append(value)
            if dims.count(-1) == 1:
                known = [d for d in dims if d is not None and d != -1]
                total = None if base is None or None in base else _numel([d for d in base if d is not None])
                dims = [
                    (
                        total // _numel(known)
                        if total is not None and known and None not in dims and _numel(known)
                        else None
                    )
                    if d == -1
                    else d
                    for d in dims
                ]
            if any(d is not None and d < 0 for d in dims):
                return None
            return tuple(dims)
        if op in ("Resize", "Upsample") and inputs and inputs[0] and slot == 0:
            return self._resized_shape(node, inputs, depth)
        if op == "ConstantOfShape" and inputs and slot == 0:
            values = self.int_values(inputs[0])
            return tuple(values) if values is not None and all(v >= 0 for v in values) else None
        if op == "Transpose" and inputs and slot == 0:
            base = self.shape(inputs[0], depth)
            perm = _attr_ints(node, "perm")
            if base is None:
                return None
            if perm is None:
                return tuple(reversed(base))
            if sorted(perm) != list(range(len(base))):
                return None
            return tuple(base[p] for p in perm)
        return None

    def _conv_output_shape(self, node: Any, spec: _ConvSpec, depth: int) -> MaybeShape:
        """Output shape of a conv-like node: [N, C_out, *spatial], or [N, *spatial, C_out] for a
        channels-last one (NhwcConv, QLinearConv with ``channels_last``)."""
        inputs = [str(name) for name in node.input]
        if len(inputs) <= spec.weight:
            return None
        channels_last = spec.channels_last or bool(_attr_int(node, "channels_last", 0))
        x_shape = self.shape(inputs[spec.x], depth) if inputs[spec.x] else None
        weight = self.shape(inputs[spec.weight], depth) if inputs[spec.weight] else None
        if x_shape is None or len(x_shape) < 3:
            return None
        kernel = _attr_ints(node, "kernel_shape")
        if kernel is None and weight is not None and len(weight) > 2 and not spec.channels_last:
            # (An NhwcConv weight may be stored [M, k..., C/group]: its kernel is not weight[2:].)
            kernel = tuple(d for d in weight[2:] if d is not None)
        channels: Dim = None
        groups = _attr_int(node, "group", 1)
        if weight is not None and len(weight) > 2 and groups > 0:
            channels = (
                weight[0] if not spec.transposed else (None if weight[1] is None else weight[1] * groups)
            )
        in_spatial = tuple(x_shape[1:-1]) if channels_last else tuple(x_shape[2:])
        spatial = _conv_output_spatial(node, spec.transposed, in_spatial, kernel)
        if spatial is None:
            return None if channels_last else (x_shape[0], channels)
        if channels_last:
            return (x_shape[0], *spatial, channels)
        return (x_shape[0], channels, *spatial)

    def _resized_shape(self, node: Any, inputs: Sequence[str], depth: int) -> MaybeShape:
        """Output shape of Resize (X, roi, scales, sizes; opset 10: X, scales) or Upsample (X,
        scales; opset 7: a ``scales`` attribute), from stored sizes or scales."""
        base = self.shape(inputs[0], depth)
        if base is None or _attr(node, "axes") is not None:  # axes subsets: left to inference
            return None
        sizes_name = inputs[3] if node.op_type == "Resize" and len(inputs) > 3 else ""
        if sizes_name:
            sizes = self.int_values(sizes_name)
            return tuple(sizes) if sizes is not None and len(sizes) == len(base) else None
        scales_name = inputs[2] if node.op_type == "Resize" and len(inputs) > 2 else ""
        if node.op_type == "Upsample" or len(inputs) == 2:
            scales_name = inputs[1] if len(inputs) > 1 else ""
        scales: list[float] | None = None
        if scales_name:
            scales = self.values(scales_name)
        elif node.op_type == "Upsample":
            attribute = _attr(node, "scales")
            scales = [float(v) for v in attribute.floats] if attribute is not None else None
        if scales is None or len(scales) != len(base) or any(not v > 0 for v in scales):
            return None
        return tuple(
            None if dim is None else int(dim * scale) for dim, scale in zip(base, scales, strict=True)
        )

    def is_parameter(self, name: str, depth: int = 0) -> bool:
        """True when ``name`` is fixed by the file: an initializer, a Constant, or computed only
        from those (cycles and over-long chains count as not a parameter)."""
        scope = self.owner(name)
        if scope is None:
            return False
        if name in scope._param_memo:
            return scope._param_memo[name]
        if depth > _MAX_EXPR_DEPTH:
            return False
        scope._param_memo[name] = False  # provisional: breaks cycles
        result = False
        if name in scope.initializers or name in scope.sparse:
            result = True
        elif name in scope.producer:
            node = scope.nodes[scope.producer[name][0]]
            inputs = [str(i) for i in node.input if i]
            if node.op_type == "Constant" and _is_default_domain(node):
                result = True
            elif inputs and not any(True for _ in _subgraphs(node)):
                result = all(scope.is_parameter(i, depth + 1) for i in inputs)
        elif name in scope.bindings:
            caller, actual = scope.bindings[name]
            result = caller.is_parameter(actual, depth + 1)
        scope._param_memo[name] = result
        return result

    def single_consumer(self, name: str) -> Any | None:
        """The only node consuming ``name`` in this graph, or None (zero, several, or an output).

        ``Shape`` and ``Size`` consumers read only the extent, not the values (exporters of
        dynamic-shape models add them), so they do not count."""
        if name in self.outputs:
            return None
        users = [
            index
            for index in self.consumers.get(name, [])
            if not (self.nodes[index].op_type in ("Shape", "Size") and _is_default_domain(self.nodes[index]))
        ]
        if len(users) != 1:
            return None
        node = self.nodes[users[0]]
        if sum(1 for i in node.input if i == name) != 1 or any(True for _ in _subgraphs(node)):
            return None
        return node


def _merge_shapes(first: MaybeShape, second: MaybeShape) -> MaybeShape:
    """Combine two views of one shape, preferring known dims."""
    if first is None:
        return second
    if second is None or len(first) != len(second):
        return first
    return tuple(a if a is not None else b for a, b in zip(first, second, strict=True))


def _constant_shape(node: Any) -> MaybeShape:
    """Shape of a Constant node's output from its attribute."""
    for attribute in node.attribute:
        name = attribute.name
        if name == "value" and attribute.HasField("t"):
            return _dims_of_tensor(attribute.t, f"Constant '{node.output[0]}' tensor")
        if name == "sparse_value" and attribute.HasField("sparse_tensor"):
            return _dims_of_tensor(attribute.sparse_tensor, "Constant sparse tensor", str(node.output[0]))
        if name in ("value_float", "value_int", "value_string"):
            return ()
        if name == "value_floats":
            return (len(attribute.floats),)
        if name == "value_ints":
            return (len(attribute.ints),)
        if name == "value_strings":
            return (len(attribute.strings),)
    return None


# ------------------------------------------------------------------------------------------------
# Importing onnx cheaply
#
# ``import onnx`` costs ~0.2 s, most of it numpy and helper modules this reader never uses; for a
# command-line run that is most of the wall time.  All the reader needs is the generated protobuf
# classes (onnx/onnx_ml_pb2.py) and the C++ shape inference (the onnx_cpp2py_export extension), so
# when onnx is not imported yet those two modules are loaded on their own, under their real names,
# so that a later ``import onnx`` in the same process reuses them (the extension cannot be
# initialised twice).  A one-shot import hook then sets them as attributes of the ``onnx``
# package once it is imported, as onnx's own __init__ would have.  Any failure falls back to a
# plain ``import onnx``.


@dataclass(frozen=True)
class _OnnxApi:
    """The parts of onnx the reader uses."""

    pb: Any
    """The onnx_ml_pb2 module (ModelProto, GraphProto, ...)."""
    infer: Any
    """onnx_cpp2py_export.shape_inference.infer_shapes(bytes, check_type, strict_mode, data_prop)."""

    def infer_shapes(self, model: Any) -> Any:
        """ONNX shape inference with data propagation, non-strict; raises on failure."""
        result = self.pb.ModelProto()
        result.ParseFromString(self.infer(model.SerializeToString(), False, False, True))
        return result


_ONNX_CORE = ("onnx.onnx_ml_pb2", "onnx.onnx_cpp2py_export")
_onnx_api: _OnnxApi | None = None
_light_import_allowed = False


def allow_light_onnx_import() -> None:
    """Let the reader load only onnx's core modules (see above).

    Only the command line calls this: it owns its process, so nothing else there expects the full
    ``onnx`` package.  Library users get an ordinary ``import onnx``.
    """
    global _light_import_allowed
    _light_import_allowed = True


class _OnnxPackageHook(importlib.abc.MetaPathFinder):
    """Sets the light-loaded core modules as attributes of ``onnx`` when it is imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "onnx":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _AttributeRestoringLoader(spec.loader)
        return spec


class _AttributeRestoringLoader(importlib.abc.Loader):
    """Delegates to the real loader, then attaches the core submodules to the package."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        for name in _ONNX_CORE:
            if name in sys.modules:
                setattr(module, name.rsplit(".", 1)[1], sys.modules[name])
        self._inner.exec_module(module)


def _load_onnx_core() -> _OnnxApi | None:
    """Load onnx_ml_pb2 and the C++ extension without the onnx package; None if not possible."""
    spec = importlib.util.find_spec("onnx")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    extension = next(
        (
            folder / name
            for name in sorted(os.listdir(folder))
            if name.startswith("onnx_cpp2py_export.")
            and name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        ),
        None,
    )
    pb_path = folder / "onnx_ml_pb2.py"
    if extension is None or not pb_path.is_file():
        return None
    loaded = []
    for name, path, loader in (
        ("onnx.onnx_ml_pb2", pb_path, None),
        (
            "onnx.onnx_cpp2py_export",
            extension,
            importlib.machinery.ExtensionFileLoader("onnx.onnx_cpp2py_export", str(extension)),
        ),
    ):
        module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        if module_spec is None or module_spec.loader is None:
            return None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        loaded.append(module)
    sys.meta_path.insert(0, _OnnxPackageHook())
    return _OnnxApi(pb=loaded[0], infer=loaded[1].shape_inference.infer_shapes)


def _onnx() -> _OnnxApi:
    """The onnx pieces the reader needs, loaded once."""
    global _onnx_api
    if _onnx_api is None:
        api = None
        light_possible = "onnx" not in sys.modules and not any(name in sys.modules for name in _ONNX_CORE)
        if _light_import_allowed and light_possible:
            try:
                api = _load_onnx_core()
            except Exception:  # any surprise: fall back to the ordinary import below
                api = None
        if api is None:
            import onnx
            import onnx.onnx_cpp2py_export.shape_inference as inference

            api = _OnnxApi(pb=onnx.onnx_ml_pb2, infer=inference.infer_shapes)
        _onnx_api = api
    return _onnx_api


# ------------------------------------------------------------------------------------------------
# Parameter counting and external data


def _count_graph_params(
    nodes: Sequence[Any],
    initializers: Sequence[Any],
    sparse_initializers: Sequence[Any],
    warn_external: Any,
) -> tuple[int, list[Any]]:
    """Parameter elements declared in one graph (see the module docstring) and its subgraphs."""
    quantized_biases: set[str] = set()
    for node in nodes:
        spec = _conv_spec(node)
        if spec is not None and spec.quantized and spec.bias is not None and len(node.input) > spec.bias:
            quantized_biases.add(str(node.input[spec.bias]))
        if (
            node.op_type == "DequantizeLinear"
            and (_is_default_domain(node) or node.domain == _MS_DOMAIN)
            and node.input
        ):
            quantized_biases.add(str(node.input[0]))
    quantized_biases.discard("")

    def counts(name: str, data_type: int) -> bool:
        if data_type in _FLOAT_TYPES or data_type in _SMALL_INT_TYPES:
            return True
        return data_type == _INT32 and name in quantized_biases

    seen: set[str] = set()
    total = 0
    for tensor in initializers:
        dims = _dims_of_tensor(tensor, "initializer")
        warn_external(tensor)
        name = str(tensor.name)
        if name not in seen and counts(name, int(tensor.data_type)):
            total += _numel(dims)
        seen.add(name)
    for sparse in sparse_initializers:
        name = str(sparse.values.name)
        dims = _dims_of_tensor(sparse, "sparse initializer", name)
        _dims_of_tensor(sparse.values, "sparse initializer values")
        _dims_of_tensor(sparse.indices, "sparse initializer indices")
        warn_external(sparse.values)
        if name not in seen and counts(name, int(sparse.values.data_type)):
            total += _numel(dims)
        seen.add(name)
    subgraphs: list[Any] = []
    for node in nodes:
        for _, graph in _subgraphs(node):
            subgraphs.append(graph)
        if not (node.op_type == "Constant" and _is_default_domain(node)) or not node.output:
            continue
        name = str(node.output[0])
        for attribute in node.attribute:
            elements: int | None = None
            data_type = 0
            if attribute.name == "value" and attribute.HasField("t"):
                elements = _numel(_dims_of_tensor(attribute.t, f"Constant '{name}' tensor"))
                data_type = int(attribute.t.data_type)
                warn_external(attribute.t)
            elif attribute.name == "sparse_value" and attribute.HasField("sparse_tensor"):
                elements = _numel(_dims_of_tensor(attribute.sparse_tensor, "Constant sparse tensor", name))
                data_type = int(attribute.sparse_tensor.values.data_type)
            elif attribute.name == "value_float":
                elements, data_type = 1, 1
            elif attribute.name == "value_floats":
                elements, data_type = len(attribute.floats), 1
            if elements is not None and name not in seen and counts(name, data_type):
                total += elements
        seen.add(name)
    return total, subgraphs


def _count_model_params(model: Any, warn_external: Any) -> int:
    """model_params over the main graph, all subgraphs and all model-local functions."""
    total = 0
    pending: list[tuple[Sequence[Any], Sequence[Any], Sequence[Any]]] = [
        (model.graph.node, model.graph.initializer, model.graph.sparse_initializer)
    ]
    pending.extend((function.node, (), ()) for function in model.functions)
    while pending:
        nodes, initializers, sparse = pending.pop()
        count, subgraphs = _count_graph_params(nodes, initializers, sparse, warn_external)
        total += count
        pending.extend((g.node, g.initializer, g.sparse_initializer) for g in subgraphs)
    return total


_FunctionKey = tuple[str, str, str]
"""(domain, name, overload) of a model-local function; "ai.onnx" is spelled ""."""


def _function_key(domain: str, name: str, overload: str) -> _FunctionKey:
    return ("" if domain == "ai.onnx" else domain, name, overload)


def _node_key(node: Any) -> _FunctionKey:
    """The function key a node would call."""
    return _function_key(str(node.domain), str(node.op_type), str(getattr(node, "overload", "")))


def _function_key_of(function: Any) -> _FunctionKey:
    """The key a FunctionProto is called by."""
    return _function_key(str(function.domain), str(function.name), str(getattr(function, "overload", "")))


def _calls_within(nodes: Iterable[Any], functions: dict[_FunctionKey, Any]) -> list[_FunctionKey]:
    """The model-local functions called by a node list, subgraphs included, once per call site."""
    if not functions:  # the common case: no walk needed
        return []
    return [key for node in _nested_nodes(nodes) if (key := _node_key(node)) in functions]


def _count_function_instances(
    main_calls: Sequence[_FunctionKey], calls: dict[_FunctionKey, list[_FunctionKey]]
) -> int:
    """How many function bodies a full expansion of nested model-local function calls analyses
    (capped just past :data:`MAX_ONNX_FUNCTION_INSTANCES`); recursive calls count once.

    ``calls`` maps each function to the functions its body calls (subgraphs included).  The
    recursion below is bounded by :data:`_MAX_FUNCTION_DEPTH` frames, whatever the nesting.
    """
    cap = MAX_ONNX_FUNCTION_INSTANCES + 1
    memo: dict[_FunctionKey, int] = {}

    def expand(key: _FunctionKey, stack: frozenset[_FunctionKey]) -> int:
        """Instances analysed below one call of ``key`` (``stack``: the callers, ``key`` excluded)."""
        if key in memo:
            return memo[key]
        if len(stack) >= _MAX_FUNCTION_DEPTH:
            return 0
        inner = stack | {key}
        total = 0
        for callee in calls[key]:
            total += 1 if callee in inner else 1 + expand(callee, inner)
            if total >= cap:
                break
        memo[key] = min(total, cap)
        return memo[key]

    total = 0
    for key in main_calls:
        total += 1 + expand(key, frozenset())
        if total >= cap:
            return cap
    for key in calls:  # uncalled functions are analysed once each, too
        total += 1 + expand(key, frozenset())
        if total >= cap:
            return cap
    return total


def _external_location_problem(location: str, model_dir: Path | None) -> str | None:
    """Why an external-data location is suspicious, or None.  Nothing is opened (``model_dir``:
    the local folder whose symbolic links are checked; None for a remote model)."""
    if not location:
        return "has no location"
    if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        return f"has an absolute location {location!r}"
    parts = re.split(r"[\\/]+", location)
    depth = 0
    for part in parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return f"location {location!r} climbs out of the model's folder"
        elif part not in ("", "."):
            depth += 1
    if model_dir is None:
        return None
    try:
        base = os.path.realpath(model_dir)
        target = os.path.realpath(os.path.join(model_dir, location))
    except (OSError, ValueError):
        return None
    if os.path.commonpath([base, target]) != base:
        return f"location {location!r} resolves outside the model's folder (symbolic link)"
    return None


# ------------------------------------------------------------------------------------------------
# The graph walk


@dataclass
class _Context:
    """State shared by one model's reading and walk."""

    model_dir: Path | None
    locate: Callable[[str], str]
    """The name a file next to the model has (for external data files: never opened)."""
    functions: dict[_FunctionKey, Any] = field(default_factory=dict)
    calls: dict[_FunctionKey, list[_FunctionKey]] = field(default_factory=dict)
    """For each function, the functions its body calls (subgraphs included)."""
    model: Any = None
    """The (shape-inferred) model being walked."""
    inputs_static: bool = False
    """Every input of the graph being walked has a fully known shape (so an unknown conv output
    size means shape inference lost track, which is worth a note)."""
    convs: list[ConvNode] = field(default_factory=list)
    node_names: list[str] = field(default_factory=list)
    """For each conv in ``convs``, its name from the node alone (to tell apart convs that share
    one PyTorch module path)."""
    warnings: list[str] = field(default_factory=list)
    called: set[_FunctionKey] = field(default_factory=set)
    inference_cache: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    """Inferred function bodies by (function, bound input types, call attributes)."""
    reachable: dict[_FunctionKey, list[_FunctionKey]] = field(default_factory=dict)
    sizes: dict[_FunctionKey, int] = field(default_factory=dict)
    visited_nodes: int = 0
    inferred_function_nodes: int = 0
    external_files: set[str] = field(default_factory=set)
    """External data files the model names inside its folder (never opened)."""

    def warn(self, message: str) -> None:
        """Add a warning once."""
        if message not in self.warnings:
            self.warnings.append(message)

    def warn_external(self, tensor: Any) -> None:
        """Warn about a tensor whose external data location is suspicious (nothing is opened)."""
        if tensor.data_location != _EXTERNAL:
            return
        location = next((str(e.value) for e in tensor.external_data if e.key == "location"), "")
        problem = _external_location_problem(location, self.model_dir)
        if problem is not None:
            self.warn(f"external data of tensor '{tensor.name}' {problem}; not opened")
        else:
            self.external_files.add(self.locate(location))

    def reachable_from(self, key: _FunctionKey) -> list[_FunctionKey]:
        """``key`` and every function its body calls, directly or not."""
        if key not in self.reachable:
            seen = {key}
            order = [key]
            for current in order:  # grows while iterating: a breadth-first closure
                for callee in self.calls.get(current, ()):
                    if callee not in seen:
                        seen.add(callee)
                        order.append(callee)
            self.reachable[key] = order
        return self.reachable[key]

    def inference_size(self, key: _FunctionKey) -> int:
        """Nodes (subgraphs included) of ``key`` and the functions it reaches: one inference's work."""
        if key not in self.sizes:
            self.sizes[key] = sum(
                1 for k in self.reachable_from(key) for _ in _nested_nodes(self.functions[k].node)
            )
        return self.sizes[key]


_Frame = Iterator[tuple[_Scope, tuple[_FunctionKey, ...]]]


def _walk(ctx: _Context, root: _Scope, stack: tuple[_FunctionKey, ...]) -> None:
    """Collect the convs of a scope and of every subgraph and function call inside it, in node order.

    Iterative (an explicit stack of per-scope generators), so nesting subgraphs inside functions
    inside subgraphs cannot exhaust Python's stack.
    """
    frames: list[_Frame] = [_scope_steps(ctx, root, stack)]
    while frames:
        child = next(frames[-1], None)
        if child is None:
            frames.pop()
        else:
            frames.append(_scope_steps(ctx, *child))


def _scope_steps(ctx: _Context, scope: _Scope, stack: tuple[_FunctionKey, ...]) -> _Frame:
    """Record one scope's convs; yield each nested scope (subgraph, function call) to walk, in order."""
    ctx.visited_nodes += len(scope.nodes)
    if ctx.visited_nodes > MAX_ONNX_WALK_NODES:
        raise ResourceLimitError(
            f"ONNX graph walk exceeds {MAX_ONNX_WALK_NODES:,} nodes (subgraphs and functions included)"
        )
    for index, node in enumerate(scope.nodes):
        spec = _conv_spec(node)
        key = _node_key(node)
        if spec is not None:
            if _attr_int(node, "channels_last", 0):
                spec = _ConvSpec(spec.x, spec.weight, spec.bias, spec.transposed, True, spec.quantized)
            conv = _conv_node(scope, index, spec)
            kernel = conv.kernel_shape
            output = conv.output_spatial
            if ctx.inputs_static and kernel and None not in kernel and (output is None or None in output):
                # The model's input sizes are fixed and so is the kernel: the size of this conv's
                # input was lost on the way (an op neither inference nor our fallback follows).
                x_name = str(node.input[spec.x]) if len(node.input) > spec.x else ""
                conv = replace(
                    conv,
                    notes=(
                        *conv.notes,
                        f"output size unknown: the size of input '{x_name}' could not be inferred, "
                        "although the model's input shapes are fixed",
                    ),
                )
            ctx.convs.append(conv)
            ctx.node_names.append(scope.prefix + scope.node_name(index))
        elif (
            node.op_type in ("Conv", "ConvTranspose")
            and not _is_default_domain(node)
            and key not in ctx.functions
        ):
            ctx.warn(
                f"{scope.prefix}{scope.node_name(index)}: {node.op_type} in domain '{node.domain}' "
                "is not a standard convolution and was not analysed"
            )
        for label, graph in _subgraphs(node):
            prefix = f"{scope.prefix}{scope.node_name(index)}/{label}/"
            yield _Scope.for_graph(graph, parent=scope, prefix=prefix), stack
        function = ctx.functions.get(key)
        if function is not None:
            ctx.called.add(key)
            body = _function_scope(ctx, function, key, scope, index, stack)
            if body is not None:
                yield body, (*stack, key)


def _substitute_attributes(nodes: Iterable[Any], call: Any | None, function: Any, depth: int = 0) -> None:
    """Replace attribute references (``ref_attr_name``) in a function body with the call's values."""
    defaults = {str(a.name): a for a in function.attribute_proto}
    provided = {str(a.name): a for a in call.attribute} if call is not None else {}
    for node in nodes:
        kept = []
        for attribute in node.attribute:
            ref = str(attribute.ref_attr_name)
            if ref:
                source = provided.get(ref, defaults.get(ref))
                if source is None:
                    continue
                replacement = type(attribute)()
                replacement.CopyFrom(source)
                replacement.name = attribute.name
                kept.append(replacement)
            else:
                if depth < _MAX_EXPR_DEPTH:
                    for _, graph in _subgraphs_of_attribute(attribute):
                        _substitute_attributes(graph.node, call, function, depth + 1)
                kept.append(attribute)
        del node.attribute[:]
        node.attribute.extend(kept)


def _function_scope(
    ctx: _Context,
    function: Any,
    key: _FunctionKey,
    caller: _Scope | None,
    call_index: int | None,
    stack: tuple[_FunctionKey, ...],
) -> _Scope | None:
    """A function body's scope for one call site (or, with no caller, with unknown inputs);
    None when the call is not followed (recursion, nesting too deep)."""
    onnx = _onnx()
    label = f"{key[0]}.{key[1]}" if key[0] else key[1]
    if key in stack:
        ctx.warn(f"function '{label}' calls itself; the recursive call was not followed")
        return None
    if len(stack) >= _MAX_FUNCTION_DEPTH:
        ctx.warn(f"function calls nested deeper than {_MAX_FUNCTION_DEPTH}; '{label}' was not analysed")
        return None
    call = caller.nodes[call_index] if caller is not None and call_index is not None else None
    formals = [str(name) for name in function.input]
    actuals = [str(name) for name in call.input] if call is not None else []
    bindings: dict[str, tuple[_Scope, str]] = {}
    bound_types: list[tuple[int, MaybeShape]] = []
    for position, formal in enumerate(formals):
        actual = actuals[position] if position < len(actuals) else ""
        if caller is None or not actual:
            bound_types.append((0, None))
            continue
        bindings[formal] = (caller, actual)
        bound_types.append((caller.elem_type(actual), caller.shape(actual)))
    # The inferred body depends only on the function, its inputs' types and the call's attributes:
    # call sites that agree on those share one inference (and one copy of the body).
    attributes = (
        tuple(sorted(a.SerializeToString(deterministic=True) for a in call.attribute)) if call else ()
    )
    cache_key = (key, tuple(bound_types), attributes)
    body = ctx.inference_cache.get(cache_key)
    if body is None:
        model = _function_model(ctx, function, key, call, formals, bound_types)
        size = ctx.inference_size(key)
        if ctx.inferred_function_nodes + size > MAX_ONNX_FUNCTION_INFERENCE_NODES:
            # Over budget: walk this call site without inference, and keep nothing for later.
            ctx.warn(
                "shape inference inside functions stopped after "
                f"{MAX_ONNX_FUNCTION_INFERENCE_NODES:,} nodes; shapes in the remaining call sites may be unknown"
            )
            body = model.graph
        else:
            ctx.inferred_function_nodes += size
            try:
                model = onnx.infer_shapes(model)
            except Exception as error:  # onnx raises several unrelated types
                ctx.warn(f"shape inference failed in function '{label}': {_first_line(error)}")
            body = model.graph
            ctx.inference_cache[cache_key] = body
    prefix = (
        f"{caller.prefix}{caller.node_name(call_index)}/"
        if caller is not None and call_index is not None
        else f"{label}/"
    )
    return _Scope(
        body.node,
        inputs=formals,
        outputs=[str(name) for name in function.output],
        value_infos=[*body.input, *body.value_info, *body.output],
        prefix=prefix,
        bindings=bindings,
    )


def _function_model(
    ctx: _Context,
    function: Any,
    key: _FunctionKey,
    call: Any | None,
    formals: Sequence[str],
    bound_types: Sequence[tuple[int, MaybeShape]],
) -> Any:
    """A model whose graph is the function body with the call's input types and attributes bound.

    It carries only the functions reachable from this one (doc strings were dropped up front), so
    its size is the function's own, not the model's.
    """
    onnx = _onnx()
    graph = onnx.pb.GraphProto()
    graph.name = str(function.name)
    for formal, (elem_type, shape) in zip(formals, bound_types, strict=True):
        info = graph.input.add()
        info.name = formal
        if elem_type:
            tensor_type = info.type.tensor_type
            tensor_type.elem_type = elem_type
            if shape is not None:
                tensor_type.shape.SetInParent()
                for dim in shape:
                    proto_dim = tensor_type.shape.dim.add()
                    if dim is not None:
                        proto_dim.dim_value = dim
    graph.node.extend(function.node)
    _substitute_attributes(graph.node, call, function)
    for name in function.output:
        graph.output.add().name = str(name)
    model = onnx.pb.ModelProto()
    model.ir_version = ctx.model.ir_version
    domains: dict[str, int] = {str(o.domain): int(o.version) for o in ctx.model.opset_import}
    domains.update({str(o.domain): int(o.version) for o in function.opset_import})
    for domain, version in domains.items():
        model.opset_import.add(domain=domain, version=version)
    model.functions.extend(ctx.functions[k] for k in ctx.reachable_from(key)[1:])
    model.graph.CopyFrom(graph)
    return model


def _drop_doc_strings(functions: Iterable[Any]) -> None:
    """Clear the doc strings of function protos and their nodes (they are copied per call site)."""
    for function in functions:
        function.ClearField("doc_string")
        for node in _nested_nodes(function.node):
            node.ClearField("doc_string")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


_ZERO_PASS_THROUGH = frozenset({"Expand", "Cast", "CastLike", "Identity", "Reshape", "Unsqueeze", "Squeeze"})


def _runtime_zeros(scope: _Scope, name: str, any_value: bool = False) -> bool:
    """True when ``name`` is made at run time from a constant zero (``Expand``/``ConstantOfShape``
    of a stored 0, through casts and reshapes); with ``any_value``, from any constant value."""
    for _ in range(_MAX_FOLLOW):
        owner = scope.owner(name)
        if owner is None or name not in owner.producer:
            return False
        node = owner.nodes[owner.producer[name][0]]
        if not _is_default_domain(node):
            return False
        op = str(node.op_type)
        if op == "ConstantOfShape":
            value = _attr(node, "value")
            if value is None or any_value:
                return True  # the default value is a float 0
            values = _tensor_values(value.t, False)
            return values is not None and all(v == 0 for v in values)
        if op == "Expand" and any_value:
            return True
        if op == "Constant":
            if any_value:
                return False  # a stored constant of full size is not made at run time
            values = owner.values(name)
            return values is not None and all(v == 0 for v in values)
        if op not in _ZERO_PASS_THROUGH or not node.input or not node.input[0]:
            return False
        name, scope = str(node.input[0]), owner
    return False


_TORCH_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_TORCH_CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
_MAX_SCOPE_LIST_CHARS = 64 * 1024
_TORCH_CONV_CLASS = re.compile(r"(Lazy)?Conv\w*[123]d$")
_QUOTED_ITEM = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")


def _quoted_list(text: str) -> list[str] | None:
    """The items of a Python-literal list of strings such as ``"['', 'features', 'features.0']"``.

    A regular expression rather than ``ast.literal_eval``: the text comes from the file, and all
    that is wanted is the quoted items (module paths hold no quotes)."""
    text = text.strip()
    if len(text) > _MAX_SCOPE_LIST_CHARS or not (text.startswith("[") and text.endswith("]")):
        return None
    return [m.group(1) if m.group(1) is not None else m.group(2) for m in _QUOTED_ITEM.finditer(text)]


def _torch_module_path(node: Any, weight_name: str) -> str | None:
    """The PyTorch module path of a conv node written by the torch.export-based exporter.

    That exporter (``torch.onnx.export(..., dynamo=True)``, the default since PyTorch 2.9) names
    nodes ``node_Conv_17`` but records the module stack in the node's metadata: parallel lists
    ``pkg.torch.onnx.name_scopes`` (``['', 'features', 'features.0', 'conv2d']``) and
    ``pkg.torch.onnx.class_hierarchy``.  In order of preference the layer is named by:

    * the innermost scope whose class is a torch conv module (``Conv2d``, ``ConvTranspose1d``,
      ``LazyConv3d``, ``ConvReLU2d``...);
    * the weight initializer's module (``features.0.weight`` -> ``features.0``), which also
      covers a conv into which the exporter's optimiser folded a BatchNorm (the node then carries
      the norm's scope) and user modules that call ``F.conv2d``;
    * the innermost scope whose class name holds ``Conv``.

    ``None`` for nodes without that metadata (other exporters' node names are kept)."""
    props = {
        str(p.key): str(p.value)
        for p in node.metadata_props
        if p.key in (_TORCH_NAME_SCOPES, _TORCH_CLASS_HIERARCHY)
    }
    if _TORCH_NAME_SCOPES not in props:
        return None
    scopes = _quoted_list(props[_TORCH_NAME_SCOPES]) or []
    classes = _quoted_list(props.get(_TORCH_CLASS_HIERARCHY, "")) or []
    pairs = list(zip(reversed(scopes), reversed(classes), strict=True)) if len(scopes) == len(classes) else []
    for scope, class_name in pairs:
        if scope and _TORCH_CONV_CLASS.match(class_name.rsplit(".", 1)[-1]):
            return scope
    if weight_name.endswith(".weight") and len(weight_name) > len(".weight"):
        return weight_name[: -len(".weight")]
    for scope, class_name in pairs:
        if scope and "Conv" in class_name.rsplit(".", 1)[-1]:
            return scope
    return None


def _unique_module_names(convs: Sequence[ConvNode], node_names: Sequence[str]) -> tuple[ConvNode, ...]:
    """Convs named by module path, with the node name added where two share one path (a module
    called twice is two conv nodes)."""
    counts: dict[str, int] = {}
    for conv in convs:
        counts[conv.name] = counts.get(conv.name, 0) + 1
    return tuple(
        replace(conv, name=f"{conv.name} ({node_name})")
        if counts[conv.name] > 1 and conv.name != node_name
        else conv
        for conv, node_name in zip(convs, node_names, strict=True)
    )


def _conv_node(scope: _Scope, index: int, spec: _ConvSpec) -> ConvNode:
    """The facts of one conv-like node."""
    node = scope.nodes[index]
    op = str(node.op_type)
    inputs = [str(i) for i in node.input]
    notes: list[str] = []

    weight_name = inputs[spec.weight] if len(inputs) > spec.weight else ""
    name = scope.prefix + (_torch_module_path(node, weight_name) or scope.node_name(index))
    weight_shape: MaybeShape = None
    if not weight_name:
        notes.append("has no weight input")
    elif scope.owner(weight_name) is None:
        notes.append(f"weight '{weight_name}' has no producer (not an initializer, input or node output)")
    else:
        weight_shape = scope.shape(weight_name)
        if weight_shape is None:
            notes.append(f"shape of weight '{weight_name}' is unknown")

    kernel = _attr_ints(node, "kernel_shape")
    if spec.channels_last and weight_shape is not None and len(weight_shape) >= 3:
        # ONNX Runtime stores NhwcConv weights as [M, k..., C/group]; report [M, C/group, k...].
        as_stored_oihw = kernel is not None and tuple(weight_shape[2:]) == kernel
        as_ohwi = kernel is not None and tuple(weight_shape[1:-1]) == kernel
        if as_ohwi or not as_stored_oihw:
            weight_shape = (weight_shape[0], weight_shape[-1], *weight_shape[1:-1])
            if kernel is None:
                notes.append("NhwcConv without kernel_shape: weight layout [M, k..., C/group] assumed")
    kernel_shape: MaybeShape = kernel
    if kernel_shape is None and weight_shape is not None and len(weight_shape) > 2:
        kernel_shape = tuple(weight_shape[2:])

    group_attr = _attr(node, "group")
    groups: int | None = 1
    if group_attr is not None:
        # A group attribute of the wrong type or value is reported as unknown, not guessed.
        groups = int(group_attr.i) if group_attr.type == _A_INT and group_attr.i > 0 else None
        if groups is None:
            notes.append("invalid 'group' attribute")

    # Output spatial size: shape inference first, our own arithmetic for what it left unknown.
    out_shape = scope.shape(str(node.output[0])) if node.output and node.output[0] else None
    from_inference: MaybeShape = None
    if out_shape is not None and len(out_shape) >= 2:
        from_inference = tuple(out_shape[1:-1]) if spec.channels_last else tuple(out_shape[2:])
    x_shape = scope.shape(inputs[spec.x]) if len(inputs) > spec.x and inputs[spec.x] else None
    in_spatial: MaybeShape = None
    if x_shape is not None and len(x_shape) >= 2:
        in_spatial = tuple(x_shape[1:-1]) if spec.channels_last else tuple(x_shape[2:])
    computed = _conv_output_spatial(node, spec.transposed, in_spatial, kernel_shape)
    output_spatial = _merge_shapes(from_inference, computed)

    terms: list[BiasTerm] = []
    if (
        spec.bias is not None
        and len(inputs) > spec.bias
        and inputs[spec.bias]
        and _runtime_zeros(scope, inputs[spec.bias])
        and not (weight_name and _runtime_zeros(scope, weight_name, any_value=True))
    ):
        # torch's unoptimised dynamo export gives every bias-free conv a bias input of zeros made
        # at run time (Expand of a constant 0 to C_out): no bias is stored, so none is counted.
        # (A model whose weights are made at run time too is a structure-only file: left alone.)
        notes.append("the bias input is a zero tensor made at run time: no stored bias")
    elif spec.bias is not None and len(inputs) > spec.bias and inputs[spec.bias]:
        bias_name = inputs[spec.bias]
        if scope.owner(bias_name) is None:
            notes.append(f"bias '{bias_name}' has no producer (not an initializer, input or node output)")
        terms.append(BiasTerm(bias_name, scope.shape(bias_name), BiasSource.CONV))

    followed_by: str | None = None
    if node.output and node.output[0]:
        conv_rank = (
            len(weight_shape)
            if weight_shape is not None
            else (2 + len(output_spatial) if output_spatial is not None else None)
        )
        add_term, follower, layout_note = _follow_output(scope, str(node.output[0]), op, conv_rank)
        if layout_note is not None:
            notes.append(layout_note)
        if add_term is not None and not add_term.aligned:
            terms.append(add_term)
        elif add_term is not None:
            shape = add_term.shape
            if spec.channels_last and shape is not None and conv_rank is not None and conv_rank >= 2:
                # The output is [N, *spatial, C]: undo that layout as a Transpose would be undone.
                to_channels_last = (0, *range(2, conv_rank), 1)
                channels_first = _undo_layout(tuple(shape), conv_rank, [("transpose", to_channels_last)])
                if channels_first is not None:
                    shape = channels_first
                    notes.append(
                        f"bias '{add_term.name}' is added in channels-last layout; reported as {list(shape)}"
                    )
            terms.append(BiasTerm(add_term.name, shape, BiasSource.ADD))
        if not terms:
            followed_by = follower

    return ConvNode(
        name=name,
        op=op,
        weight_name=weight_name,
        weight_shape=weight_shape,
        transposed=spec.transposed,
        groups=groups,
        kernel_shape=kernel_shape,
        output_spatial=output_spatial,
        bias_terms=tuple(terms),
        followed_by=followed_by,
        notes=tuple(notes),
    )


def _preserves_size(scope: _Scope, operand: str, value_shape: MaybeShape) -> bool:
    """True when multiplying a value by ``operand`` cannot change its element count."""
    shape = scope.shape(operand)
    if shape is None:
        return False
    if all(dim == 1 for dim in shape):
        return value_shape is None or len(shape) <= len(value_shape)
    if value_shape is None or len(shape) > len(value_shape):
        return False
    aligned = value_shape[len(value_shape) - len(shape) :]
    return all(
        dim == 1 or (dim is not None and dim == target) for dim, target in zip(shape, aligned, strict=True)
    )


def _is_rescale(scope: _Scope, operand: str, value_shape: MaybeShape) -> bool:
    """True when Mul/Div by ``operand`` looks like a quantized conv's int32 -> float rescale: it
    keeps the element count, and is a scalar or computed at run time (a stored per-channel
    parameter is more likely a folded norm's scale)."""
    if not operand or not _preserves_size(scope, operand, value_shape):
        return False
    shape = scope.shape(operand)
    return (shape is not None and all(dim == 1 for dim in shape)) or not scope.is_parameter(operand)


_LayoutStep = tuple[str, tuple[int, ...]]
"""A shape change between a conv output and its bias Add: ("squeeze" | "unsqueeze", axes) or
("transpose", perm)."""


def _layout_step(
    scope: _Scope, consumer: Any, current: str, rank: int | None
) -> tuple[_LayoutStep, int] | None:
    """The layout step a Squeeze / Unsqueeze / Transpose of ``current`` makes, with the new rank;
    None when it cannot be pinned down (rank or axes unknown, or the channel axis moves away
    under a Squeeze)."""
    kind = str(consumer.op_type)
    if rank is None or not consumer.input or str(consumer.input[0]) != current:
        return None
    if kind == "Transpose":
        perm = _attr_ints(consumer, "perm") or tuple(reversed(range(rank)))
        if sorted(perm) != list(range(rank)):
            return None
        return ("transpose", perm), rank
    axes = _attr_ints(consumer, "axes")
    if axes is None and len(consumer.input) > 1 and consumer.input[1]:
        values = scope.int_values(str(consumer.input[1]))
        axes = tuple(values) if values is not None else None
    if kind == "Squeeze":
        if axes is None:  # every axis of extent 1
            shape = scope.shape(current)
            if shape is None or len(shape) != rank or None in shape:
                return None
            axes = tuple(axis for axis, dim in enumerate(shape) if dim == 1)
        norm = tuple(sorted({a + rank if a < 0 else a for a in axes}))
        if not norm or any(not 0 <= a < rank for a in norm) or len(norm) != len(axes):
            return None
        return ("squeeze", norm), rank - len(norm)
    if kind == "Unsqueeze" and axes:
        new_rank = rank + len(axes)
        norm = tuple(sorted({a + new_rank if a < 0 else a for a in axes}))
        if any(not 0 <= a < new_rank for a in norm) or len(norm) != len(axes):
            return None
        return ("unsqueeze", norm), new_rank
    return None


def _undo_layout(shape: tuple[Dim, ...], rank: int, steps: Sequence[_LayoutStep]) -> tuple[Dim, ...] | None:
    """Map an operand shape seen after ``steps`` back to the conv output's layout (broadcasting
    first pads it to ``rank``); None when it does not map (it varies along an axis the conv
    output does not have)."""
    if len(shape) > rank:
        return None
    mapped = [1] * (rank - len(shape)) + list(shape)
    for step, axes in reversed(steps):
        if step == "squeeze":
            for axis in axes:
                mapped.insert(axis, 1)
        elif step == "unsqueeze":
            if any(mapped[axis] != 1 for axis in axes):
                return None
            mapped = [dim for axis, dim in enumerate(mapped) if axis not in axes]
        else:
            inverse: list[Dim] = [None] * len(axes)
            for position, source in enumerate(axes):
                inverse[source] = mapped[position]
            mapped = inverse
    return tuple(mapped)


def _follow_output(
    scope: _Scope, output: str, op: str, conv_rank: int | None
) -> tuple[BiasTerm | None, str | None, str | None]:
    """Find an Add of a parameter after a conv output, or the norm that follows it.

    Returns (bias term, follower, note).  Squeeze / Unsqueeze / Transpose steps on the way (a
    Keras Conv1D exported by tf2onnx runs as a 2-D Conv, then Squeeze, then the bias Add) are
    undone on the operand's shape, so that the term is reported in the conv output's layout; the
    note says so.  An operand that cannot be mapped back is an unaligned term."""
    current = output
    visited = {current}
    rescaled = op != "ConvInteger"  # at most one rescale, and only after an integer conv
    steps: list[_LayoutStep] = []
    rank = conv_rank
    for _ in range(_MAX_FOLLOW):
        consumer = scope.single_consumer(current)
        if consumer is None:
            return None, None, None
        kind = str(consumer.op_type)
        inputs = [str(i) for i in consumer.input]
        nxt = str(consumer.output[0]) if consumer.output else ""
        other = ""
        if consumer.domain == _MS_DOMAIN and kind == "QLinearAdd" and len(inputs) >= 6:
            # onnxruntime's QOperator form of Add: (A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp).
            if current not in (inputs[0], inputs[3]):
                return None, None, None
            other = inputs[3] if inputs[0] == current else inputs[0]
        elif _is_default_domain(consumer) and kind == "Add" and len(inputs) == 2:
            other = inputs[1] if inputs[0] == current else inputs[0]
        if other or kind in ("Add", "QLinearAdd"):
            if not (other and derived_from_parameter(scope, other)):
                return None, None, None
            return _added_term(scope, other, steps, rank)
        quantize_step = kind in ("QuantizeLinear", "DequantizeLinear") and (
            _is_default_domain(consumer) or consumer.domain == _MS_DOMAIN
        )
        if not _is_default_domain(consumer) and not quantize_step:
            return None, None, None
        if kind == "BatchNormalization" and inputs and inputs[0] == current and not steps:
            return None, "BatchNormalization", None
        if kind == "Mul" and len(inputs) == 2:
            other = inputs[1] if inputs[0] == current else inputs[0]
            if not rescaled and nxt and _is_rescale(scope, other, scope.shape(current)):
                current = nxt  # the int32 -> float rescale of a quantized conv
                rescaled = True
            elif other and scope.is_parameter(other) and nxt and not steps:
                after = scope.single_consumer(nxt)
                if (
                    after is not None
                    and _is_default_domain(after)
                    and after.op_type == "Add"
                    and len(after.input) == 2
                ):
                    add_other = str(after.input[1] if after.input[0] == nxt else after.input[0])
                    if add_other and scope.is_parameter(add_other):
                        return None, "Mul+Add", None
                return None, None, None
            else:
                return None, None, None
        elif kind == "Div" and len(inputs) == 2 and inputs[0] == current and not rescaled:
            if not (nxt and _is_rescale(scope, inputs[1], scope.shape(current))):
                return None, None, None
            current = nxt
            rescaled = True
        elif (kind in ("Cast", "Identity") or (quantize_step and inputs[0] == current)) and nxt:
            # Element-count-preserving: the bias may be added after it (a QDQ graph puts a
            # QuantizeLinear -> DequantizeLinear pair between the conv and its Add).
            current = nxt
        elif kind in ("Squeeze", "Unsqueeze", "Transpose") and nxt:
            step = _layout_step(scope, consumer, current, rank)
            if step is None:
                return None, None, None
            steps.append(step[0])
            rank = step[1]
            current = nxt
        else:
            return None, None, None
        if current in visited:
            return None, None, None
        visited.add(current)
    return None, None, None


def _added_term(
    scope: _Scope, name: str, steps: Sequence[_LayoutStep], rank: int | None
) -> tuple[BiasTerm | None, str | None, str | None]:
    """The Add operand ``name`` as a term in the conv output's layout (see :func:`_follow_output`)."""
    shape = scope.shape(name)
    if not steps:
        return BiasTerm(name, shape, BiasSource.ADD), None, None
    if shape is None or rank is None:
        return BiasTerm(name, shape, BiasSource.ADD, aligned=False), None, None
    mapped = _undo_layout(tuple(shape), rank, steps)
    path = " -> ".join(step.capitalize() for step, _ in steps)
    if mapped is None:
        note = f"bias '{name}' is added after {path} and does not map onto the conv output"
        return BiasTerm(name, shape, BiasSource.ADD, aligned=False), None, note
    # Without names or shapes, so that many such layers share one grouped warning.
    note = f"bias added after {path}: its shape is reported in the conv output's layout"
    return BiasTerm(name, mapped, BiasSource.ADD), None, note


# ------------------------------------------------------------------------------------------------
# Entry point


def _load_stripped(source: ByteSource) -> Any:
    """Strip payloads from the file's buffer (an mmap locally, fetched blocks remotely), parse the
    result into an onnx.ModelProto."""
    if source.size == 0:
        raise UnsupportedFormatError("not an ONNX model: the file is empty")
    view = source.view()
    _check_looks_like_onnx(view)
    stripped = strip_model_proto(view)
    model = _onnx().pb.ModelProto()
    try:
        model.ParseFromString(stripped.data)
    except Exception as error:  # google.protobuf.message.DecodeError and friends
        raise MalformedModelError(
            f"ONNX protobuf could not be parsed (malformed, or nested deeper than protobuf allows): "
            f"{_first_line(error)}"
        ) from error
    if not model.HasField("graph"):
        if model.ir_version or len(model.opset_import):
            raise MalformedModelError("ONNX model has no graph")
        raise UnsupportedFormatError("not an ONNX model: no ModelProto graph, ir_version or opset_import")
    return model


def _check_looks_like_onnx(view: Buffer) -> None:
    """Reject bytes whose first protobuf field cannot start a ModelProto."""
    try:
        key = decode_varint(view, 0, min(len(view), 10), "first field tag")[0]
    except MalformedModelError:
        key = -1  # not even a tag
    if key < 0 or _MODEL_FIELDS.get(key >> 3) != key & 7:
        raise UnsupportedFormatError(
            "not an ONNX model: the first bytes do not start a ModelProto"  # bytes never quoted
        )


def read_onnx(location: Location) -> list[ModelDescription]:
    """Read the conv layers of an ONNX model file (a source or a local path) without loading its
    weights.

    Returns one :class:`ModelDescription` (``format="onnx"``).  Raises a
    :class:`~biasinspect.errors.BiasInspectError` subclass for files that are not ONNX,
    truncated, malformed or over a resource limit.
    """
    with opened(location) as source:
        model = _load_stripped(source)
        path = source.name
        # Symbolic links can only be resolved (and can only mislead) in a local folder.
        local_dir = source.path.parent if isinstance(source, LocalSource) else None
        ctx = _Context(model_dir=local_dir, locate=source.locate)
    return _read_model(model, path, ctx)


def _read_model(model: Any, path: str, ctx: _Context) -> list[ModelDescription]:
    model_params = _count_model_params(model, ctx.warn_external)
    for function in model.functions:
        ctx.functions.setdefault(_function_key_of(function), function)
    _drop_doc_strings(ctx.functions.values())
    ctx.calls = {key: _calls_within(function.node, ctx.functions) for key, function in ctx.functions.items()}
    main_calls = _calls_within(model.graph.node, ctx.functions)
    if _count_function_instances(main_calls, ctx.calls) > MAX_ONNX_FUNCTION_INSTANCES:
        raise ResourceLimitError(
            f"model-local functions expand to more than {MAX_ONNX_FUNCTION_INSTANCES:,} call sites"
        )

    try:
        ctx.model = _onnx().infer_shapes(model)
    except Exception as error:  # InferenceError, ValidationError, RuntimeError, ...
        ctx.warn(f"shape inference failed: {_first_line(error)}")
        ctx.model = model

    try:
        _analyse(ctx)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeError) as error:
        # A structure this walk did not anticipate; the file is at fault far more often than not.
        raise MalformedModelError(
            f"unexpected ONNX structure ({type(error).__name__}: {_first_line(error)})"
        ) from error
    return [
        ModelDescription(
            path=path,
            format="onnx",
            convs=_unique_module_names(ctx.convs, ctx.node_names),
            model_params=model_params,
            warnings=tuple(ctx.warnings),
            companion_files=tuple(sorted(ctx.external_files)),
        )
    ]


def _analyse(ctx: _Context) -> None:
    """Walk the main graph, its subgraphs and every function, collecting convs into ``ctx``."""
    graph = ctx.model.graph
    main = _Scope.for_graph(graph)
    input_shapes = [main.types.get(name, (0, None))[1] for name in main.inputs]
    ctx.inputs_static = all(shape is not None and None not in shape for shape in input_shapes)
    _walk(ctx, main, ())
    # Functions nobody calls are analysed once, with unknown inputs (so no notes about unknown
    # sizes).  Roots first (functions not called from any function body, subgraphs included), so
    # that a chain of uncalled functions is walked from its top.
    ctx.inputs_static = False
    called_by_functions = {callee for callees in ctx.calls.values() for callee in callees}
    uncalled = [key for key in ctx.functions if key not in ctx.called]
    for key in [k for k in uncalled if k not in called_by_functions] + uncalled:
        if key not in ctx.called:
            ctx.called.add(key)
            body = _function_scope(ctx, ctx.functions[key], key, None, None, ())
            if body is not None:
                _walk(ctx, body, (key,))
