"""TFLite flatbuffers built in code with the flatbuffers runtime's Builder (schema.fbs field ids).

``tflite_model`` writes a model from plain descriptions: tensors (name, shape, type, constant?),
operators (opcode, inputs, outputs, options) and optional extra subgraphs.  Constant tensors get a
buffer with a few bytes of data (their values are never read, so the size does not matter), or,
with ``external=True``, a buffer with ``offset``/``size`` pointing past the flatbuffer, as the
converter writes models over 2 GB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import flatbuffers

FLOAT32, FLOAT16, INT32, UINT8, INT64, INT16, INT8 = 0, 1, 2, 3, 4, 7, 9

ADD, CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE, MUL, RESHAPE, CUSTOM = 0, 3, 4, 6, 18, 22, 32
SQUEEZE, TRANSPOSE_CONV, EXPAND_DIMS, DENSIFY, CONV_3D, CONV_3D_TRANSPOSE, WHILE = (
    43,
    67,
    70,
    124,
    132,
    141,
    119,
)


@dataclass
class T:
    """A tensor: name, shape, type; ``const`` gives it a buffer with data."""

    name: str
    shape: tuple[int, ...]
    type: int = FLOAT32
    const: bool = False


@dataclass
class Op:
    """An operator: builtin code (or CUSTOM with ``custom``), input/output tensor indices, and for
    DEPTHWISE_CONV_2D the depth multiplier (written into DepthwiseConv2DOptions)."""

    code: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    custom: str | None = None
    depth_multiplier: int | None = None


@dataclass
class Graph:
    tensors: list[T]
    ops: list[Op]
    name: str = "main"
    inputs: tuple[int, ...] = (0,)
    outputs: tuple[int, ...] = field(default_factory=tuple)


def _int_vector(builder: flatbuffers.Builder, values: tuple[int, ...]) -> int:
    builder.StartVector(4, len(values), 4)
    for value in reversed(values):
        builder.PrependInt32(value)
    return int(builder.EndVector())


def _offset_vector(builder: flatbuffers.Builder, offsets: list[int]) -> int:
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return int(builder.EndVector())


def tflite_model(graphs: list[Graph], *, external: bool = False, data_bytes: int = 4) -> bytes:
    """Serialize ``graphs`` (the first is the main subgraph) as a ``TFL3`` flatbuffer."""
    builder = flatbuffers.Builder(1024)
    codes: list[tuple[int, str | None]] = []
    for graph in graphs:
        for op in graph.ops:
            key = (op.code, op.custom)
            if key not in codes:
                codes.append(key)
    # Buffers: 0 is the empty sentinel; one per constant tensor after that.
    buffer_of: dict[tuple[int, int], int] = {}
    constants: list[tuple[int, int]] = []
    for graph_index, graph in enumerate(graphs):
        for tensor_index, tensor in enumerate(graph.tensors):
            if tensor.const:
                buffer_of[(graph_index, tensor_index)] = len(constants) + 1
                constants.append((graph_index, tensor_index))

    subgraph_offsets = []
    for graph_index, graph in enumerate(graphs):
        tensor_offsets = []
        for tensor_index, tensor in enumerate(graph.tensors):
            name = builder.CreateString(tensor.name)
            shape = _int_vector(builder, tensor.shape)
            builder.StartObject(4)
            builder.PrependUOffsetTRelativeSlot(0, shape, 0)
            builder.PrependInt8Slot(1, tensor.type, 0)
            builder.PrependUint32Slot(2, buffer_of.get((graph_index, tensor_index), 0), 0)
            builder.PrependUOffsetTRelativeSlot(3, name, 0)
            tensor_offsets.append(builder.EndObject())
        op_offsets = []
        for op in graph.ops:
            inputs = _int_vector(builder, op.inputs)
            outputs = _int_vector(builder, op.outputs)
            options = None
            if op.depth_multiplier is not None:
                builder.StartObject(7)
                builder.PrependInt32Slot(3, op.depth_multiplier, 0)
                options = builder.EndObject()
            builder.StartObject(5)
            builder.PrependUint32Slot(0, codes.index((op.code, op.custom)), 0)
            builder.PrependUOffsetTRelativeSlot(1, inputs, 0)
            builder.PrependUOffsetTRelativeSlot(2, outputs, 0)
            if options is not None:
                builder.PrependUint8Slot(3, 2, 0)  # BuiltinOptions.DepthwiseConv2DOptions
                builder.PrependUOffsetTRelativeSlot(4, options, 0)
            op_offsets.append(builder.EndObject())
        tensors_vector = _offset_vector(builder, tensor_offsets)
        ops_vector = _offset_vector(builder, op_offsets)
        inputs_vector = _int_vector(builder, graph.inputs)
        outputs_vector = _int_vector(builder, graph.outputs or (len(graph.tensors) - 1,))
        name = builder.CreateString(graph.name)
        builder.StartObject(5)
        builder.PrependUOffsetTRelativeSlot(0, tensors_vector, 0)
        builder.PrependUOffsetTRelativeSlot(1, inputs_vector, 0)
        builder.PrependUOffsetTRelativeSlot(2, outputs_vector, 0)
        builder.PrependUOffsetTRelativeSlot(3, ops_vector, 0)
        builder.PrependUOffsetTRelativeSlot(4, name, 0)
        subgraph_offsets.append(builder.EndObject())

    code_offsets = []
    for code, custom in codes:
        custom_offset = builder.CreateString(custom) if custom else None
        builder.StartObject(4)
        builder.PrependInt8Slot(0, min(code, 127), 0)
        if custom_offset is not None:
            builder.PrependUOffsetTRelativeSlot(1, custom_offset, 0)
        builder.PrependInt32Slot(2, 1, 0)
        builder.PrependInt32Slot(3, code, 0)
        code_offsets.append(builder.EndObject())

    # External buffers (models over 2 GB) lie after the flatbuffer: placeholders patched below.
    buffer_offsets = []
    builder.StartObject(3)
    buffer_offsets.append(builder.EndObject())
    for index, _ in enumerate(constants):
        if external:
            builder.StartObject(3)
            builder.PrependUint64Slot(1, 0xDEAD0000 + index, 0)  # placeholder patched below
            builder.PrependUint64Slot(2, data_bytes, 0)
            buffer_offsets.append(builder.EndObject())
        else:
            builder.StartVector(1, data_bytes, 16)
            for _ in range(data_bytes):
                builder.PrependByte(0)
            data = builder.EndVector()
            builder.StartObject(3)
            builder.PrependUOffsetTRelativeSlot(0, data, 0)
            buffer_offsets.append(builder.EndObject())
    subgraphs_vector = _offset_vector(builder, subgraph_offsets)
    codes_vector = _offset_vector(builder, code_offsets)
    buffers_vector = _offset_vector(builder, buffer_offsets)
    description = builder.CreateString("biasinspect test fixture")
    builder.StartObject(5)
    builder.PrependUint32Slot(0, 3, 0)
    builder.PrependUOffsetTRelativeSlot(1, codes_vector, 0)
    builder.PrependUOffsetTRelativeSlot(2, subgraphs_vector, 0)
    builder.PrependUOffsetTRelativeSlot(3, description, 0)
    builder.PrependUOffsetTRelativeSlot(4, buffers_vector, 0)
    builder.Finish(builder.EndObject(), file_identifier=b"TFL3")
    blob = bytearray(builder.Output())
    if external:
        # Pad to 16 bytes, then place each buffer's bytes; patch the placeholder offsets.
        blob.extend(b"\0" * (-len(blob) % 16))
        for index, _ in enumerate(constants):
            placeholder = (0xDEAD0000 + index).to_bytes(8, "little")
            where = bytes(blob).find(placeholder)
            assert where >= 0
            blob[where : where + 8] = len(blob).to_bytes(8, "little")
            blob.extend(b"\0" * data_bytes)
    return bytes(blob)


def single(tensors: list[T], ops: list[Op], **kwargs: object) -> bytes:
    """A one-subgraph model."""
    return tflite_model([Graph(tensors, ops)], **kwargs)  # type: ignore[arg-type]
