"""Helpers that build small ONNX models in code, for the ONNX reader's tests (and others')."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64

_NP = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.INT16: np.int16,
    TensorProto.INT32: np.int32,
    TensorProto.INT64: np.int64,
    TensorProto.BOOL: np.bool_,
}


def init(
    name: str, dims: Sequence[int], dtype: int = FLOAT, values: Sequence[float] | None = None
) -> TensorProto:
    """An initializer with real (zero, or given) data of the given shape."""
    if values is None:
        array = np.zeros(tuple(dims), dtype=_NP[dtype])
    else:
        array = np.asarray(values, dtype=_NP[dtype]).reshape(tuple(dims))
    return numpy_helper.from_array(array, name)


def ints(name: str, values: Sequence[int]) -> TensorProto:
    """A 1-D INT64 initializer (a shape vector)."""
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def vi(name: str, shape: Sequence[int | str | None] | None, dtype: int = FLOAT) -> onnx.ValueInfoProto:
    """A typed value info (graph input/output)."""
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def node(
    op: str, inputs: Sequence[str], outputs: Sequence[str], name: str = "", domain: str = "", **attrs: Any
) -> onnx.NodeProto:
    """A node; attributes as keywords."""
    return helper.make_node(
        op, list(inputs), list(outputs), name=name or None, domain=domain or None, **attrs
    )


def graph(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto | str],
    initializers: Sequence[TensorProto] = (),
    name: str = "g",
) -> onnx.GraphProto:
    """A graph; outputs given as names become untyped value infos."""
    outs = [o if isinstance(o, onnx.ValueInfoProto) else onnx.ValueInfoProto(name=o) for o in outputs]
    return helper.make_graph(list(nodes), name, list(inputs), outs, initializer=list(initializers))


def model(
    g: onnx.GraphProto,
    opset: int = 17,
    extra_opsets: dict[str, int] | None = None,
    functions: Sequence[onnx.FunctionProto] = (),
) -> onnx.ModelProto:
    """A model around a graph (no checker run: some tests build deliberately odd graphs)."""
    opsets = [helper.make_opsetid("", opset)]
    for domain, version in (extra_opsets or {}).items():
        opsets.append(helper.make_opsetid(domain, version))
    m = helper.make_model(g, opset_imports=opsets, functions=list(functions))
    m.ir_version = 8 if not functions else 10
    return m


def save(m: onnx.ModelProto, path: Path) -> Path:
    """Serialize a model to ``path`` as is."""
    path.write_bytes(m.SerializeToString())
    return path


def conv_model(
    weight: Sequence[int] = (8, 3, 3, 3),
    bias: bool = True,
    x_shape: Sequence[int | str | None] = (1, 3, 16, 16),
    **attrs: Any,
) -> onnx.ModelProto:
    """One Conv with an initializer weight (and bias)."""
    inits = [init("w", weight)]
    inputs = ["x", "w"]
    if bias:
        inits.append(init("b", [weight[0]]))
        inputs.append("b")
    g = graph([node("Conv", inputs, ["y"], name="conv", **attrs)], [vi("x", x_shape)], ["y"], inits)
    return model(g)
