"""Read CoreML models (``.mlmodel`` and ``.mlpackage``) from their protobuf structure alone.

No coremltools, no schema package: :mod:`biasinspect.readers.wire_fields` walks the messages by
field number (numbers from Apple's ``Model.proto``, ``NeuralNetwork.proto`` and ``MIL.proto``),
and weight arrays are skipped by offset, never read.  Shapes come from the fields that declare
them, never from the lengths of weight arrays (fp32, fp16 and 8-bit ``rawValue`` weights hold
the same shape in different byte counts).

* **NeuralNetwork** (``neuralNetwork``, ``neuralNetworkClassifier``, ``neuralNetworkRegressor``,
  also inside pipelines and ``branch``/``loop`` sub-networks): ``convolution`` layers
  (``outputChannels``, ``kernelChannels``, ``kernelSize``, ``nGroups``, ``isDeconvolution``,
  ``hasBias``) and ``convolution3d`` layers.  A conv's own bias is ``hasBias``; otherwise the bias
  is a ``bias`` layer, or an ``add``/``addBroadcastable`` of a ``loadConstant``/``loadConstantND``
  layer, that is the conv output's only consumer (an untied bias arrives this way).  Output sizes
  are propagated from the model's input description through convs and shape-preserving layers.
* **ML Program** (``mlProgram``; an ``.mlpackage``'s ``model.mlmodel``): ``conv`` and
  ``conv_transpose`` ops, with their ``bias`` input or an ``add`` of a constant after them.  Every
  value's shape is declared in its type, so const and ``constexpr_*`` (quantized, palettized,
  sparse) weights have their dense shape without reading the weight blob, which is never opened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from biasinspect import limits
from biasinspect.errors import (
    MalformedModelError,
    ResourceLimitError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from biasinspect.model import (
    BiasSource,
    BiasTerm,
    ConvNode,
    Dim,
    MaybeShape,
    ModelDescription,
    Shape,
    shape_elements,
)
from biasinspect.readers.files import parse_json_object, quote
from biasinspect.readers.wire_fields import LEN, VARINT, Span, WireReader
from biasinspect.source import ByteSource, LocalSource

FORMAT = "coreml"

MAX_NESTING = 32
"""Deepest nesting of pipelines, branch/loop networks and MIL blocks followed."""

MAX_DIM = 2**40
MAX_LAYERS = 1_000_000

# Model.proto
_M_DESCRIPTION = 2
_M_PIPELINE_CLASSIFIER, _M_PIPELINE_REGRESSOR, _M_PIPELINE = 200, 201, 202
_M_NETWORKS = frozenset({303, 403, 500})
_M_PROGRAM = 502

# NeuralNetworkLayer oneof field numbers.
_L_CONV, _L_CONV3D = 100, 1471
_L_BATCHNORM, _L_MVN, _L_LAYERNORM, _L_SCALE = 160, 165, 1350, 245
_L_ADD, _L_ADD_BROADCASTABLE, _L_BIAS = 230, 880, 250
_L_LOAD_CONSTANT, _L_LOAD_CONSTANT_ND = 290, 1070
_L_INNER_PRODUCT, _L_EMBEDDING = 140, 150
_L_BRANCH, _L_LOOP = 605, 615
_SHAPE_PRESERVING = frozenset(
    {130, 160, 165, 170, 175, 180, 220, 231, 240, 245, 250, 260, 261, 600, 660, 665, 670, 680, 685,
     700, 710, 715, 720, 730, 735, 740, 750, 755, 760, 770, 775, 780, 790, 795, 1350, 1460}
)  # fmt: skip
"""Layers whose output has their (first) input's shape: activations, norms, element-wise ops."""
_UNCOUNTED_WEIGHTED = {400: "simpleRecurrent", 410: "gru", 420: "uniDirectionalLSTM",
                       430: "biDirectionalLSTM", 1040: "embeddingND", 1045: "batchedMatmul", 500: "custom"}  # fmt: skip
_FOLLOWERS = {_L_BATCHNORM: "batchnorm", _L_MVN: "mvn", _L_LAYERNORM: "layerNormalization", _L_SCALE: "scale"}

# MIL.proto DataType values counted in model_params: floating point and <= 16-bit integers.
_MIL_COUNTED = frozenset({10, 11, 12, 13, 40, 41, 21, 22, 25, 31, 32, 35, 36, 37, 38, 39})
_MIL_CONVS = {"conv": False, "conv_transpose": True}
_MIL_FOLLOWERS = {"batch_norm": "batch_norm", "instance_norm": "instance_norm", "layer_norm": "layer_norm"}


def sniff_coreml(head: bytes) -> bool:
    """True for bytes that start a CoreML ``Model``: specificationVersion, then a
    ModelDescription whose first field is an input FeatureDescription.

    (An ONNX ModelProto also starts with field 1 and field 2, but its field 2 is the producer
    name, a string, never a message starting with field 1.)"""
    if len(head) < 5 or head[0] != 0x08 or not 1 <= head[1] <= 20 or head[2] != 0x12:
        return False
    position, length = 3, 0
    for shift in range(0, 35, 7):
        if position >= len(head):
            return False
        byte = head[position]
        position += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
    return length > 0 and position < len(head) and head[position] == 0x0A


@dataclass
class _Context:
    wire: WireReader
    path: str
    convs: list[ConvNode] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    model_params: int | None = 0
    layers_seen: int = 0

    def add_params(self, count: int | None) -> None:
        self.model_params = None if self.model_params is None or count is None else self.model_params + count


# -- small field helpers --------------------------------------------------------------------------


def _varints(wire: WireReader, span: Span, number: int) -> list[int]:
    values: list[int] = []
    for num, kind, value in wire.fields(span):
        if num != number:
            continue
        if isinstance(value, int) and kind == VARINT:
            values.append(value)
        elif isinstance(value, Span) and kind == LEN:
            values.extend(wire.packed_varints(value))
    return values


def _scalar(wire: WireReader, span: Span, number: int, default: int = 0) -> int:
    values = _varints(wire, span, number)
    return values[-1] if values else default


def _spans(wire: WireReader, span: Span, number: int) -> list[Span]:
    return [
        value
        for num, kind, value in wire.fields(span)
        if num == number and kind == LEN and isinstance(value, Span)
    ]


def _strings(wire: WireReader, span: Span, number: int, what: str) -> list[str]:
    return [wire.string(value, what) for value in _spans(wire, span, number)]


def _dim(value: int, what: str) -> int:
    if value >= 2**63:
        value -= 2**64  # int64 fields are two's complement
    if value < 0:
        raise MalformedModelError(f"{what}: negative dimension {value}")
    if value > MAX_DIM:
        raise ResourceLimitError(f"{what}: dimension {value:,} is larger than the supported {MAX_DIM:,}")
    return value


# -- NeuralNetwork --------------------------------------------------------------------------------


@dataclass
class _NNLayer:
    name: str
    inputs: list[str]
    outputs: list[str]
    kind: int
    params: Span | None


def _nn_layers(ctx: _Context, network: Span) -> list[_NNLayer]:
    wire = ctx.wire
    layers: list[_NNLayer] = []
    for span in _spans(wire, network, 1):
        ctx.layers_seen += 1
        if ctx.layers_seen > MAX_LAYERS:
            raise ResourceLimitError(f"more than {MAX_LAYERS:,} layers")
        name, inputs, outputs, kind = "", [], [], 0
        params: Span | None = None
        for num, _wire_type, value in wire.fields(span):
            if not isinstance(value, Span):
                continue
            if num == 1:
                name = wire.string(value, "layer name")
            elif num == 2:
                inputs.append(wire.string(value, "layer input"))
            elif num == 3:
                outputs.append(wire.string(value, "layer output"))
            elif num >= 100:
                kind, params = num, value
        layers.append(_NNLayer(name, inputs, outputs, kind, params))
    return layers


def _input_shapes(ctx: _Context, description: Span | None) -> dict[str, MaybeShape]:
    """Model input shapes as declared (a conv takes the trailing C, *spatial dims it needs)."""
    shapes: dict[str, MaybeShape] = {}
    if description is None:
        return shapes
    wire = ctx.wire
    for feature in _spans(wire, description, 1):
        names = _strings(wire, feature, 1, "input name")
        types = _spans(wire, feature, 3)
        if not names or not types:
            continue
        shape: MaybeShape = None
        for num, _kind, value in wire.fields(types[-1]):
            if not isinstance(value, Span):
                continue
            if num == 5:  # multiArrayType
                shape = tuple(_dim(d, "input shape") for d in _varints(wire, value, 1))
            elif num == 4:  # imageType
                width, height = _scalar(wire, value, 1), _scalar(wire, value, 2)
                color = _scalar(wire, value, 3)
                channels = 1 if color in (10, 40) else 3
                shape = (channels, _dim(height, "image height"), _dim(width, "image width"))
        shapes[names[-1]] = shape
    return shapes


def _conv_spatial(
    size: tuple[Dim, ...] | None, kernel: list[int], stride: list[int], dilation: list[int], same: bool,
    pads: list[tuple[int, int]], deconv: bool, output_shape: list[int],
) -> tuple[Dim, ...] | None:  # fmt: skip
    rank = len(kernel)
    if deconv and len(output_shape) == rank:
        return tuple(output_shape)
    if size is None or len(size) != rank:
        return None
    result: list[Dim] = []
    for axis in range(rank):
        extent = size[axis]
        if extent is None:
            result.append(None)
            continue
        step = stride[axis] if axis < len(stride) and stride[axis] else 1
        dil = dilation[axis] if axis < len(dilation) and dilation[axis] else 1
        reach = dil * (kernel[axis] - 1) + 1
        begin, end = pads[axis] if axis < len(pads) else (0, 0)
        if deconv:
            result.append(max(0, (extent - 1) * step + reach - begin - end) if not same else extent * step)
        elif same:
            result.append(-(-extent // step))
        else:
            total = extent + begin + end - reach
            result.append(total // step + 1 if total >= 0 else None)
    return tuple(result)


def _nn_conv(
    ctx: _Context, layer: _NNLayer, prefix: str, in_shape: MaybeShape
) -> tuple[ConvNode, MaybeShape]:
    wire, params = ctx.wire, layer.params
    assert params is not None
    where = f"layer {quote(layer.name)}"
    if layer.kind == _L_CONV:
        out_channels = _dim(_scalar(wire, params, 1), where)
        kernel_channels = _dim(_scalar(wire, params, 2), where)
        groups = _scalar(wire, params, 10) or 1
        kernel = [_dim(k, where) for k in _varints(wire, params, 20)] or [3, 3]
        stride = _varints(wire, params, 30) or [1] * len(kernel)
        dilation = _varints(wire, params, 40) or [1] * len(kernel)
        same = bool(_spans(wire, params, 51))
        pads: list[tuple[int, int]] = []
        for valid in _spans(wire, params, 50):
            for amounts in _spans(wire, valid, 1):
                for edge in _spans(wire, amounts, 10):
                    pads.append((_scalar(wire, edge, 1), _scalar(wire, edge, 2)))
        deconv = bool(_scalar(wire, params, 60))
        has_bias = bool(_scalar(wire, params, 70))
        output_shape = [_dim(v, where) for v in _varints(wire, params, 100)]
        in_channels = kernel_channels if deconv else kernel_channels * groups
    else:
        out_channels = _dim(_scalar(wire, params, 1), where)
        in_channels = _dim(_scalar(wire, params, 2), where)
        groups = _scalar(wire, params, 10) or 1
        kernel = [_dim(_scalar(wire, params, n, 1), where) for n in (20, 21, 22)]
        stride = [_scalar(wire, params, n, 1) for n in (31, 32, 33)]
        dilation = [_scalar(wire, params, n, 1) for n in (40, 41, 42)]
        padding_type = _scalar(wire, params, 70)  # 0 custom, 1 valid, 2 same
        same = padding_type == 2
        custom = [_scalar(wire, params, n) for n in (80, 81, 82, 83, 84, 85)]
        pads = (
            [(custom[0], custom[1]), (custom[2], custom[3]), (custom[4], custom[5])]
            if padding_type == 0
            else []
        )
        deconv = bool(_scalar(wire, params, 86))
        has_bias = bool(_scalar(wire, params, 50))
        output_shape = [_dim(v, where) for v in _varints(wire, params, 87)]
        kernel_channels = in_channels if deconv else (in_channels // groups if groups else in_channels)
    if groups <= 0 or groups > MAX_DIM:
        raise MalformedModelError(f"{where}: nGroups {groups} is not a positive group count")
    if deconv:
        weight: Shape = (in_channels, out_channels // groups if out_channels % groups == 0 else None, *kernel)
    else:
        weight = (out_channels, kernel_channels, *kernel)
    spatial_in = (
        tuple(in_shape[-len(kernel) :]) if in_shape is not None and len(in_shape) > len(kernel) else None
    )
    spatial = _conv_spatial(spatial_in, kernel, stride, dilation, same, pads, deconv, output_shape)
    terms = (BiasTerm(f"{prefix}{layer.name}.bias", (out_channels,), BiasSource.CONV),) if has_bias else ()
    node = ConvNode(
        name=prefix + layer.name,
        op=("deconvolution" if deconv else "convolution") + ("3d" if layer.kind == _L_CONV3D else ""),
        weight_name=f"{prefix}{layer.name}.weights",
        weight_shape=weight,
        transposed=deconv,
        groups=groups,
        kernel_shape=tuple(kernel),
        output_spatial=spatial,
        bias_terms=terms,
    )
    ctx.add_params(shape_elements(weight))
    if has_bias:
        ctx.add_params(out_channels)
    return node, ((out_channels, *spatial) if spatial is not None else None)


def _constant_shape(ctx: _Context, layer: _NNLayer) -> MaybeShape:
    assert layer.params is not None
    dims = tuple(_dim(d, f"layer {quote(layer.name)}") for d in _varints(ctx.wire, layer.params, 1))
    return dims


def _layer_params(ctx: _Context, layer: _NNLayer) -> int | None:
    """Parameters of the non-conv layers that hold weights, from their declared sizes."""
    wire, params = ctx.wire, layer.params
    if params is None:
        return 0
    if layer.kind in (_L_LOAD_CONSTANT, _L_LOAD_CONSTANT_ND, _L_BIAS):
        return shape_elements(_constant_shape(ctx, layer)) if _spans(wire, params, 2) else 0
    if layer.kind == _L_BATCHNORM:
        return 4 * _scalar(wire, params, 1)
    if layer.kind == _L_SCALE:
        scale = shape_elements(tuple(_varints(wire, params, 1))) or 1
        bias = (shape_elements(tuple(_varints(wire, params, 4))) or 1) if _scalar(wire, params, 3) else 0
        return scale + bias
    if layer.kind in (_L_INNER_PRODUCT, _L_EMBEDDING):
        fan_in, fan_out = _scalar(wire, params, 1), _scalar(wire, params, 2)
        return fan_in * fan_out + (fan_out if _scalar(wire, params, 10) else 0)
    if layer.kind == _L_LAYERNORM:
        return 2 * (shape_elements(tuple(_varints(wire, params, 1))) or 0)
    if layer.kind in _UNCOUNTED_WEIGHTED:
        return None
    return 0


def _read_network(
    ctx: _Context, network: Span, prefix: str, shapes: dict[str, MaybeShape], outputs: set[str], depth: int
) -> None:
    if depth > MAX_NESTING:
        raise ResourceLimitError(f"networks nested deeper than {MAX_NESTING} levels")
    layers = _nn_layers(ctx, network)
    consumers: dict[str, list[int]] = {}
    for index, layer in enumerate(layers):
        for blob in layer.inputs:
            consumers.setdefault(blob, []).append(index)
    constants: dict[str, MaybeShape] = {}
    pending: list[tuple[int, ConvNode]] = []
    for index, layer in enumerate(layers):
        in_shape = shapes.get(layer.inputs[0]) if layer.inputs else None
        out_shape: MaybeShape = None
        if layer.kind in (_L_CONV, _L_CONV3D) and layer.params is not None:
            node, out_shape = _nn_conv(ctx, layer, prefix, in_shape)
            pending.append((index, node))
        else:
            count = _layer_params(ctx, layer)
            if count is None:
                ctx.warnings.append(
                    f"layer {quote(prefix + layer.name)} ({_UNCOUNTED_WEIGHTED[layer.kind]}) holds weights "
                    "whose count is not read; model parameters unknown"
                )
            ctx.add_params(count)
            if layer.kind in (_L_LOAD_CONSTANT, _L_LOAD_CONSTANT_ND):
                for blob in layer.outputs:
                    constants[blob] = _constant_shape(ctx, layer)
            elif layer.kind in _SHAPE_PRESERVING or layer.kind in (_L_ADD, _L_ADD_BROADCASTABLE):
                out_shape = in_shape
            elif layer.kind in (_L_BRANCH, _L_LOOP) and layer.params is not None:
                for number in (1, 2) if layer.kind == _L_BRANCH else (3, 4):
                    for sub in _spans(ctx.wire, layer.params, number):
                        _read_network(ctx, sub, f"{prefix}{layer.name}/", dict(shapes), outputs, depth + 1)
        for blob in layer.outputs:
            shapes[blob] = out_shape
    for index, node in pending:
        ctx.convs.append(_nn_bias(ctx, layers, index, node, consumers, constants, outputs, prefix))


def _nn_bias(
    ctx: _Context, layers: list[_NNLayer], index: int, node: ConvNode, consumers: dict[str, list[int]],
    constants: dict[str, MaybeShape], outputs: set[str], prefix: str,
) -> ConvNode:  # fmt: skip
    conv = layers[index]
    if len(conv.outputs) != 1 or conv.outputs[0] in outputs:
        return node
    users = consumers.get(conv.outputs[0], [])
    if len(users) != 1:
        return node
    user = layers[users[0]]
    term: BiasTerm | None = None
    if user.kind == _L_BIAS and user.params is not None:
        shape = _constant_shape(ctx, user)
        if shape is not None and len(shape) == 1 and shape[0] != 1:
            shape = (shape[0], 1, 1)  # a bias layer's [C] is per channel
        term = BiasTerm(prefix + user.name, shape, BiasSource.ADD)
    elif user.kind in (_L_ADD, _L_ADD_BROADCASTABLE) and len(user.inputs) == 2:
        other = user.inputs[1] if user.inputs[0] == conv.outputs[0] else user.inputs[0]
        if other in constants:
            term = BiasTerm(prefix + other, constants[other], BiasSource.ADD)
    if term is not None:
        return ConvNode(**{**node.__dict__, "bias_terms": (*node.bias_terms, term)})
    if not node.bias_terms and user.kind in _FOLLOWERS:
        return ConvNode(**{**node.__dict__, "followed_by": _FOLLOWERS[user.kind]})
    return node


# -- ML Program -------------------------------------------------------------------------------------


@dataclass
class _Op:
    type: str
    name: str
    inputs: dict[str, list[str]]
    outputs: list[tuple[str, int, MaybeShape]]
    blocks: list[Span]


def _value_type(ctx: _Context, span: Span) -> tuple[int, MaybeShape]:
    """(dataType, dims) of a ValueType that is a tensor; (0, None) otherwise."""
    wire = ctx.wire
    for tensor in _spans(wire, span, 1):
        dtype = _scalar(wire, tensor, 1)
        dims: list[Dim] = []
        for dimension in _spans(wire, tensor, 3):
            constant = _spans(wire, dimension, 1)
            dims.append(_dim(_scalar(wire, constant[-1], 1), "tensor type") if constant else None)
        return dtype, tuple(dims)
    return 0, None


def _named_value_types(ctx: _Context, spans: list[Span]) -> list[tuple[str, int, MaybeShape]]:
    result = []
    for span in spans:
        names = _strings(ctx.wire, span, 1, "value name")
        types = _spans(ctx.wire, span, 2)
        dtype, dims = _value_type(ctx, types[-1]) if types else (0, None)
        result.append((names[-1] if names else "", dtype, dims))
    return result


def _immediate_string(ctx: _Context, value: Span) -> str | None:
    wire = ctx.wire
    for immediate in _spans(wire, value, 3):
        for tensor in _spans(wire, immediate, 1):
            for strings in _spans(wire, tensor, 4):
                texts = _strings(wire, strings, 1, "string value")
                if texts:
                    return texts[0]
    return None


def _without_cast_suffix(name: str) -> str:
    """``conv1_cast_fp16`` -> ``conv1``: the converter's dtype suffixes are not part of a layer's name."""
    for suffix in ("_cast_fp16", "_cast_fp32"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _mil_ops(ctx: _Context, block: Span) -> list[_Op]:
    wire = ctx.wire
    ops: list[_Op] = []
    for span in _spans(wire, block, 3):
        ctx.layers_seen += 1
        if ctx.layers_seen > MAX_LAYERS:
            raise ResourceLimitError(f"more than {MAX_LAYERS:,} operations")
        op_type, name, inputs, outputs, blocks = "", "", {}, [], []
        for num, kind, value in wire.fields(span):
            if kind != LEN:
                continue
            assert isinstance(value, Span)
            if num == 1:
                op_type = wire.string(value, "op type")
            elif num == 2:
                keys = _strings(wire, value, 1, "input name")
                refs: list[str] = []
                for argument in _spans(wire, value, 2):
                    for binding in _spans(wire, argument, 1):
                        refs.extend(_strings(wire, binding, 1, "argument name"))
                if keys:
                    inputs[keys[-1]] = refs
            elif num == 3:
                outputs.extend(_named_value_types(ctx, [value]))
            elif num == 4:
                blocks.append(value)
            elif num == 5 and _strings(wire, value, 1, "attribute name")[-1:] == ["name"]:
                values = _spans(wire, value, 2)
                name = (_immediate_string(ctx, values[-1]) if values else None) or name
        label = name or (outputs[0][0] if outputs else op_type)
        ops.append(_Op(op_type, _without_cast_suffix(label), inputs, outputs, blocks))
    return ops


def _read_block(
    ctx: _Context, block: Span, prefix: str, types: dict[str, tuple[int, MaybeShape]], depth: int
) -> None:
    if depth > MAX_NESTING:
        raise ResourceLimitError(f"ML Program blocks nested deeper than {MAX_NESTING} levels")
    ops = _mil_ops(ctx, block)
    block_outputs = set(_strings(ctx.wire, block, 2, "block output"))
    producer: dict[str, _Op] = {}
    consumers: dict[str, list[tuple[_Op, str]]] = {}
    for op in ops:
        for name, dtype, dims in op.outputs:
            types[name] = (dtype, dims)
            producer[name] = op
        for key, refs in op.inputs.items():
            for ref in refs:
                consumers.setdefault(ref, []).append((op, key))
    constant: dict[str, bool] = {}

    def is_constant(var: str) -> bool:
        # Iterative: ops appear in topological order, so producers are settled first.
        if var in constant:
            return constant[var]
        op = producer.get(var)
        result = op is not None and (
            op.type == "const" or op.type.startswith("constexpr_")
            or (bool(op.inputs) and all(constant.get(ref, False) for refs in op.inputs.values() for ref in refs))
        )  # fmt: skip
        constant[var] = result
        return result

    for op in ops:
        for name, _dtype, _dims in op.outputs:
            is_constant(name)
    for op in ops:
        if op.type == "const" or op.type.startswith("constexpr_"):
            # Compressed weights (constexpr_*) count at their dense shape, the consts that only
            # feed them not at all.
            feeds_constexpr = all(
                user.type.startswith("constexpr_")
                for name, _d, _s in op.outputs
                for user, _k in consumers.get(name, [])
            ) and any(consumers.get(name) for name, _d, _s in op.outputs)
            if not (op.type == "const" and feeds_constexpr):
                for _name, dtype, dims in op.outputs:
                    if dtype in _MIL_COUNTED:
                        ctx.add_params(shape_elements(dims))
        for sub in op.blocks:
            _read_block(ctx, sub, f"{prefix}{op.name}/", dict(types), depth + 1)
        if op.type in _MIL_CONVS:
            ctx.convs.append(_mil_conv(ctx, op, prefix, types, producer, consumers, block_outputs, constant))


def _mil_conv(
    ctx: _Context, op: _Op, prefix: str, types: dict[str, tuple[int, MaybeShape]], producer: dict[str, _Op],
    consumers: dict[str, list[tuple[_Op, str]]], block_outputs: set[str], constant: dict[str, bool],
) -> ConvNode:  # fmt: skip
    transposed = _MIL_CONVS[op.type]
    weight_refs = op.inputs.get("weight", [])
    weight_name = weight_refs[0] if weight_refs else f"{op.name}.weight"
    weight = types.get(weight_name, (0, None))[1]
    x_refs = op.inputs.get("x", [])
    x_dims = types.get(x_refs[0], (0, None))[1] if x_refs else None
    out_name, _dtype, out_dims = op.outputs[0] if op.outputs else ("", 0, None)
    groups: int | None = None
    if weight is not None and len(weight) >= 3 and weight[1]:
        channels = (out_dims if transposed else x_dims) or ()
        total = channels[1] if len(channels) > 1 else None
        if total is not None and total % weight[1] == 0:
            groups = total // weight[1]
    terms: list[BiasTerm] = []
    bias_refs = op.inputs.get("bias", [])
    if bias_refs:
        terms.append(BiasTerm(prefix + bias_refs[0], types.get(bias_refs[0], (0, None))[1], BiasSource.CONV))
    followed_by = None
    users = consumers.get(out_name, [])
    if out_name not in block_outputs and len(users) == 1:
        user, key = users[0]
        if user.type == "add":
            others = [ref for k, refs in user.inputs.items() if k != key for ref in refs]
            if len(others) == 1 and constant.get(others[0], False):
                terms.append(BiasTerm(prefix + others[0], types.get(others[0], (0, None))[1], BiasSource.ADD))
        elif user.type in _MIL_FOLLOWERS and not terms:
            followed_by = _MIL_FOLLOWERS[user.type]
    return ConvNode(
        name=prefix + op.name,
        op=op.type,
        weight_name=prefix + weight_name,
        weight_shape=weight,
        transposed=transposed,
        groups=groups,
        kernel_shape=tuple(weight[2:]) if weight is not None else None,
        output_spatial=tuple(out_dims[2:]) if out_dims is not None and len(out_dims) > 2 else None,
        bias_terms=tuple(terms),
        followed_by=followed_by,
    )


def _read_program(ctx: _Context, program: Span) -> None:
    wire = ctx.wire
    for entry in _spans(wire, program, 2):
        names = _strings(wire, entry, 1, "function name")
        function_name = names[-1] if names else ""
        prefix = "" if function_name in ("", "main") else f"{function_name}/"
        for function in _spans(wire, entry, 2):
            opset = (_strings(wire, function, 2, "opset") or [""])[-1]
            types = {
                name: (dtype, dims)
                for name, dtype, dims in _named_value_types(ctx, _spans(wire, function, 1))
            }
            blocks: list[Span] = []
            for specialization in _spans(wire, function, 3):
                keys = _strings(wire, specialization, 1, "opset")
                if not keys or keys[-1] == opset or not blocks:
                    blocks = _spans(wire, specialization, 2) or blocks
            for block in blocks[:1]:
                _read_block(ctx, block, prefix, dict(types), 1)


# -- Model ----------------------------------------------------------------------------------------


def _read_model(ctx: _Context, model: Span, prefix: str, depth: int) -> None:
    if depth > MAX_NESTING:
        raise ResourceLimitError(f"pipelines nested deeper than {MAX_NESTING} levels")
    wire = ctx.wire
    description: Span | None = None
    found = False
    for num, kind, value in wire.fields(model):
        if kind != LEN:
            continue
        assert isinstance(value, Span)
        if num == _M_DESCRIPTION:
            description = value
        elif num in _M_NETWORKS:
            found = True
            output_names = set()
            if description is not None:
                for feature in _spans(wire, description, 10):
                    output_names.update(_strings(wire, feature, 1, "output name"))
            _read_network(ctx, value, prefix, _input_shapes(ctx, description), output_names, depth)
        elif num == _M_PROGRAM:
            found = True
            _read_program(ctx, value)
        elif num in (_M_PIPELINE, _M_PIPELINE_CLASSIFIER, _M_PIPELINE_REGRESSOR):
            found = True
            pipeline = value if num == _M_PIPELINE else (_spans(wire, value, 1) or [Span(0, 0)])[-1]
            names = _strings(wire, pipeline, 2, "pipeline model name")
            for index, sub in enumerate(_spans(wire, pipeline, 1)):
                label = names[index] if index < len(names) else f"model{index}"
                _read_model(ctx, sub, f"{prefix}{label}/", depth + 1)
    if not found and depth == 0:
        ctx.warnings.append("a CoreML model of a kind without convolutions (no neural network or ML program)")


def read_coreml(source: ByteSource, *, display: str | None = None) -> list[ModelDescription]:
    """Describe the convolutions of a CoreML ``.mlmodel`` (format ``"coreml"``)."""
    head = source.read_at(0, 64)
    if not sniff_coreml(head) and not source.name.lower().endswith(".mlmodel"):
        raise UnsupportedFormatError("not a CoreML model: the first bytes do not start a Model message")
    ctx = _Context(WireReader(source, max_bytes_read=limits.MAX_ONNX_STRIPPED_BYTES), display or source.name)
    _read_model(ctx, Span(0, source.size), "", 0)
    return [
        ModelDescription(
            path=ctx.path,
            format=FORMAT,
            convs=tuple(ctx.convs),
            model_params=ctx.model_params,
            warnings=tuple(ctx.warnings),
        )
    ]


def read_mlpackage_manifest(manifest: ByteSource) -> list[ModelDescription]:
    """Describe an ``.mlpackage`` from its ``Manifest.json``, which names the root model
    specification; that file must lie inside the package (``sibling`` refuses names that climb
    out, symlinks included), and the weights folder is never opened.  The model is reported
    under the package's path."""
    if manifest.size > limits.MAX_JSON_BYTES:
        raise ResourceLimitError(f"Manifest.json of {manifest.size:,} bytes is too large")
    parsed = parse_json_object(manifest.read_at(0, manifest.size), "Manifest.json")
    root_id = parsed.get("rootModelIdentifier")
    entries = parsed.get("itemInfoEntries")
    if (
        not isinstance(entries, dict)
        or not isinstance(root_id, str)
        or not isinstance(entries.get(root_id), dict)
    ):
        raise MalformedModelError("Manifest.json does not name its root model (rootModelIdentifier)")
    relative = entries[root_id].get("path")
    if not isinstance(relative, str) or not relative:
        raise MalformedModelError("Manifest.json's root model entry has no path")
    if relative.startswith(("/", "\\")) or ".." in relative.replace("\\", "/").split("/"):
        raise MalformedModelError(f"the root model {quote(relative)} lies outside the package")
    package = os.path.dirname(manifest.name) or "."
    try:
        source = manifest.sibling(f"Data/{relative}")
    except UnreadableFileError as error:
        if "outside" in str(error):
            raise MalformedModelError(f"the root model {quote(relative)} lies outside the package") from error
        raise
    try:
        return read_coreml(source, display=package)
    finally:
        source.close()


def read_mlpackage(folder: Path) -> list[ModelDescription]:
    """Describe an ``.mlpackage`` folder on disk (see :func:`read_mlpackage_manifest`)."""
    with LocalSource(folder / "Manifest.json") as manifest:
        return read_mlpackage_manifest(manifest)


__all__ = ["FORMAT", "read_coreml", "read_mlpackage", "read_mlpackage_manifest", "sniff_coreml"]
