"""Reader for torch.export archives (``torch.export.save`` / ``.pt2``).

A torch.export archive is a zip.  Since torch 2.6 the layout is the "PT2 archive"
(``<root>/archive_format`` = ``pt2``, ``<root>/models/<name>.json`` holding the serialized
``ExportedProgram``, weights under ``<root>/data/weights/``); torch 2.1-2.5 wrote
``serialized_exported_program.json`` next to pickled ``serialized_state_dict.pt``.  Either
way the JSON graph alone carries everything this tool needs: every tensor's sizes are in
``graph.tensor_values`` and ``graph_module.signature.input_specs`` maps each lifted
placeholder to its parameter / buffer / constant name.  So only JSON is read (the program,
plus the small ``data/weights/<model>_weights_config.json`` index that reveals tied
parameters): never the weight members, never a pickled member, never
``torch.export.load``, and torch is not imported.

The JSON follows ``torch/_export/serde/schema.py``: unions are one-key objects
(``{"as_tensor": {"name": "x"}}``), node arguments are named after the operator schema,
and arguments left at their schema default are omitted.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biasinspect.errors import (
    BiasInspectError,
    MalformedModelError,
    ResourceLimitError,
    UnsupportedFormatError,
)
from biasinspect.limits import MAX_JSON_BYTES, MAX_MODEL_INT
from biasinspect.model import BiasSource, BiasTerm, ConvNode, MaybeShape, ModelDescription, shape_elements
from biasinspect.readers.archive import Archive
from biasinspect.readers.files import parse_json_object

FORMAT = "torch-export"
"""The ``format`` string of every description this reader returns."""

MAX_SUBGRAPH_DEPTH = 64
"""Deepest nesting of control-flow subgraphs (``cond`` inside ``cond`` ...) that is followed.

Real programs nest a handful of levels; the cap keeps a hostile file from making the walk
arbitrarily deep (the JSON decoder bounds the nesting anyway, this keeps our own walk
independent of that)."""

MAX_ALIAS_HOPS = 64
"""Most view/dtype/dequantize nodes followed when tracing a tensor back to its placeholder."""

MAX_AFFINE_OPERAND_NODES = 64
"""Most graph nodes walked back to check that the scale or shift of a Mul+Add after a bias-free
conv is computed from stored tensors alone (torchvision's ``FrozenBatchNorm2d`` computes its
scale as ``weight * (running_var + eps).rsqrt()`` in the graph: about 5 nodes)."""

MAX_MODULE_PATH_CHARS = 1024
"""Longest ``nn_module_stack`` module path that is cleaned up into a dotted name; a longer one
(no real model nests that deep) is ignored and the layer named otherwise."""

_GETATTR = re.compile(r"getattr\(([^()]*), '([^']*)'\)")

_PROGRAM_JSON = re.compile(r"^(?:[^/]+/)?models/([^/]+)\.json$")
_LEGACY_JSON = re.compile(r"^(?:[^/]+/)?serialized_exported_program\.json$")
_AOTI_DIR = re.compile(r"^(?:[^/]+/)?data/aotinductor/")


@dataclass(frozen=True)
class _ConvOp:
    """What this reader knows about one convolution operator's schema."""

    transposed: bool | None
    """Fixed for the conv*d / conv_transpose*d ops; ``None`` means "read the transposed arg"."""
    has_bias: bool = True
    groups_default: int | None = 1
    """Schema default for ``groups`` (``None``: the argument has no default)."""


_CONV_OPS: dict[str, _ConvOp] = {
    "aten.convolution": _ConvOp(None, groups_default=None),
    "aten._convolution": _ConvOp(None, groups_default=None),
    "aten.convolution_overrideable": _ConvOp(None, groups_default=None),
    "aten.conv1d": _ConvOp(False),
    "aten.conv2d": _ConvOp(False),
    "aten.conv3d": _ConvOp(False),
    "aten.conv_transpose1d": _ConvOp(True),
    "aten.conv_transpose2d": _ConvOp(True),
    "aten.conv_transpose3d": _ConvOp(True),
    "aten.mkldnn_convolution": _ConvOp(False, groups_default=None),
    "aten.cudnn_convolution": _ConvOp(False, has_bias=False, groups_default=None),
    "aten.cudnn_convolution_transpose": _ConvOp(True, has_bias=False, groups_default=None),
}
"""Convolution operators by packet name (``aten.conv2d``); every overload is accepted.  Each
takes ``input``/``self``, ``weight`` and (when ``has_bias``) ``bias`` with the weight in the
framework layout, so the facts read the same way for all of them."""

_NORM_OPS = frozenset(
    {
        "aten.batch_norm",
        "aten.native_batch_norm",
        "aten._native_batch_norm_legit",
        "aten._native_batch_norm_legit_no_training",
        "aten._native_batch_norm_legit_functional",
        "aten._batch_norm_with_update",
        "aten._batch_norm_with_update_functional",
        "aten._batch_norm_no_update",
        "aten.cudnn_batch_norm",
        "aten.miopen_batch_norm",
        "aten.instance_norm",
        "aten.group_norm",
        "aten.native_group_norm",
        "aten.layer_norm",
        "aten.native_layer_norm",
    }
)
"""Normalisations whose shift (``bias`` argument) plays the tied bias's role (a LayerNorm over
the conv output ``[C, *spatial]`` has a shift of that shape: the norm's, not the conv's bias)."""

_ADD_OPS = frozenset({"aten.add", "aten.add_"})
"""Additions: ``x + self.bias`` and the in-place ``y.add_(self.bias)``."""

_NUMEL_PRESERVING_OPS = frozenset(
    {
        "aten.view",
        "aten.reshape",
        "aten._unsafe_view",
        "aten.unsqueeze",
        "aten.squeeze",
        "aten.alias",
        "aten.clone",
        "aten.contiguous",
        "aten.detach",
        "aten._to_copy",
        "aten.to",
        "aten.type_as",
        "aten.permute",
        "aten.flatten",
    }
)
"""Ops that only re-view or re-type one tensor: a parameter seen through them is still that
parameter, with the same element count (so counting its shape's elements stays right)."""

_STORED_KINDS = frozenset({"parameter", "tensor_constant"})
"""Placeholder kinds that may act as a separately added bias (buffers are state, not weights)."""


def read_torch_export(path: str | Path, archive: Archive) -> list[ModelDescription]:
    """Describe every exported program in a torch.export archive, from its JSON graph only.

    Returns one :class:`ModelDescription` per ``models/<name>.json`` (``location`` is the
    program name when there is more than one), or one for a legacy
    ``serialized_exported_program.json``.  Raises :class:`MalformedModelError` when the
    graph JSON is missing or structurally wrong, :class:`UnsupportedFormatError` for an
    AOTInductor package that carries no serialized program, and
    :class:`ResourceLimitError` when the JSON exceeds :data:`~biasinspect.limits.MAX_JSON_BYTES`.
    """
    names = _archive_names(archive)
    programs: list[tuple[str, str]] = []
    for member in names:
        match = _PROGRAM_JSON.match(member)
        if match:
            programs.append((match.group(1), member))
    if not programs:
        programs = [("", member) for member in names if _LEGACY_JSON.match(member)]
    if not programs:
        if any(_AOTI_DIR.match(member) for member in names):
            raise UnsupportedFormatError(
                "AOTInductor package with no serialized ExportedProgram (models/*.json); "
                "compiled packages are not read"
            )
        raise MalformedModelError(
            "torch.export archive has no models/*.json or serialized_exported_program.json member"
        )
    descriptions = []
    for model_name, member in programs:
        document = _read_json(archive, member)
        storages = _weight_storages(archive, names, member, model_name)
        location = model_name if len(programs) > 1 else None
        try:
            descriptions.append(_describe(str(path), member, document, location, storages))
        except RecursionError as error:
            raise MalformedModelError(f"{member}: graph nested too deeply") from error
    return descriptions


# ---------------------------------------------------------------------------------------------
# Archive access


def _archive_names(archive: Archive) -> list[str]:
    try:
        names = archive.names()
    except BiasInspectError:
        raise
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as error:  # a zip adapter's failures
        raise MalformedModelError(f"cannot list archive members: {error}") from error
    return [name for name in names if isinstance(name, str)]


def _read_json(archive: Archive, member: str) -> dict[str, Any]:
    try:
        size = archive.size(member)
        if size > MAX_JSON_BYTES:
            raise ResourceLimitError(
                f"{member}: {size:,} bytes exceeds the torch.export JSON cap of {MAX_JSON_BYTES:,} bytes"
            )
        data = archive.read(member, MAX_JSON_BYTES)
    except BiasInspectError:
        raise
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise MalformedModelError(f"{member}: cannot read member: {error}") from error
    # UTF-8 JSON object, no duplicate keys, no lone surrogates: torch writes nothing else.
    return parse_json_object(data, member)


def _weight_storages(archive: Archive, names: list[str], member: str, model_name: str) -> dict[str, str]:
    """Parameter name -> identity of the stored tensor, from ``data/weights/<model>_weights_config.json``.

    Tied parameters (one ``nn.Parameter`` reachable under two names) are lifted as two graph
    placeholders, so the graph alone would count them twice; the weights config gives both
    names the same ``path_name`` and tensor metadata, which identifies them as one tensor.
    Only this small JSON index is read, never the weight files it points to.  Empty when the
    archive has no such member (legacy layout).
    """
    prefix = member[: -len(f"models/{model_name}.json")] if model_name else ""
    config_member = f"{prefix}data/weights/{model_name}_weights_config.json"
    if not model_name or config_member not in names:
        return {}
    document = _read_json(archive, config_member)
    config = _obj(_get(document, "config", f"{config_member}: top level"), f"{config_member}: config")
    storages: dict[str, str] = {}
    for name, entry in config.items():
        what = f"{config_member}: config['{name}']"
        entry = _obj(entry, what)
        path_name = _str(_get(entry, "path_name", what), f"{what}.path_name")
        # Same file and same sizes/strides/offset: the same tensor, not just the same storage.
        meta = json.dumps(entry.get("tensor_meta"), sort_keys=True)
        storages[name] = f"{path_name}\0{meta}"
    return storages


# ---------------------------------------------------------------------------------------------
# Typed access to the untrusted JSON: every lookup names what it wanted when it fails.


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    return "a number"


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedModelError(f"{what} is {_kind(value)}, expected an object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedModelError(f"{what} is {_kind(value)}, expected an array")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedModelError(f"{what} is {_kind(value)}, expected a string")
    return value


def _get(mapping: dict[str, Any], key: str, what: str) -> Any:
    if key not in mapping:
        raise MalformedModelError(f"{what} has no '{key}'")
    return mapping[key]


def _union(value: object, what: str) -> tuple[str, Any]:
    """A schema union serializes as an object with exactly one key."""
    mapping = _obj(value, what)
    if len(mapping) != 1:
        raise MalformedModelError(f"{what} has {len(mapping)} keys, expected one union field")
    ((key, inner),) = mapping.items()
    return key, inner


def _tensor_name(value: object, what: str) -> str:
    """The name in a TensorArgument (``{"name": ...}``)."""
    return _str(_get(_obj(value, what), "name", what), f"{what}.name")


# ---------------------------------------------------------------------------------------------
# The graph


@dataclass
class _Node:
    name: str
    target: str
    """Operator with the ``torch.ops.`` prefix dropped, e.g. ``aten.conv2d.default``."""
    args: dict[str, Any]
    """Named arguments (raw Argument unions); HOP arguments have no names and are in ``positional``."""
    positional: list[Any]
    outputs: list[str]
    metadata: dict[str, Any]
    subgraphs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """Control-flow subgraphs passed to this (higher-order) node: (label, graph JSON)."""

    @property
    def packet(self) -> str:
        """``aten.conv2d`` for ``aten.conv2d.default``: the operator without its overload."""
        parts = self.target.split(".")
        return ".".join(parts[:-1]) if len(parts) >= 3 else self.target


@dataclass
class _Scope:
    """One graph (the main one or a control-flow subgraph) with its use-def indexes."""

    where: str
    """Where the graph lives, for messages: ``<member>: graph`` or ``<member>: graph/cond/true_graph_0``."""
    metas: dict[str, Any]
    nodes: list[_Node] = field(default_factory=list)
    producer: dict[str, _Node] = field(default_factory=dict)
    users: dict[str, list[_Node]] = field(default_factory=dict)
    output_uses: dict[str, int] = field(default_factory=dict)
    parent: _Scope | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    """Subgraph placeholder -> the outer tensor passed in for it (same shape checked)."""

    def use_count(self, tensor: str) -> int:
        """Number of uses of ``tensor`` by nodes of this graph and by its outputs."""
        return len(self.users.get(tensor, ())) + self.output_uses.get(tensor, 0)


def _shape(scope: _Scope, tensor: str) -> MaybeShape:
    """Sizes of ``tensor`` from ``tensor_values``; symbolic sizes become ``None``."""
    meta = scope.metas.get(tensor)
    if meta is None:
        return None
    what = f"{scope.where}.tensor_values['{tensor}']"
    sizes = _list(_get(_obj(meta, what), "sizes", what), f"{what}.sizes")
    dims: list[int | None] = []
    for index, size in enumerate(sizes):
        key, value = _union(size, f"{what}.sizes[{index}]")
        if key == "as_int":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MalformedModelError(f"{what}.sizes[{index}] is not a non-negative integer")
            if value > MAX_MODEL_INT:
                raise UnsupportedFormatError(
                    f"unsupported: {what}.sizes[{index}] is an integer of {value.bit_length():,} bits, "
                    "past the 64-bit range torch itself can hold"
                )
            dims.append(value)
        else:  # as_expr: a symbolic size (dynamic dim); unknown by design
            dims.append(None)
    return tuple(dims)


def _tensor_refs(argument: object, what: str) -> Iterator[str]:
    """Names of the tensors one Argument refers to (not descending into subgraphs)."""
    stack: list[tuple[object, str, int]] = [(argument, what, 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_SUBGRAPH_DEPTH:
            raise MalformedModelError(f"{where} nested too deeply")
        if not isinstance(value, dict) or len(value) != 1:
            continue  # non-tensor arguments of shapes this reader does not need
        ((key, inner),) = value.items()
        if key == "as_tensor":
            yield _tensor_name(inner, f"{where}.as_tensor")
        elif key == "as_optional_tensor":
            stack.append((inner, f"{where}.as_optional_tensor", depth + 1))
        elif key in ("as_tensors", "as_optional_tensors"):
            for index, item in enumerate(_list(inner, f"{where}.{key}")):
                if key == "as_tensors":
                    yield _tensor_name(item, f"{where}.as_tensors[{index}]")
                else:
                    stack.append((item, f"{where}.{key}[{index}]", depth + 1))
        elif key == "as_nested_tensors":
            for index, row in enumerate(_list(inner, f"{where}.as_nested_tensors")):
                for column, item in enumerate(_list(row, f"{where}.as_nested_tensors[{index}]")):
                    yield _tensor_name(item, f"{where}.as_nested_tensors[{index}][{column}]")
        elif key == "as_string_to_argument":
            for name, item in _obj(inner, f"{where}.as_string_to_argument").items():
                stack.append((item, f"{where}.as_string_to_argument['{name}']", depth + 1))


def _arg_tensor(argument: object) -> str | None:
    """The single tensor an argument holds (``as_tensor`` or a set ``as_optional_tensor``)."""
    if not isinstance(argument, dict) or len(argument) != 1:
        return None
    ((key, inner),) = argument.items()
    if key == "as_optional_tensor":
        return _arg_tensor(inner)
    if key == "as_tensor" and isinstance(inner, dict) and isinstance(inner.get("name"), str):
        name: str = inner["name"]
        return name
    return None


def _arg_int(argument: object) -> tuple[bool, int | None]:
    """(present, value): a known int, or ``None`` for a symbolic one."""
    if not isinstance(argument, dict) or len(argument) != 1:
        return False, None
    ((key, inner),) = argument.items()
    if key == "as_sym_int":
        return _arg_int(inner) if isinstance(inner, dict) and "as_int" in inner else (True, None)
    if key == "as_int" and isinstance(inner, int) and not isinstance(inner, bool):
        return True, inner
    return False, None


def _build_scope(graph: dict[str, Any], where: str) -> _Scope:
    """Parse and index one graph; its nodes keep the subgraphs found in their arguments."""
    metas = _obj(_get(graph, "tensor_values", where), f"{where}.tensor_values")
    scope = _Scope(where=where, metas=metas)
    nodes = _list(_get(graph, "nodes", where), f"{where}.nodes")
    for index, raw in enumerate(nodes):
        what = f"{where}.nodes[{index}]"
        node_obj = _obj(raw, what)
        target = _str(_get(node_obj, "target", what), f"{what}.target").removeprefix("torch.ops.")
        outputs: list[str] = []
        for position, output in enumerate(_list(_get(node_obj, "outputs", what), f"{what}.outputs")):
            outputs.extend(_tensor_refs(output, f"{what}.outputs[{position}]"))
        name = node_obj.get("name")
        if not isinstance(name, str) or not name:
            name = outputs[0] if outputs else f"{target}#{index}"
        metadata = node_obj.get("metadata")
        node = _Node(
            name=name,
            target=target,
            args={},
            positional=[],
            outputs=outputs,
            metadata=metadata if isinstance(metadata, dict) else {},
        )
        for position, raw_input in enumerate(_list(_get(node_obj, "inputs", what), f"{what}.inputs")):
            input_what = f"{what}.inputs[{position}]"
            named = _obj(raw_input, input_what)
            arg_name = named.get("name", "")
            if not isinstance(arg_name, str):
                raise MalformedModelError(f"{input_what}.name is {_kind(arg_name)}, expected a string")
            argument = _get(named, "arg", input_what)
            if arg_name:
                node.args[arg_name] = argument
            node.positional.append(argument)
            for tensor in _tensor_refs(argument, f"{input_what}.arg"):
                scope.users.setdefault(tensor, []).append(node)
            if isinstance(argument, dict) and "as_graph" in argument:
                graph_what = f"{input_what}.arg.as_graph"
                graph_arg = _obj(argument["as_graph"], graph_what)
                label = graph_arg.get("name")
                label = label if isinstance(label, str) and label else f"graph{position}"
                node.subgraphs.append(
                    (label, _obj(_get(graph_arg, "graph", graph_what), f"{graph_what}.graph"))
                )
        for tensor in outputs:
            scope.producer[tensor] = node
        scope.nodes.append(node)
    for position, output in enumerate(_list(_get(graph, "outputs", where), f"{where}.outputs")):
        for tensor in _tensor_refs(output, f"{where}.outputs[{position}]"):
            scope.output_uses[tensor] = scope.output_uses.get(tensor, 0) + 1
    return scope


def _walk(root: _Scope) -> Iterator[tuple[_Scope, _Node, str | None]]:
    """Every node of the program in execution order, each control-flow subgraph's nodes
    right after the higher-order node that owns it; with a "where" remark for subgraphs.

    Iterative (an explicit stack) and capped at :data:`MAX_SUBGRAPH_DEPTH`; each node is
    visited once, so the walk is linear in the number of nodes."""
    stack: list[tuple[_Scope, Iterator[_Node], str | None]] = [(root, iter(root.nodes), None)]
    while stack:
        scope, nodes, context = stack[-1]
        node = next(nodes, None)
        if node is None:
            stack.pop()
            continue
        yield scope, node, context
        if node.subgraphs and len(stack) > MAX_SUBGRAPH_DEPTH:
            raise ResourceLimitError(f"{scope.where}: subgraphs nested deeper than {MAX_SUBGRAPH_DEPTH}")
        for label, graph in reversed(node.subgraphs):  # reversed: the first subgraph is walked first
            sub = _build_scope(graph, f"{scope.where}/{node.name}/{label}")
            sub.parent = scope
            _link_subgraph(scope, node, sub, graph)
            stack.append((sub, iter(sub.nodes), f"inside subgraph {label} of {node.target}"))


def _link_subgraph(outer: _Scope, node: _Node, sub: _Scope, graph: dict[str, Any]) -> None:
    """Map a subgraph's placeholders to the outer tensors passed to its higher-order op.

    Higher-order ops (``cond``, ``while_loop``, ``invoke_subgraph``, ``map``) pass their
    operands last, so the subgraph's inputs line up with the tail of the node's tensor
    operands.  A pairing is only kept when both sides have the same known shape, so a
    different calling convention leaves names subgraph-local instead of wrong.
    """
    sub_inputs: list[str] = []
    for position, item in enumerate(_list(_get(graph, "inputs", sub.where), f"{sub.where}.inputs")):
        names = list(_tensor_refs(item, f"{sub.where}.inputs[{position}]"))
        sub_inputs.append(names[0] if len(names) == 1 else "")
    outer_tensors: list[str] = []
    for argument in node.positional:
        if isinstance(argument, dict) and "as_graph" in argument:
            continue
        outer_tensors.extend(_tensor_refs(argument, f"{outer.where}.{node.name}"))
    if len(outer_tensors) < len(sub_inputs):
        return
    tail = outer_tensors[len(outer_tensors) - len(sub_inputs) :]
    for inner, outer_name in zip(sub_inputs, tail, strict=True):
        if not inner:
            continue
        inner_shape, outer_shape = _shape(sub, inner), _shape(outer, outer_name)
        if inner_shape is not None and inner_shape == outer_shape:
            sub.aliases[inner] = outer_name


# ---------------------------------------------------------------------------------------------
# The program


@dataclass
class _Placeholder:
    kind: str
    """``parameter``, ``buffer`` or ``tensor_constant``."""
    stored_name: str
    """``conv1.weight``: the state-dict / constant name."""


def _signature(graph_module: dict[str, Any], what: str) -> dict[str, _Placeholder]:
    signature = _obj(_get(graph_module, "signature", what), f"{what}.signature")
    specs = _list(_get(signature, "input_specs", f"{what}.signature"), f"{what}.signature.input_specs")
    placeholders: dict[str, _Placeholder] = {}
    name_fields = {
        "parameter": "parameter_name",
        "buffer": "buffer_name",
        "tensor_constant": "tensor_constant_name",
    }
    for index, spec in enumerate(specs):
        spec_what = f"{what}.signature.input_specs[{index}]"
        kind, body = _union(spec, spec_what)
        if kind not in name_fields:
            continue  # user inputs, tokens, custom objects, constant inputs: not weights
        body = _obj(body, f"{spec_what}.{kind}")
        tensor = _tensor_name(_get(body, "arg", f"{spec_what}.{kind}"), f"{spec_what}.{kind}.arg")
        stored = _str(
            _get(body, name_fields[kind], f"{spec_what}.{kind}"), f"{spec_what}.{kind}.{name_fields[kind]}"
        )
        placeholders[tensor] = _Placeholder(kind, stored)
    return placeholders


def _resolve(
    scope: _Scope, tensor: str, placeholders: dict[str, _Placeholder], *, strict: bool
) -> _Placeholder | None:
    """Trace ``tensor`` back to the lifted placeholder it re-views, if any.

    Follows subgraph aliases and single-source pass-through nodes: view/reshape/dtype ops
    (:data:`_NUMEL_PRESERVING_OPS`), and ``*dequantize*`` ops unless ``strict``.  When
    ``strict`` (a separately added bias) every hop must keep the element count, so the
    shape reported for the term accounts for exactly the parameter's elements.
    """
    current_scope, current = scope, tensor
    for _ in range(MAX_ALIAS_HOPS):
        if current_scope.parent is None and current in placeholders:
            return placeholders[current]
        if current_scope.parent is not None and current in current_scope.aliases:
            current, current_scope = current_scope.aliases[current], current_scope.parent
            continue
        node = current_scope.producer.get(current)
        if node is None:
            return None
        if node.packet not in _NUMEL_PRESERVING_OPS and (strict or "dequantize" not in node.packet):
            return None
        source = _arg_tensor(node.args.get("self", node.args.get("input")))
        if source is None and node.positional:
            source = _arg_tensor(node.positional[0])
        if source is None:
            return None
        if strict:
            before = shape_elements(_shape(current_scope, source))
            if before is None or before != shape_elements(_shape(current_scope, current)):
                return None
        current = source
    return None


def _split_stack_entry(entry: str) -> list[str]:
    """Split ``key,path,type`` at top-level commas (paths may hold ``getattr(a, 'b')``)."""
    parts, start, depth = [], 0, 0
    for index, char in enumerate(entry):
        if char in "[(":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(entry[start:index])
            start = index + 1
    parts.append(entry[start:])
    return parts


def _module(node: _Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module in ``nn_module_stack``; '' if none."""
    stack = node.metadata.get("nn_module_stack")
    if not isinstance(stack, str) or not stack:
        return "", ""
    parts = _split_stack_entry(stack.split(";")[-1])
    if len(parts) != 3:
        return "", ""
    path, type_name = parts[1], parts[2]
    type_name = type_name.rsplit(".", 1)[-1]
    if len(path) > MAX_MODULE_PATH_CHARS:
        return "", type_name
    # Older exporters wrote Dynamo source strings such as L['self'].features[0] or
    # getattr(L['self'].layer1, '0').conv1; reduce them to the dotted module path, innermost
    # getattr first.  Each pass removes one getattr, and the length cap bounds the passes.
    substituted = 1
    while substituted:
        path, substituted = _GETATTR.subn(r"\1.\2", path, count=1)
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path).strip(".")
    return path, type_name


def _followed_by(scope: _Scope, output: str, placeholders: dict[str, _Placeholder]) -> str | None:
    """The norm (or Mul+Add affine pair) that directly consumes a bias-free conv's output."""
    for user in scope.users.get(output, ()):
        if user.packet in _NORM_OPS:
            source = _arg_tensor(user.args.get("input", user.args.get("self")))
            shift = _arg_tensor(user.args.get("bias"))
            if source == output and shift is not None:
                _, class_name = _module(user)
                return class_name if "Norm" in class_name else user.packet.removeprefix("aten.")
        if user.packet == "aten.mul" and scope.use_count(output) == 1 and user.outputs:
            if not _from_stored_only(scope, _other_operand(user, output), placeholders):
                continue
            product = user.outputs[0]
            adds = scope.users.get(product, [])
            if (
                scope.use_count(product) == 1
                and len(adds) == 1
                and adds[0].packet == "aten.add"
                and _from_stored_only(scope, _other_operand(adds[0], product), placeholders)
            ):
                # Both inside one norm module (FrozenBatchNorm2d): named like a pickled module's.
                path, class_name = _module(user)
                if "Norm" in class_name and _module(adds[0]) == (path, class_name):
                    return class_name
                return "Mul+Add"
    return None


def _other_operand(node: _Node, side: str) -> str | None:
    """The tensor operand of binary op ``node`` that is not ``side`` (None for a scalar)."""
    left = _arg_tensor(node.args.get("self"))
    right = _arg_tensor(node.args.get("other"))
    if left == side and right is not None and right != side:
        return right
    if right == side and left is not None and left != side:
        return left
    return None


def _from_stored_only(scope: _Scope, tensor: str | None, placeholders: dict[str, _Placeholder]) -> bool:
    """True when ``tensor`` is a lifted parameter, buffer or constant, or is computed from
    those alone (no user input on the way), within :data:`MAX_AFFINE_OPERAND_NODES` nodes.

    This is how a norm whose scale and shift are computed at run time looks (a frozen
    BatchNorm: ``x * (w * (running_var + eps).rsqrt()) + (b - running_mean * scale)``), the
    same rule the ONNX reader applies to a Mul+Add pair."""
    if tensor is None:
        return False
    stack: list[tuple[_Scope, str]] = [(scope, tensor)]
    seen: set[tuple[int, str]] = set()
    walked = 0
    while stack:
        current_scope, current = stack.pop()
        if (id(current_scope), current) in seen:
            continue
        seen.add((id(current_scope), current))
        if current_scope.parent is None and current in placeholders:
            continue
        if current_scope.parent is not None and current in current_scope.aliases:
            stack.append((current_scope.parent, current_scope.aliases[current]))
            continue
        node = current_scope.producer.get(current)
        walked += 1
        if node is None or node.subgraphs or node.packet in _CONV_OPS or walked > MAX_AFFINE_OPERAND_NODES:
            return False  # a user input, a control-flow result, another layer, or too far
        for position, argument in enumerate(node.positional):
            stack.extend(
                (current_scope, source)
                for source in _tensor_refs(
                    argument, f"{current_scope.where} node '{node.name}' input {position}"
                )
            )
    return True


def _stored_operand(
    scope: _Scope, node: _Node, conv_side: str, placeholders: dict[str, _Placeholder]
) -> tuple[_Placeholder, str] | None:
    """For a binary op with ``conv_side`` as one operand: the other one, when it is a stored
    parameter/constant (seen through numel-preserving views); with the operand's tensor name."""
    other = _other_operand(node, conv_side)
    if other is None:
        return None
    placeholder = _resolve(scope, other, placeholders, strict=True)
    if placeholder is None or placeholder.kind not in _STORED_KINDS:
        return None
    return placeholder, other


def _conv_node(
    scope: _Scope,
    node: _Node,
    spec: _ConvOp,
    placeholders: dict[str, _Placeholder],
    name: str,
    context: str | None,
) -> ConvNode:
    """The facts of one convolution node, named ``name`` (``context``: where, for subgraphs)."""
    what = f"{scope.where} node '{node.name}' ({node.target})"
    weight = _arg_tensor(node.args.get("weight"))
    if weight is None:
        raise MalformedModelError(f"{what} has no weight tensor argument")
    notes: list[str] = []
    weight_placeholder = _resolve(scope, weight, placeholders, strict=False)
    if weight_placeholder is not None:
        weight_name = weight_placeholder.stored_name
    else:
        weight_name = weight
        notes.append(f"weight '{weight}' is computed in the graph, not a stored tensor")
    weight_shape = _shape(scope, weight)

    if spec.transposed is not None:
        transposed: bool | None = spec.transposed
    else:
        flag = node.args.get("transposed")
        transposed = (
            flag["as_bool"] if isinstance(flag, dict) and isinstance(flag.get("as_bool"), bool) else None
        )

    present, groups = _arg_int(node.args.get("groups"))
    if not present:
        groups = None if "groups" in node.args else spec.groups_default

    output = node.outputs[0] if node.outputs else None
    output_spatial: MaybeShape = None
    if output is not None and weight_shape is not None and len(weight_shape) >= 3:
        out_shape = _shape(scope, output)
        spatial_rank = len(weight_shape) - 2
        if out_shape is not None and len(out_shape) >= spatial_rank + 1:
            # Batched [N, C, *s] or unbatched [C, *s]: the spatial dims are the trailing ones.
            output_spatial = out_shape[-spatial_rank:]

    terms: list[BiasTerm] = []
    bias = _arg_tensor(node.args.get("bias")) if spec.has_bias else None
    if bias is not None:
        bias_placeholder = _resolve(scope, bias, placeholders, strict=False)
        bias_name = bias_placeholder.stored_name if bias_placeholder is not None else bias
        terms.append(BiasTerm(bias_name, _shape(scope, bias), BiasSource.CONV))

    followed_by = None
    if output is not None:
        users = scope.users.get(output, [])
        if scope.use_count(output) == 1 and len(users) == 1 and users[0].packet in _ADD_OPS:
            operand = _stored_operand(scope, users[0], output, placeholders)
            if operand is not None:
                placeholder, tensor = operand
                terms.append(BiasTerm(placeholder.stored_name, _shape(scope, tensor), BiasSource.ADD))
        if not terms:
            followed_by = _followed_by(scope, output, placeholders)

    if context is not None:
        notes.append(context)
    return ConvNode(
        name=name,
        op=node.packet,
        weight_name=weight_name,
        weight_shape=weight_shape,
        transposed=transposed,
        groups=groups,
        kernel_shape=weight_shape[2:] if weight_shape is not None and len(weight_shape) >= 3 else None,
        output_spatial=output_spatial,
        bias_terms=tuple(terms),
        followed_by=followed_by,
        notes=tuple(notes),
    )


def _layer_name(scope: _Scope, node: _Node, placeholders: dict[str, _Placeholder]) -> str:
    """The module that ran the conv (``features.0``) from ``nn_module_stack``; failing that
    (subgraphs, stripped metadata) the module owning a ``<module>.weight`` parameter; failing
    that the graph node's name."""
    module_path, _ = _module(node)
    if module_path:
        return module_path
    weight = _arg_tensor(node.args.get("weight"))
    placeholder = _resolve(scope, weight, placeholders, strict=False) if weight is not None else None
    if placeholder is not None and placeholder.stored_name.endswith(".weight"):
        return placeholder.stored_name.removesuffix(".weight")
    return node.name


def _looks_like_conv(packet: str) -> bool:
    short = packet.rsplit(".", 1)[-1]
    return "conv" in short and "convert" not in short and "backward" not in short


def _describe(
    path: str, member: str, document: dict[str, Any], location: str | None, storages: dict[str, str]
) -> ModelDescription:
    """One program's description; ``storages`` (from the weights config) dedupes tied parameters."""
    graph_module = _obj(_get(document, "graph_module", f"{member}: top level"), f"{member}: graph_module")
    where = f"{member}: graph_module"
    placeholders = _signature(graph_module, where)
    root_graph = _obj(_get(graph_module, "graph", where), f"{where}.graph")

    root = _build_scope(root_graph, f"{member}: graph")

    warnings: list[str] = []
    convs: list[ConvNode] = []
    seen: dict[str, int] = {}
    for scope, node, context in _walk(root):
        spec = _CONV_OPS.get(node.packet)
        if spec is None:
            if _looks_like_conv(node.packet):
                warnings.append(
                    f"node '{node.name}': convolution-like operator {node.target} is not recognised; "
                    "not analysed"
                )
            continue
        name = _layer_name(scope, node, placeholders)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # a module called twice, or several functional convs in one module
            name = f"{name}#{seen[name]}"
        convs.append(_conv_node(scope, node, spec, placeholders, name, context))

    model_params: int | None = 0
    counted: set[str] = set()
    for tensor, placeholder in placeholders.items():
        if placeholder.kind != "parameter":
            continue
        storage = storages.get(placeholder.stored_name)
        if storage is not None:
            if storage in counted:
                continue  # a tied parameter: model.parameters() yields it once
            counted.add(storage)
        if tensor not in root.metas:
            raise MalformedModelError(
                f"{member}: parameter '{placeholder.stored_name}' (placeholder '{tensor}') "
                "has no entry in graph.tensor_values"
            )
        count = shape_elements(_shape(root, tensor))
        if count is None:
            warnings.append(f"parameter '{placeholder.stored_name}' has a symbolic size; model total unknown")
            model_params = None
        elif model_params is not None:
            model_params += count

    return ModelDescription(
        path=path,
        format=FORMAT,
        convs=tuple(convs),
        model_params=model_params,
        warnings=tuple(warnings),
        location=location,
    )
