"""TFLite (``.tflite`` flatbuffer) reader: convs and their biases from tensor shapes only.

The flatbuffer is walked with the bounds-checked table reader in :mod:`biasinspect.readers.flatbuf`
(schema: ``tensorflow/lite/schema/schema.fbs``); buffers are never read, only whether a tensor's
buffer holds data (its data vector's length, or ``offset``/``size`` for models over 2 GB whose
buffers sit after the flatbuffer).  Nothing is run.

Convs, in every subgraph: ``CONV_2D``, ``DEPTHWISE_CONV_2D``, ``TRANSPOSE_CONV``, ``CONV_3D``,
``CONV_3D_TRANSPOSE`` and the custom ``Convolution2DTransposeBias`` (MediaPipe).  Their filters are
mapped to the neutral layout of :class:`~biasinspect.model.ConvNode`:

=====================  ===========================  ==============================
op                     TFLite filter                neutral weight shape
=====================  ===========================  ==============================
CONV_2D                ``[O, KH, KW, I]``           ``[O, I, KH, KW]``, groups = C_in / I
DEPTHWISE_CONV_2D      ``[1, KH, KW, O]``           ``[O, 1, KH, KW]``, groups = C_in
TRANSPOSE_CONV         ``[O, KH, KW, I]``           ``[I, O, KH, KW]`` (transposed)
Convolution2DTranspo-  ``[O, KH, KW, I]``           ``[I, O, KH, KW]`` (transposed)
seBias (custom)
CONV_3D                ``[KD, KH, KW, I, O]``       ``[O, I, KD, KH, KW]``, groups = C_in / I
CONV_3D_TRANSPOSE      ``[KD, KH, KW, O, I]``       ``[I, O, KD, KH, KW]`` (transposed)
=====================  ===========================  ==============================

Bias terms: the optional bias input (index 2; index 3 for ``TRANSPOSE_CONV`` and
``CONV_3D_TRANSPOSE``, whose input 0 is the output shape; -1 when absent), else an ``ADD`` of a
constant that is the conv output's only consumer (possibly after a ``SQUEEZE``/``RESHAPE``, as for
a Conv1D).  A constant may sit behind ``DEQUANTIZE`` (float16 models) or ``DENSIFY`` (sparse
kernels).  A Conv1D arrives as ``EXPAND_DIMS`` + ``CONV_2D`` and is reported with a 1-D kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from biasinspect.errors import MalformedModelError, ResourceLimitError, UnsupportedFormatError
from biasinspect.model import BiasSource, BiasTerm, ConvNode, MaybeShape, ModelDescription, Shape
from biasinspect.readers.flatbuf import PagedBytes, Table, root_table
from biasinspect.source import ByteSource

FORMAT = "tflite"
IDENTIFIER = b"TFL3"

MAX_SUBGRAPHS = 100_000
MAX_OPERATORS = 5_000_000
"""Operators walked over all subgraphs."""
MAX_TENSORS = 10_000_000
"""Tensors per subgraph."""
MAX_BUFFERS = 10_000_000
MAX_RANK = 64
MAX_OP_INPUTS = 100_000
_FOLLOW_STEPS = 16
"""Steps followed through DEQUANTIZE/DENSIFY/SQUEEZE chains (a cycle cannot trap the walk)."""

# BuiltinOperator codes (schema.fbs).
ADD = 0
CONV_2D = 3
DEPTHWISE_CONV_2D = 4
DEQUANTIZE = 6
MUL = 18
RESHAPE = 22
CUSTOM = 32
SQUEEZE = 43
TRANSPOSE_CONV = 67
EXPAND_DIMS = 70
QUANTIZE = 114
DENSIFY = 124
CONV_3D = 132
CONV_3D_TRANSPOSE = 141

_OP_NAMES = {
    CONV_2D: "CONV_2D",
    DEPTHWISE_CONV_2D: "DEPTHWISE_CONV_2D",
    TRANSPOSE_CONV: "TRANSPOSE_CONV",
    CONV_3D: "CONV_3D",
    CONV_3D_TRANSPOSE: "CONV_3D_TRANSPOSE",
}
CUSTOM_TRANSPOSED_CONVS = frozenset({"Convolution2DTransposeBias"})
"""Custom ops with TRANSPOSE_CONV's filter layout and their bias at input 2 (MediaPipe)."""

# TensorType codes (schema.fbs) and what model_params does with them.
_TENSOR_TYPES = {
    0: "float32",
    1: "float16",
    2: "int32",
    3: "uint8",
    4: "int64",
    5: "string",
    6: "bool",
    7: "int16",
    8: "complex64",
    9: "int8",
    10: "float64",
    11: "complex128",
    12: "uint64",
    13: "resource",
    14: "variant",
    15: "uint32",
    16: "uint16",
    17: "int4",
    18: "bfloat16",
}
_PARAMETER_TYPES = frozenset(
    {"float32", "float16", "float64", "bfloat16", "complex64", "complex128", "int8", "uint8", "int16", "int4"}
)
"""Constant types that always count: floating weights and quantized (8/16/4-bit) weights."""

# Field indices (schema.fbs).
_MODEL_OPERATOR_CODES, _MODEL_SUBGRAPHS, _MODEL_BUFFERS = 1, 2, 4
_CODE_DEPRECATED, _CODE_CUSTOM, _CODE_BUILTIN = 0, 1, 3
_SUBGRAPH_TENSORS, _SUBGRAPH_OPERATORS, _SUBGRAPH_NAME = 0, 3, 4
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_BUFFER, _TENSOR_NAME = 0, 1, 2, 3
_OP_OPCODE, _OP_INPUTS, _OP_OUTPUTS = 0, 1, 2
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2


def sniff_tflite(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes) carries the TFLite file identifier."""
    return len(head) >= 8 and head[4:8] == IDENTIFIER


@dataclass
class _Tensor:
    shape: MaybeShape
    dtype: str
    constant: bool
    name: str


@dataclass
class _Op:
    index: int
    code: int
    custom: str | None
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    table: Table


@dataclass
class _Graph:
    name: str
    tensors: list[_Tensor]
    ops: list[_Op]
    producer: dict[int, _Op] = field(default_factory=dict)
    consumers: dict[int, list[_Op]] = field(default_factory=dict)


def read_tflite(source: ByteSource) -> list[ModelDescription]:
    """Read a ``.tflite`` flatbuffer into one :class:`ModelDescription` (all subgraphs)."""
    buf = PagedBytes(source)
    if buf.size < 8 or not sniff_tflite(buf.read(0, 8)):
        raise UnsupportedFormatError("not a TFLite model: no 'TFL3' file identifier")
    try:
        return [_read_model(source.name, buf)]
    except RecursionError as error:
        raise MalformedModelError("flatbuffer nested too deeply") from error


def _read_model(name: str, buf: PagedBytes) -> ModelDescription:
    model = root_table(buf)
    codes = [_operator_code(code) for code in model.tables(_MODEL_OPERATOR_CODES, 1_000_000)]
    constant_buffers = _constant_buffers(model, buf.size)
    subgraph_count = model.table_count(_MODEL_SUBGRAPHS)
    if subgraph_count == 0:
        raise MalformedModelError("TFLite model has no subgraphs")
    if subgraph_count > MAX_SUBGRAPHS:
        raise ResourceLimitError(f"TFLite model has {subgraph_count:,} subgraphs (cap {MAX_SUBGRAPHS:,})")
    convs: list[ConvNode] = []
    warnings: list[str] = []
    model_params = 0
    operators_seen = 0
    for graph_index, subgraph in enumerate(model.tables(_MODEL_SUBGRAPHS, MAX_SUBGRAPHS)):
        graph = _read_graph(subgraph, graph_index, codes, constant_buffers, operators_seen)
        operators_seen += len(graph.ops)
        prefix = "" if subgraph_count == 1 else f"{graph.name}/"
        for op in graph.ops:
            node = _conv_node(graph, op, prefix, warnings)
            if node is not None:
                convs.append(node)
        model_params += _graph_params(graph)
    return ModelDescription(
        path=name, format=FORMAT, convs=tuple(convs), model_params=model_params, warnings=tuple(warnings)
    )


def _operator_code(table: Table) -> tuple[int, str | None]:
    # Codes >= 127 live only in builtin_code; older files have only deprecated_builtin_code.
    code = max(table.integer(_CODE_DEPRECATED, "b"), table.integer(_CODE_BUILTIN, "i"))
    return code, table.string(_CODE_CUSTOM, 256)


def _constant_buffers(model: Table, file_size: int) -> list[bool]:
    constant: list[bool] = []
    for index, buffer in enumerate(model.tables(_MODEL_BUFFERS, MAX_BUFFERS)):
        data_length = buffer.vector_length(_BUFFER_DATA) or 0
        offset = buffer.integer(_BUFFER_OFFSET, "Q")
        size = buffer.integer(_BUFFER_SIZE, "Q")
        if offset > 1 and offset + size > file_size:
            raise MalformedModelError(
                f"buffer {index} lies at {offset:,} (+{size:,} bytes), past the end of the file "
                f"({file_size:,} bytes; truncated?)"
            )
        if data_length and data_length > file_size:
            raise MalformedModelError(f"buffer {index} claims {data_length:,} bytes, more than the file")
        constant.append(data_length > 0 or (offset > 1 and size > 0))
    return constant


def _read_graph(
    subgraph: Table, graph_index: int, codes: list[tuple[int, str | None]], constant: list[bool], seen: int
) -> _Graph:
    name = subgraph.string(_SUBGRAPH_NAME, 256) or f"subgraph{graph_index}"
    tensors: list[_Tensor] = []
    for tensor_index, tensor in enumerate(subgraph.tables(_SUBGRAPH_TENSORS, MAX_TENSORS)):
        raw_shape = tensor.scalars(_TENSOR_SHAPE, "i", MAX_RANK)
        shape: MaybeShape = (
            None if raw_shape is None else tuple(dim if dim >= 0 else None for dim in raw_shape)
        )
        type_code = tensor.integer(_TENSOR_TYPE, "b")
        buffer_index = tensor.integer(_TENSOR_BUFFER, "I")
        if buffer_index >= max(len(constant), 1):
            raise MalformedModelError(
                f"tensor {tensor_index} of {name} names buffer {buffer_index}, but the model has "
                f"{len(constant)} buffers"
            )
        tensors.append(
            _Tensor(
                shape=shape,
                dtype=_TENSOR_TYPES.get(type_code, f"type{type_code}"),
                constant=buffer_index > 0 and constant[buffer_index],
                name=tensor.string(_TENSOR_NAME) or f"tensor{tensor_index}",
            )
        )
    operator_count = subgraph.table_count(_SUBGRAPH_OPERATORS)
    if seen + operator_count > MAX_OPERATORS:
        raise ResourceLimitError(f"TFLite model has more than {MAX_OPERATORS:,} operators")
    graph = _Graph(name=name, tensors=tensors, ops=[])
    for op_index, table in enumerate(subgraph.tables(_SUBGRAPH_OPERATORS, MAX_OPERATORS)):
        code_index = table.integer(_OP_OPCODE, "I")
        if code_index >= len(codes):
            raise MalformedModelError(
                f"operator {op_index} of {name} uses opcode {code_index}, but the model has {len(codes)}"
            )
        inputs = table.scalars(_OP_INPUTS, "i", MAX_OP_INPUTS) or ()
        outputs = table.scalars(_OP_OUTPUTS, "i", MAX_OP_INPUTS) or ()
        for tensor_index in (*inputs, *outputs):
            if tensor_index < -1 or tensor_index >= len(tensors):
                raise MalformedModelError(
                    f"operator {op_index} of {name} uses tensor {tensor_index}, but the subgraph has "
                    f"{len(tensors)}"
                )
        code, custom = codes[code_index]
        op = _Op(op_index, code, custom if code == CUSTOM else None, inputs, outputs, table)
        graph.ops.append(op)
        for tensor_index in outputs:
            if tensor_index >= 0:
                graph.producer.setdefault(tensor_index, op)
        for tensor_index in set(inputs):
            if tensor_index >= 0:
                graph.consumers.setdefault(tensor_index, []).append(op)
    return graph


def _input(op: _Op, position: int) -> int:
    return op.inputs[position] if position < len(op.inputs) else -1


def _constant_source(graph: _Graph, tensor_index: int) -> int | None:
    """The constant tensor behind ``tensor_index`` (through DEQUANTIZE/DENSIFY/RESHAPE), or None."""
    current = tensor_index
    for _ in range(_FOLLOW_STEPS):
        if graph.tensors[current].constant:
            return current
        producer = graph.producer.get(current)
        if producer is None or producer.code not in (DEQUANTIZE, DENSIFY, RESHAPE, QUANTIZE):
            return None
        current = _input(producer, 0)
        if current < 0:
            return None
    return None


def _conv_node(graph: _Graph, op: _Op, prefix: str, warnings: list[str]) -> ConvNode | None:
    if op.code in _OP_NAMES:
        op_name = _OP_NAMES[op.code]
    elif op.code == CUSTOM and op.custom in CUSTOM_TRANSPOSED_CONVS:
        op_name = op.custom
    else:
        if op.code == CUSTOM and op.custom and "conv" in op.custom.lower():
            warnings.append(
                f"custom op {op.custom!r} (operator {op.index}) is not analysed: its layout is unknown"
            )
        return None
    transposed = op.code in (TRANSPOSE_CONV, CONV_3D_TRANSPOSE) or op.code == CUSTOM
    data_position, weight_position = (2, 1) if op.code in (TRANSPOSE_CONV, CONV_3D_TRANSPOSE) else (0, 1)
    bias_position = 3 if op.code in (TRANSPOSE_CONV, CONV_3D_TRANSPOSE) else 2
    weight_index = _input(op, weight_position)
    output_index = op.outputs[0] if op.outputs and op.outputs[0] >= 0 else -1
    name = prefix + _layer_name(graph, op, output_index, weight_index)
    if weight_index < 0:
        raise MalformedModelError(f"{op_name} operator {op.index} ({name}) has no filter input")
    weight = graph.tensors[weight_index]
    data_index = _input(op, data_position)
    data_shape = graph.tensors[data_index].shape if data_index >= 0 else None
    output_shape = graph.tensors[output_index].shape if output_index >= 0 else None
    notes: list[str] = []
    layout = _neutral_layout(op, weight.shape, data_shape)
    if layout is None:
        notes.append(f"{name}: filter shape {list(weight.shape or [])} does not fit {op_name}'s layout")
        weight_shape: MaybeShape = None
        groups: int | None = None
    else:
        weight_shape, groups = layout
    spatial_rank = 3 if op.code in (CONV_3D, CONV_3D_TRANSPOSE) else 2
    output_spatial = _spatial(output_shape, spatial_rank)
    one_d_axis = _expanded_axis(graph, data_index) if op.code in (CONV_2D, DEPTHWISE_CONV_2D) else None
    if one_d_axis is not None and weight_shape is not None and weight_shape[2 + one_d_axis] == 1:
        # A Conv1D: EXPAND_DIMS inserted a unit spatial axis; report the conv in one dimension.
        weight_shape = weight_shape[:2] + tuple(d for i, d in enumerate(weight_shape[2:]) if i != one_d_axis)
        if output_spatial is not None:
            output_spatial = tuple(d for i, d in enumerate(output_spatial) if i != one_d_axis)
        spatial_rank = 1
    terms: list[BiasTerm] = []
    bias_index = _input(op, bias_position)
    if bias_index >= 0:
        bias = graph.tensors[bias_index]
        terms.append(BiasTerm(bias.name, bias.shape, BiasSource.CONV))
    followed_by = None
    added = _added_constant(graph, output_index, spatial_rank)
    if added is not None:
        terms.append(added)
    elif not terms:
        followed_by = _follower(graph, output_index)
    return ConvNode(
        name=name,
        op=op_name,
        weight_name=weight.name,
        weight_shape=weight_shape,
        transposed=transposed,
        groups=groups,
        kernel_shape=None if weight_shape is None else tuple(weight_shape[2:]),
        output_spatial=output_spatial,
        bias_terms=tuple(terms),
        followed_by=followed_by,
        notes=tuple(notes),
    )


_NAME_SUFFIXES = {
    CONV_2D: ("/Conv2D", "/convolution", "/Conv1D", "/conv1d", "/BiasAdd"),
    DEPTHWISE_CONV_2D: ("/depthwise", "/BiasAdd"),
    TRANSPOSE_CONV: ("conv2d_transpose", "conv1d_transpose", "/BiasAdd"),
    CONV_3D: ("/Conv3D", "/BiasAdd"),
    CONV_3D_TRANSPOSE: ("conv3d_transpose", "/BiasAdd"),
}
"""How the TF ops a conv was converted from end their names (``model/conv/Conv2D``)."""


def _layer_name(graph: _Graph, op: _Op, output_index: int, weight_index: int) -> str:
    """The converter's name for the conv: the part of a fused tensor name (``a/conv/Relu;
    a/conv/BiasAdd;a/conv/Conv2D``) that names the conv's own TF op, from the filter's name first
    (the output's name also lists folded neighbours), else the output's first part."""
    suffixes = _NAME_SUFFIXES.get(op.code, ())
    weight_source = _constant_source(graph, weight_index) if weight_index >= 0 else None
    candidates = [
        index for index in (weight_index, weight_source, output_index) if index is not None and index >= 0
    ]
    for index in candidates:
        for part in graph.tensors[index].name.split(";"):
            if part.endswith(suffixes):
                return part
    if output_index >= 0:
        first = graph.tensors[output_index].name.split(";")[0]
        if first:
            return first
    return f"operator{op.index}"


def _neutral_layout(op: _Op, weight: MaybeShape, data: MaybeShape) -> tuple[Shape, int | None] | None:
    """The filter in [C_out, C_in/groups, *kernel] (transposed: [C_in, C_out, *kernel]) and groups."""
    if weight is None:
        return None
    data_channels = data[-1] if data is not None and len(data) >= 1 else None
    if op.code in (CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV) or op.code == CUSTOM:
        if len(weight) != 4:
            return None
        out_channels, kh, kw, per_group = weight
        if op.code == DEPTHWISE_CONV_2D:
            options = op.table.table(4)  # DepthwiseConv2DOptions
            multiplier = options.integer(3, "i", 1) if options is not None else None
            channels = data_channels
            if channels is None and multiplier and per_group is not None:
                channels = per_group // multiplier if per_group % multiplier == 0 else None
            return (per_group, 1, kh, kw), channels
        if op.code == CONV_2D:
            return (out_channels, per_group, kh, kw), _groups(data_channels, per_group)
        return (per_group, out_channels, kh, kw), 1
    if len(weight) != 5:
        return None
    kd, kh, kw, fourth, fifth = weight
    if op.code == CONV_3D:
        return (fifth, fourth, kd, kh, kw), _groups(data_channels, fourth)
    return (fifth, fourth, kd, kh, kw), 1


def _groups(data_channels: int | None, per_group: int | None) -> int | None:
    if data_channels is None or per_group is None or per_group <= 0 or data_channels % per_group:
        return None
    return data_channels // per_group


def _spatial(shape: MaybeShape, rank: int) -> MaybeShape:
    if shape is None or len(shape) != rank + 2:
        return None
    return tuple(shape[1:-1])


def _expanded_axis(graph: _Graph, data_index: int) -> int | None:
    """For a conv input made by EXPAND_DIMS of a rank-3 [N, W, C] tensor: the spatial axis (0 or 1)
    that was inserted, found by comparing shapes (the axis constant is not read)."""
    if data_index < 0:
        return None
    producer = graph.producer.get(data_index)
    if producer is None or producer.code != EXPAND_DIMS:
        return None
    source = _input(producer, 0)
    before = graph.tensors[source].shape if source >= 0 else None
    after = graph.tensors[data_index].shape
    if before is None or after is None or len(before) != 3 or len(after) != 4:
        return None
    for axis in (1, 2):
        if after[axis] == 1 and after[:axis] + after[axis + 1 :] == before:
            return axis - 1
    return None


def _single_consumer(graph: _Graph, tensor_index: int) -> _Op | None:
    consumers = graph.consumers.get(tensor_index, [])
    return consumers[0] if len(consumers) == 1 else None


def _added_constant(graph: _Graph, output_index: int, spatial_rank: int) -> BiasTerm | None:
    """A constant ADDed to the conv output (its only consumer, possibly after SQUEEZE/RESHAPE)."""
    current = output_index
    for _ in range(_FOLLOW_STEPS):
        if current < 0:
            return None
        consumer = _single_consumer(graph, current)
        if consumer is None:
            return None
        if consumer.code in (SQUEEZE, RESHAPE) and consumer.outputs:
            current = consumer.outputs[0]
            continue
        if consumer.code != ADD:
            return None
        others = [index for index in consumer.inputs if index != current]
        if len(others) != 1 or others[0] < 0:
            return None
        constant = _constant_source(graph, others[0])
        if constant is None:
            return None
        operand = graph.tensors[others[0]]
        return BiasTerm(operand.name, _channels_first(operand.shape, spatial_rank), BiasSource.ADD)
    return None


def _channels_first(shape: MaybeShape, spatial_rank: int) -> MaybeShape:
    """An operand shape broadcast against the NHWC-style output [N, *spatial, C], rewritten in the
    conv output's [N, C, *spatial] layout (what :mod:`biasinspect.analysis` aligns against)."""
    if shape is None:
        return None
    rank = spatial_rank + 2
    if len(shape) > rank:
        return tuple(shape)
    padded: Sequence[int | None] = (1,) * (rank - len(shape)) + tuple(shape)
    batch, channels_first = padded[0], (padded[-1], *padded[1:-1])
    return channels_first if batch == 1 else (batch, *channels_first)


def _follower(graph: _Graph, output_index: int) -> str | None:
    """``MUL`` or ``MUL+ADD`` by constants right after a bias-free conv (an unfolded norm)."""
    consumer = _single_consumer(graph, output_index) if output_index >= 0 else None
    if consumer is None or consumer.code != MUL or not consumer.outputs:
        return None
    if not any(
        index != output_index and index >= 0 and _constant_source(graph, index) is not None
        for index in consumer.inputs
    ):
        return None
    after = _single_consumer(graph, consumer.outputs[0])
    if after is not None and after.code == ADD:
        return "MUL+ADD"
    return "MUL"


def _graph_params(graph: _Graph) -> int:
    """Elements of the subgraph's constant tensors that are parameters (see the README's rule)."""
    int32_biases: set[int] = set()
    for op in graph.ops:
        if op.code in (CONV_2D, DEPTHWISE_CONV_2D, CONV_3D) or (
            op.code == CUSTOM and op.custom in CUSTOM_TRANSPOSED_CONVS
        ):
            int32_biases.add(_input(op, 2))
        elif op.code in (TRANSPOSE_CONV, CONV_3D_TRANSPOSE):
            int32_biases.add(_input(op, 3))
        elif op.code in (9, DEQUANTIZE):  # FULLY_CONNECTED's bias; a dequantized constant
            int32_biases.add(_input(op, 2) if op.code == 9 else _input(op, 0))
    total = 0
    for index, tensor in enumerate(graph.tensors):
        if not tensor.constant or tensor.shape is None or any(dim is None for dim in tensor.shape):
            continue
        if tensor.dtype in _PARAMETER_TYPES or (tensor.dtype in ("int32", "int64") and index in int32_biases):
            count = 1
            for dim in tensor.shape:
                count *= dim or 0
            total += count
    return total


__all__ = ["CUSTOM_TRANSPOSED_CONVS", "FORMAT", "read_tflite", "sniff_tflite"]
