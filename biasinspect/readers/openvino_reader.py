"""Read an OpenVINO IR model (``.xml`` + ``.bin``) from its XML alone; the ``.bin`` is never opened.

The IR is a graph of ``<layer>`` elements joined by ``<edge>`` elements; every port lists its
dims, and every ``Const`` declares its ``element_type`` and ``shape``, so shapes and parameter
counts come from the XML.  Convolutions are ``Convolution``, ``GroupConvolution``,
``ConvolutionBackpropData``, ``GroupConvolutionBackpropData``, ``BinaryConvolution`` and
``DeformableConvolution``, in the main graph and in every ``TensorIterator``/``Loop`` body and
``If`` branch.  OpenVINO convolutions have no bias input: the bias is the other operand of an
``Add`` that is the conv output's only consumer, when that operand is computed from constants
alone (a ``Const``, possibly behind ``Convert`` for FP16-compressed IR, ``FakeQuantize``, or a
``Convert``/``Subtract``/``Multiply`` dequantization subgraph).  Its shape is the Add's input
port dims, already in the conv output's ``[N, C, *spatial]`` layout: ``[1, C, 1, 1]`` is tied,
``[1, C, H, W]`` untied.

The XML comes from strangers: it is parsed with :mod:`defusedxml` with DTDs refused outright, so
no entity is ever expanded and no external resource is ever fetched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from biasinspect import limits
from biasinspect.errors import MalformedModelError, ResourceLimitError, UnsupportedFormatError
from biasinspect.model import BiasSource, BiasTerm, ConvNode, Dim, MaybeShape, ModelDescription, Shape
from biasinspect.readers.files import quote
from biasinspect.source import ByteSource

FORMAT = "openvino"

_CONV_TYPES: dict[str, tuple[bool, bool, int]] = {
    # type: (transposed, grouped weights [G, ...], weight input port index)
    "Convolution": (False, False, 1),
    "BinaryConvolution": (False, False, 1),
    "GroupConvolution": (False, True, 1),
    "ConvolutionBackpropData": (True, False, 1),
    "GroupConvolutionBackpropData": (True, True, 1),
    "DeformableConvolution": (False, False, 2),
}

_PASS_THROUGH = frozenset(
    {"Convert", "Reshape", "Unsqueeze", "Squeeze", "FakeQuantize", "Multiply", "Subtract", "Broadcast"}
)
"""Steps between a Const and the tensor a conv or bias Add consumes (decompression, dequantization
and reshapes); the traced name is the Const's, the shape is the consuming port's."""

_SOURCE_TYPES = frozenset({"Parameter", "ReadValue"})
"""Layers whose output is not a constant even though they have no inputs."""

_FOLLOWER_TYPES = {
    "BatchNormInference": "BatchNormInference",
    "MVN": "MVN",
    "GroupNormalization": "GroupNormalization",
    "NormalizeL2": "NormalizeL2",
}

_COUNTED_ELEMENT_TYPES = frozenset(
    {"f64", "f32", "f16", "bf16", "f8e4m3", "f8e5m2", "f8e8m0", "f4e2m1", "nf4",
     "i16", "u16", "i8", "u8", "i4", "u4", "u2", "u3", "u6", "u1"}
)  # fmt: skip
"""Const element types counted in ``model_params``: floating point and the small integer types
OpenVINO stores quantized or compressed weights in.  i32/i64/u32/u64 (shapes, axes, indices) and
boolean never count."""

MAX_BODY_DEPTH = 32
"""Deepest nesting of TensorIterator/Loop/If bodies followed."""

MAX_DIM = 2**40
"""Largest single dimension accepted; larger ones are refused as unsupported."""

MAX_ELEMENTS = 2**60
"""Largest element count of one tensor accepted."""

_TRACE_STEPS = 64

_HEAD_PATTERN = re.compile(
    rb"\A(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]{0,200}\?>\s*)?(?:<!--.*?-->\s*)*"
    rb"(?:<net[\s>/]|<!DOCTYPE\s+net[\s>\[])",
    re.DOTALL,
)


def sniff_openvino(head: bytes) -> bool:
    """True when the first bytes are XML whose root element is an OpenVINO ``<net>``."""
    return _HEAD_PATTERN.match(head) is not None


@dataclass
class _Layer:
    id: str
    name: str
    type: str
    data: dict[str, str]
    inputs: dict[str, MaybeShape] = field(default_factory=dict)
    outputs: dict[str, MaybeShape] = field(default_factory=dict)
    input_order: list[str] = field(default_factory=list)


@dataclass
class _Graph:
    layers: dict[str, _Layer]
    producer: dict[tuple[str, str], tuple[str, str]]
    consumers: dict[tuple[str, str], list[tuple[str, str]]]
    prefix: str


def _parse_xml(raw: bytes, where: str) -> Any:
    try:
        from defusedxml import DefusedXmlException
        from defusedxml.ElementTree import ParseError, fromstring
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise UnsupportedFormatError(
            "reading OpenVINO IR needs defusedxml: pip install defusedxml"
        ) from error
    try:
        return fromstring(raw, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as error:
        raise MalformedModelError(
            f"{where}: XML with a DTD, entities or external references is refused ({type(error).__name__})"
        ) from error
    except ParseError as error:
        line, column = getattr(error, "position", (0, 0))
        raise MalformedModelError(
            f"{where}: XML is not well-formed (line {line}, column {column})"
        ) from error


def _dim(text: str | None, where: str) -> Dim:
    value = (text or "").strip()
    if not value or not value.lstrip("-").isdigit():
        return None  # "?", "-1", "1..10": dynamic
    if len(value) > 20:
        raise ResourceLimitError(f"{where}: dimension of {len(value)} digits is unsupported")
    number = int(value)
    if number < 0:
        return None
    if number > MAX_DIM:
        raise ResourceLimitError(f"{where}: dimension {number:,} is larger than the supported {MAX_DIM:,}")
    return number


def _port_shape(port: Any, where: str) -> Shape:
    dims = port.findall("dim")
    if len(dims) > 64:
        raise ResourceLimitError(f"{where}: rank {len(dims)} is unsupported")
    return tuple(_dim(dim.text, where) for dim in dims)


def _const_elements(layer: _Layer) -> int | None:
    text = layer.data.get("shape")
    if text is None:
        shape: MaybeShape = layer.outputs.get(next(iter(layer.outputs), ""), None)
    else:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        shape = tuple(_dim(part, f"Const {quote(layer.name)}") for part in parts)
    if shape is None:
        return None
    count = 1
    for dim in shape:
        if dim is None:
            return None
        count *= dim
        if count > MAX_ELEMENTS:
            raise ResourceLimitError(f"Const {quote(layer.name)} holds more than {MAX_ELEMENTS:,} elements")
    return count


def _graphs(root: Any) -> Iterator[tuple[Any, str]]:
    """The main graph and every body, depth first, each with a name prefix for its layers."""
    pending: list[tuple[Any, str, int]] = [(root, "", 0)]
    while pending:
        element, prefix, depth = pending.pop()
        yield element, prefix
        layers = element.find("layers")
        if layers is None:
            continue
        for layer in layers.findall("layer"):
            for child in layer:
                if child.tag.endswith("body") and child.find("layers") is not None:
                    if depth + 1 > MAX_BODY_DEPTH:
                        raise ResourceLimitError(
                            f"subgraph bodies nested deeper than {MAX_BODY_DEPTH} levels"
                        )
                    name = f"{prefix}{layer.get('name', layer.get('id', '?'))}/{child.tag}/"
                    pending.append((child, name, depth + 1))


def _read_graph(element: Any, prefix: str) -> _Graph:
    layers: dict[str, _Layer] = {}
    container = element.find("layers")
    for node in container.findall("layer") if container is not None else []:
        layer_id = node.get("id")
        if layer_id is None:
            raise MalformedModelError(f"{prefix or 'graph'}: a layer has no id")
        name = node.get("name", layer_id)
        where = f"layer {quote(name)}"
        data_element = node.find("data")
        layer = _Layer(
            id=layer_id,
            name=name,
            type=node.get("type", ""),
            data=dict(data_element.attrib) if data_element is not None else {},
        )
        for side, ports in (("input", layer.inputs), ("output", layer.outputs)):
            group = node.find(side)
            for port in group.findall("port") if group is not None else []:
                port_id = port.get("id", "")
                ports[port_id] = _port_shape(port, where)
                if side == "input":
                    layer.input_order.append(port_id)
        if layer_id in layers:
            raise MalformedModelError(f"{prefix or 'graph'}: two layers have id {quote(layer_id)}")
        layers[layer_id] = layer
    producer: dict[tuple[str, str], tuple[str, str]] = {}
    consumers: dict[tuple[str, str], list[tuple[str, str]]] = {}
    edges = element.find("edges")
    for edge in edges.findall("edge") if edges is not None else []:
        source = (edge.get("from-layer", ""), edge.get("from-port", ""))
        target = (edge.get("to-layer", ""), edge.get("to-port", ""))
        if source[0] not in layers or target[0] not in layers:
            raise MalformedModelError(f"{prefix or 'graph'}: an edge names a layer that does not exist")
        producer[target] = source
        consumers.setdefault(source, []).append(target)
    return _Graph(layers, producer, consumers, prefix)


class _Constness:
    """Which layers compute a constant (from Consts alone), memoised, without recursion."""

    def __init__(self, graph: _Graph) -> None:
        self.graph = graph
        self.known: dict[str, bool] = {}

    def is_constant(self, layer_id: str) -> bool:
        stack = [layer_id]
        on_stack: set[str] = set()
        while stack:
            current = stack[-1]
            if current in self.known:
                stack.pop()
                continue
            layer = self.graph.layers[current]
            if layer.type == "Const":
                self.known[current] = True
                stack.pop()
                continue
            if layer.type in _SOURCE_TYPES or not layer.input_order:
                self.known[current] = False
                stack.pop()
                continue
            sources = [self.graph.producer.get((current, port)) for port in layer.input_order]
            if any(source is None for source in sources):
                self.known[current] = False
                stack.pop()
                continue
            pending = [s[0] for s in sources if s is not None and s[0] not in self.known]
            if pending and current not in on_stack:
                on_stack.add(current)
                stack.extend(p for p in pending if p not in on_stack)
                continue
            # A cycle (pending ids already on the stack) is not a constant.
            self.known[current] = all(
                self.known.get(source[0], False) for source in sources if source is not None
            )
            stack.pop()
        return self.known[layer_id]


def _trace_const(graph: _Graph, target: tuple[str, str]) -> _Layer | None:
    """The Const behind an input port, through decompression/dequantization steps (data input)."""
    source = graph.producer.get(target)
    for _ in range(_TRACE_STEPS):
        if source is None:
            return None
        layer = graph.layers[source[0]]
        if layer.type == "Const":
            return layer
        if layer.type not in _PASS_THROUGH or not layer.input_order:
            return None
        source = graph.producer.get((layer.id, layer.input_order[0]))
    return None


def _weight_shape(dims: MaybeShape, transposed: bool, grouped: bool) -> tuple[MaybeShape, int | None]:
    """The weight in the framework-neutral layout ([C_out, C_in/g, *k]; transposed [C_in, C_out/g, *k])
    and the group count."""
    if dims is None:
        return None, None
    if not grouped:
        return dims, 1
    if len(dims) < 3:
        return None, None
    groups, first, second, *kernel = dims
    merged = None if groups is None or first is None else groups * first
    return (merged, second, *kernel), groups


def _follower(graph: _Graph, consumers: list[tuple[str, str]], constness: _Constness) -> str | None:
    if len(consumers) != 1:
        return None
    layer = graph.layers[consumers[0][0]]
    if layer.type in _FOLLOWER_TYPES:
        return _FOLLOWER_TYPES[layer.type]
    if layer.type == "Multiply" and _other_operand_constant(graph, layer, consumers[0][1], constness):
        after = graph.consumers.get((layer.id, next(iter(layer.outputs), "")), [])
        if len(after) == 1:
            add = graph.layers[after[0][0]]
            if add.type == "Add" and _other_operand_constant(graph, add, after[0][1], constness):
                return "Multiply+Add"
    return None


def _other_port(layer: _Layer, port: str) -> str | None:
    others = [p for p in layer.input_order if p != port]
    return others[0] if len(others) == 1 else None


def _other_operand_constant(graph: _Graph, layer: _Layer, port: str, constness: _Constness) -> bool:
    other = _other_port(layer, port)
    if other is None:
        return False
    source = graph.producer.get((layer.id, other))
    return source is not None and constness.is_constant(source[0])


def _conv_node(graph: _Graph, layer: _Layer, constness: _Constness, warnings: list[str]) -> ConvNode:
    transposed, grouped, weight_index = _CONV_TYPES[layer.type]
    name = graph.prefix + layer.name.removesuffix("/WithoutBiases")
    if len(layer.input_order) <= weight_index:
        raise MalformedModelError(f"{layer.type} layer {quote(layer.name)} has no weight input")
    weight_port = layer.input_order[weight_index]
    weight_dims, groups = _weight_shape(layer.inputs.get(weight_port), transposed, grouped)
    if layer.type == "DeformableConvolution":
        group_text = layer.data.get("group", "1")
        groups = _dim(group_text, f"layer {quote(layer.name)}") if group_text.isdigit() else None
    const = _trace_const(graph, (layer.id, weight_port))
    weight_name = const.name if const is not None else f"{layer.name}:weights"
    output_port = next(iter(layer.outputs), None)
    output_dims = layer.outputs.get(output_port) if output_port is not None else None
    output_spatial = tuple(output_dims[2:]) if output_dims is not None and len(output_dims) > 2 else None
    kernel = tuple(weight_dims[2:]) if weight_dims is not None else None
    consumers = graph.consumers.get((layer.id, output_port or ""), [])
    terms: list[BiasTerm] = []
    if len(consumers) == 1:
        add = graph.layers[consumers[0][0]]
        other = _other_port(add, consumers[0][1]) if add.type == "Add" else None
        source = graph.producer.get((add.id, other)) if other is not None else None
        if other is not None and source is not None and constness.is_constant(source[0]):
            bias_const = _trace_const(graph, (add.id, other))
            term_name = bias_const.name if bias_const is not None else graph.layers[source[0]].name
            terms.append(BiasTerm(graph.prefix + term_name, add.inputs.get(other), BiasSource.ADD))
    followed_by = None if terms else _follower(graph, consumers, constness)
    return ConvNode(
        name=name,
        op=layer.type,
        weight_name=graph.prefix + weight_name,
        weight_shape=weight_dims,
        transposed=transposed,
        groups=groups,
        kernel_shape=kernel,
        output_spatial=output_spatial,
        bias_terms=tuple(terms),
        followed_by=followed_by,
    )


def read_openvino(source: ByteSource) -> list[ModelDescription]:
    """Describe the convolutions of an OpenVINO IR ``.xml`` (format ``"openvino"``).

    Only the XML is read (at most :data:`limits.MAX_XML_BYTES`); the weights ``.bin`` next to
    it is named as a companion file and never opened.
    """
    if source.size > limits.MAX_XML_BYTES:
        raise ResourceLimitError(
            f"OpenVINO IR XML of {source.size:,} bytes exceeds the {limits.MAX_XML_BYTES:,}-byte limit"
        )
    raw = source.read_at(0, source.size)
    if not sniff_openvino(raw[:512]):
        raise UnsupportedFormatError("not an OpenVINO IR: the XML root is not <net>")
    root = _parse_xml(raw, "OpenVINO IR")
    if root.tag != "net":
        raise UnsupportedFormatError(
            f"not an OpenVINO IR: the XML root is <{quote(root.tag, 40)}>, not <net>"
        )
    convs: list[ConvNode] = []
    warnings: list[str] = []
    model_params: int | None = 0
    for element, prefix in _graphs(root):
        graph = _read_graph(element, prefix)
        constness = _Constness(graph)
        for layer in graph.layers.values():
            if layer.type == "Const":
                count = _const_elements(layer)
                if layer.data.get("element_type", "f32").lower() in _COUNTED_ELEMENT_TYPES:
                    model_params = None if model_params is None or count is None else model_params + count
            elif layer.type in _CONV_TYPES:
                convs.append(_conv_node(graph, layer, constness, warnings))
    companion = source.name[: -len(".xml")] + ".bin" if source.name.lower().endswith(".xml") else None
    return [
        ModelDescription(
            path=source.name,
            format=FORMAT,
            convs=tuple(convs),
            model_params=model_params,
            warnings=tuple(warnings),
            companion_files=(companion,) if companion else (),
        )
    ]


__all__ = ["FORMAT", "read_openvino", "sniff_openvino"]
