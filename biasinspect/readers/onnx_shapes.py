"""One ONNX graph's scope: name resolution, value facts, and shapes (stored, inferred, or computed
here for the few ops that matter)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from biasinspect.model import Dim, MaybeShape
from biasinspect.readers.onnx_proto import (
    _INT64_MAX,
    _MS_DOMAIN,
    _attr,
    _attr_int,
    _attr_ints,
    _attr_str,
    _conv_spec,
    _ConvSpec,
    _dims_of_tensor,
    _is_default_domain,
    _kernel_shape,
    _numel,
    _sane_shape,
    _subgraphs,
    _tensor_values,
    _type_shape,
)

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
        result.append(out if 0 <= out <= _INT64_MAX else None)
    return tuple(result)


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
            self.types[str(info.name)] = _type_shape(info.type, str(info.name))
        self.producer: dict[str, tuple[int, int]] = {}
        self.consumers: dict[str, list[int]] = {}
        self.used_twice: set[tuple[int, str]] = set()
        """(node index, value) where the node takes the value as more than one input."""
        self.with_subgraphs: set[int] = set()
        """Indices of nodes with graph attributes."""
        for index, node in enumerate(self.nodes):
            for slot, name in enumerate(node.output):
                if name:
                    self.producer.setdefault(str(name), (index, slot))
            used: set[str] = set()
            for name in node.input:
                if name:
                    name = str(name)
                    if name in used:
                        self.used_twice.add((index, name))
                    used.add(name)
            for _, sub in _subgraphs(node):
                self.with_subgraphs.add(index)
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
        result = _sane_shape(scope._shape_uncached(name, depth))
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
        kernel = _kernel_shape(node)
        if kernel is None and weight is not None and len(weight) > 2 and not spec.channels_last:
            # (An NhwcConv weight may be stored [M, k..., C/group]: its kernel is not weight[2:].)
            kernel = tuple(d for d in weight[2:] if d is not None)
        channels: Dim = None
        groups = _attr_int(node, "group", 1)
        if weight is not None and len(weight) > 2 and groups > 0:
            channels = (
                weight[0]
                if not spec.transposed
                else (None if weight[1] is None or weight[1] * groups > _INT64_MAX else weight[1] * groups)
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
            if sizes is None or len(sizes) != len(base):
                return None
            return tuple(size if 0 <= size <= _INT64_MAX else None for size in sizes)
        scales_name = inputs[2] if node.op_type == "Resize" and len(inputs) > 2 else ""
        if node.op_type == "Upsample" or len(inputs) == 2:
            scales_name = inputs[1] if len(inputs) > 1 else ""
        scales: list[float] | None = None
        if scales_name:
            scales = self.values(scales_name)
        elif node.op_type == "Upsample":
            attribute = _attr(node, "scales")
            scales = [float(v) for v in attribute.floats] if attribute is not None else None
        if scales is None or len(scales) != len(base) or any(not 0 < v < math.inf for v in scales):
            return None  # NaN, infinite, zero or negative scales say nothing about the size
        return tuple(
            None if dim is None or dim * scale > _INT64_MAX else int(dim * scale)
            for dim, scale in zip(base, scales, strict=True)
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
        users: list[int] = []
        for index in self.consumers.get(name, ()):
            if not (self.nodes[index].op_type in ("Shape", "Size") and _is_default_domain(self.nodes[index])):
                users.append(index)
                if len(users) > 1:
                    return None
        # Precomputed facts rather than a look through the node's inputs: a Sum of 20,000 conv
        # outputs would otherwise be scanned once per conv.
        if len(users) != 1 or (users[0], name) in self.used_twice or users[0] in self.with_subgraphs:
            return None
        return self.nodes[users[0]]


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
