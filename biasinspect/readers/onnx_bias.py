"""The facts of one ONNX conv node: weight, kernel, output size, and its bias terms (own input, or
an Add of a parameter found by following the conv output)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from biasinspect.model import BiasSource, BiasTerm, ConvNode, Dim, MaybeShape
from biasinspect.readers.onnx_lineage import derived_from_parameter
from biasinspect.readers.onnx_proto import (
    _A_INT,
    _MS_DOMAIN,
    _attr,
    _attr_ints,
    _ConvSpec,
    _is_default_domain,
    _kernel_shape,
    _tensor_values,
)
from biasinspect.readers.onnx_shapes import _MAX_FOLLOW, _conv_output_spatial, _merge_shapes, _Scope

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

    kernel = _kernel_shape(node)
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


_MAX_FOLLOWED_INPUTS = 8
"""Most inputs of a node followed towards a bias Add (QLinearAdd, the widest, has 8)."""


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
        if len(consumer.input) > _MAX_FOLLOWED_INPUTS:
            return None, None, None  # (a Sum or Concat of many: copying its inputs per conv is quadratic)
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
