"""Read an ONNX model's convolutions and their bias terms from the graph structure alone.

The file is never given to ``onnx.load``: :mod:`biasinspect.readers.protowire` walks it over an
``mmap`` and produces a copy without tensor payloads, which is parsed and run through ONNX
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
    DynamicQuantizeLinear of an initializer), source ``add``.  On the way to the ``Add``,
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
    Before it runs, model-local function expansion is counted call path by call path and a
    pre-pass (:mod:`biasinspect.readers.onnx_guard`) bounds the ranks and propagated values it
    could build; past the caps it runs without data propagation or not at all, with a warning.
    Integer and floating tensors of at most 64 elements keep their values in that copy (shape
    vectors such as Reshape targets, and Resize/Upsample scales), so output sizes can be
    computed through them; larger tensors are shapes only.  Where inference leaves a size
    unknown, a few ops (shape-preserving and broadcasting ops, Reshape, Unsqueeze, Transpose,
    ConstantOfShape, Resize/Upsample and the conv arithmetic itself) are computed here.  When every
    model input has a fixed shape yet a conv's output size stays unknown, the conv gets a note.
"""

from __future__ import annotations

from typing import Any

from biasinspect import limits
from biasinspect.errors import (
    MalformedModelError,
    ResourceLimitError,
    UnsupportedFormatError,
)
from biasinspect.model import ModelDescription
from biasinspect.readers.onnx_bias import _torch_module_path, _unique_module_names
from biasinspect.readers.onnx_core import _onnx, allow_light_onnx_import
from biasinspect.readers.onnx_params import _count_model_params
from biasinspect.readers.onnx_proto import _first_line, _nested_nodes
from biasinspect.readers.onnx_shapes import _Scope
from biasinspect.readers.onnx_walk import (
    _calls_within,
    _Context,
    _drop_doc_strings,
    _expansion,
    _function_key_of,
    _function_scope,
    _infer_bounded,
    _walk,
)
from biasinspect.readers.protowire import decode_varint, strip_model_proto
from biasinspect.source import Buffer, ByteSource, LocalSource, Location, opened

__all__ = ["_torch_module_path", "allow_light_onnx_import", "read_onnx"]
"""``read_onnx`` is the entry point; the command line calls ``allow_light_onnx_import``; tests use
``_torch_module_path``."""

# Top-level ModelProto fields and their wire types: the first field of a real ONNX file is one
# of these, which tells an ONNX file from arbitrary bytes.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}


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
    ctx.own_nodes = {key: sum(1 for _ in _nested_nodes(f.node)) for key, f in ctx.functions.items()}
    # Checked before any shape inference: onnx expands every call of every function it infers.
    main_calls = _calls_within(model.graph.node, ctx.functions)
    instances, nodes = _expansion([*main_calls, *ctx.functions], ctx.calls, ctx.own_nodes)
    if instances > limits.MAX_ONNX_FUNCTION_INSTANCES:
        raise ResourceLimitError(
            f"model-local functions expand to more than {limits.MAX_ONNX_FUNCTION_INSTANCES:,} call sites"
        )
    if nodes > limits.MAX_ONNX_WALK_NODES:
        raise ResourceLimitError(
            f"model-local functions expand to more than {limits.MAX_ONNX_WALK_NODES:,} nodes"
        )
    ctx.model = _infer_bounded(ctx, model, "")

    try:
        _analyse(ctx)
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        UnicodeError,
        ArithmeticError,
    ) as error:
        # A structure this walk did not anticipate; the file is at fault far more often than not.
        raise MalformedModelError(
            f"unexpected ONNX structure ({type(error).__name__}: {_first_line(error)})"
        ) from error
    return [
        ModelDescription(
            path=str(path),
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
