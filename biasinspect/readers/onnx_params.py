"""model_params of an ONNX model (declared parameter tensors, never read) and external-data checks."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from biasinspect.readers.onnx_proto import (
    _FLOAT_TYPES,
    _INT32,
    _MS_DOMAIN,
    _SMALL_INT_TYPES,
    _conv_spec,
    _dims_of_tensor,
    _is_default_domain,
    _numel,
    _subgraphs,
)

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
