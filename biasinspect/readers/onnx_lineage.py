"""Is an ONNX value a parameter term?  Decided by the lineage of its *data* operand.

A bias added after a conv is a parameter term when its data comes from the file, even if part
of its arithmetic happens at run time.  onnxruntime's dynamic quantization as older releases
wrote it (producer ``onnx.quantize``) is the case that needs this::

    Add(ConvInteger(x_q, w_q, x_zp, w_zp),
        Reshape(Cast(Floor(Div(bias, Mul(DynamicQuantizeLinear(x).scale, w_scale)))), shape))

The stored ``[C_out]`` float ``bias`` is the data; only its scale is computed from the input.

The rule (:func:`derived_from_parameter`):

* a value fixed by the file (an initializer, a ``Constant``, or computed only from those; see
  ``_Scope.is_parameter``) is a parameter;
* a value made by an element-wise or layout op is a parameter when its *data* input is:
  ``Cast``/``Identity``/``Floor``/``Ceil``/``Round``/``Neg``/``Abs`` (input 0);
  ``Reshape``/``Unsqueeze``/``Squeeze``/``Flatten``/``Transpose``/``CastLike`` (input 0; the
  shape, axes or type operand may be anything, it carries no data and keeps the element count);
  ``Clip``/``QuantizeLinear``/``DequantizeLinear`` (input 0; bounds, scales and zero points
  must be *scale-like*); ``Div`` (the numerator; the divisor must be scale-like); ``Mul`` (either
  operand, the other scale-like);
* a *scale-like* operand is a parameter, a value of exactly one element (such as the input
  scale DynamicQuantizeLinear computes at run time), or a Mul/Div/Cast/Identity of scale-likes
  (a run-time scale times a stored per-channel weight scale), and it may not make the data
  larger by broadcasting;
* anything else -- a graph input, an activation, a data path through any other op -- is not a
  parameter.  So a residual connection, or an activation multiplied by a stored scale, never
  counts as a bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from biasinspect.model import MaybeShape

if TYPE_CHECKING:
    from biasinspect.readers.onnx_shapes import _Scope

__all__ = ["derived_from_parameter"]

_MAX_LINEAGE_DEPTH = 64
"""Longest chain of producing nodes followed back from a bias operand."""

_VALUE_OPS = frozenset({"Cast", "Identity", "Floor", "Ceil", "Round", "Neg", "Abs"})
"""One input, the data."""
_LAYOUT_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "CastLike"})
"""Input 0 is the data; the other inputs say how to lay it out (or which type to take).  Not
``Expand``/``Tile`` with a run-time shape: they would give a [C] bias the output's full extent,
which reads as untied."""
_SCALED_OPS = frozenset({"Clip", "QuantizeLinear", "DequantizeLinear"})
"""Input 0 is the data; the others are bounds, scales or zero points."""
_SCALE_OPS = frozenset({"Mul", "Div", "Cast", "Identity"})
"""Ops through which a scale stays a scale."""
_DOMAINS = ("", "ai.onnx")
_Q_DQ_DOMAINS = ("", "ai.onnx", "com.microsoft")


def derived_from_parameter(scope: _Scope, name: str) -> bool:
    """True when ``name``'s data operand derives from a stored parameter (module docstring)."""
    return _Lineage(scope).data(scope, name, 0)


class _Lineage:
    """One question's memo: each (scope, value, role) is decided once, so a DAG of Muls costs
    one visit per value; a value met again while it is being decided (a cycle) counts as not."""

    def __init__(self, root: _Scope) -> None:
        self.root = root
        self.memo: dict[tuple[int, str, str], bool] = {}

    def data(self, scope: _Scope, name: str, depth: int) -> bool:
        return self._decide(scope, name, depth, "data")

    def scale(self, scope: _Scope, name: str, depth: int, data_shape: MaybeShape) -> bool:
        if not name or not _keeps_size(scope.shape(name), data_shape):
            return False
        return self._decide(scope, name, depth, "scale")

    def _decide(self, scope: _Scope, name: str, depth: int, role: str) -> bool:
        owner = scope.owner(name)
        if owner is None or depth > _MAX_LINEAGE_DEPTH:
            return False
        key = (id(owner), name, role)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = False  # provisional: breaks cycles
        if owner.is_parameter(name) or (role == "scale" and _one_element(owner.shape(name))):
            result = True
        elif name in owner.bindings:
            caller, actual = owner.bindings[name]
            result = self._decide(caller, actual, depth + 1, role)
        elif name in owner.producer:
            node = owner.nodes[owner.producer[name][0]]
            if role == "data":
                result = self._data_node(owner, node, name, depth + 1)
            else:
                result = self._scale_node(owner, node, depth + 1)
        else:
            result = False  # a graph input
        self.memo[key] = result
        return result

    def _data_node(self, scope: _Scope, node: Any, name: str, depth: int) -> bool:
        op = str(node.op_type)
        inputs = [str(i) for i in node.input]
        if not inputs or not inputs[0] or len(node.output) < 1 or str(node.output[0]) != name:
            return False
        q_dq = op in ("QuantizeLinear", "DequantizeLinear") and node.domain in _Q_DQ_DOMAINS
        if node.domain not in _DOMAINS and not q_dq:
            return False
        if op in _VALUE_OPS:
            return len(inputs) == 1 and self.data(scope, inputs[0], depth)
        if op in _LAYOUT_OPS:
            return self.data(scope, inputs[0], depth)
        if op in _SCALED_OPS:
            shape = scope.shape(inputs[0])
            return self.data(scope, inputs[0], depth) and all(
                self.scale(scope, other, depth, shape) for other in inputs[1:] if other
            )
        if op == "Div" and len(inputs) == 2:
            return self.data(scope, inputs[0], depth) and self.scale(
                scope, inputs[1], depth, scope.shape(inputs[0])
            )
        if op == "Mul" and len(inputs) == 2:
            return any(
                self.data(scope, first, depth) and self.scale(scope, second, depth, scope.shape(first))
                for first, second in ((inputs[0], inputs[1]), (inputs[1], inputs[0]))
            )
        return False

    def _scale_node(self, scope: _Scope, node: Any, depth: int) -> bool:
        op = str(node.op_type)
        inputs = [str(i) for i in node.input if i]
        if node.domain not in _DOMAINS or op not in _SCALE_OPS or not inputs:
            return False
        if op in ("Cast", "Identity") and len(inputs) != 1:
            return False
        return all(self._decide(scope, operand, depth, "scale") for operand in inputs)


def _one_element(shape: MaybeShape) -> bool:
    return shape is not None and all(dim == 1 for dim in shape)


def _keeps_size(scale: MaybeShape, data: MaybeShape) -> bool:
    """True when broadcasting ``scale`` against ``data`` cannot make the result larger."""
    if scale is None:
        return False
    if _one_element(scale):
        return data is None or len(scale) <= len(data)
    if data is None or len(scale) > len(data):
        return False
    aligned = data[len(data) - len(scale) :]
    return all(
        dim == 1 or (dim is not None and dim == target) for dim, target in zip(scale, aligned, strict=True)
    )
