"""Builders of hostile ONNX graphs (structure, not bytes): function-call bombs, growth under shape
inference's data propagation, absurd dims and attributes, and very wide or very long graphs.

For tests/test_hostile_onnx.py, tests/test_fuzz.py and benchmarks/fuzz_long.py.  Every model is
built in memory with ``onnx.helper``; nothing here is committed as a file.  The ``random_*``
generators take a :class:`random.Random`, so a case is reproducible from its seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from onnx import ModelProto, NodeProto, TensorProto, helper

OPSET = helper.make_opsetid("", 17)
LOCAL = helper.make_opsetid("local", 1)
"""The domain of the model-local functions built here."""


def _float_input(name: str, dims: Sequence[int | None] | None) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _weight(name: str, dims: Sequence[int] = (4, 3, 3, 3)) -> TensorProto:
    count = 1
    for dim in dims:
        count *= dim
    return helper.make_tensor(name, TensorProto.FLOAT, list(dims), [0.0] * count)


def _model(
    nodes: Sequence[NodeProto],
    inputs: Sequence[Any],
    outputs: Sequence[str],
    initializers: Sequence[TensorProto] = (),
    functions: Sequence[Any] = (),
) -> ModelProto:
    graph = helper.make_graph(
        list(nodes), "g", list(inputs), [_float_input(name, None) for name in outputs], list(initializers)
    )
    opsets = [OPSET, LOCAL] if functions else [OPSET]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _conv_of_x() -> tuple[NodeProto, TensorProto]:
    """``conv``: a 3x3 conv of the [1, 3, 8, 8] input ``X`` (output 6x6), to show the model is read."""
    return helper.make_node("Conv", ["X", "W"], ["Z"], name="conv"), _weight("W")


# ---------------------------------------------------------------------------------------------
# Model-local function bombs
# ---------------------------------------------------------------------------------------------


def function_bomb(chain: int, levels: int, fanout: int = 2, conv_in_leaf: bool = True) -> bytes:
    """Functions ``f0 .. f{chain+levels-1}``: the first ``chain`` each call the next once, the rest
    call the next ``fanout`` times; the last holds a conv (or a Relu).  The main graph calls ``f0``
    once, so a full expansion has about ``chain + fanout**levels`` function instances: with
    ``chain`` past the walk's depth limit (32) the doubling happens where a depth-limited count
    does not look."""
    total = chain + levels
    functions = []
    for k in range(total):
        if k == total - 1:
            body = [
                helper.make_node("Conv", ["x", "w"], ["y"], name="c")
                if conv_in_leaf
                else helper.make_node("Relu", ["x"], ["y"])
            ]
        else:
            body = []
            previous = "x"
            for j in range(fanout if k >= chain else 1):
                body.append(
                    helper.make_node(f"f{k + 1}", [previous, "w"], [f"t{j}"], domain="local", name=f"call{j}")
                )
                previous = f"t{j}"
            body.append(helper.make_node("Identity", [previous], ["y"]))
        functions.append(helper.make_function("local", f"f{k}", ["x", "w"], ["y"], body, [OPSET, LOCAL]))
    nodes = [helper.make_node("f0", ["X", "W1"], ["Y"], domain="local", name="main_call")]
    model = _model(nodes, [_float_input("X", [1, 1, 8, 8])], ["Y"], [_weight("W1", (1, 1, 1, 1))], functions)
    return model.SerializeToString()


def function_bomb_reached_deep_first(depth: int = 32, levels: int = 20) -> bytes:
    """A doubling function ``d0`` reached first at the end of a ``depth``-long chain of calls and
    then straight from the main graph: a count cached per function while walking the chain (where
    the depth limit cuts it to nothing) would call the second call free."""
    functions = []
    for k in range(depth):
        callee = f"a{k + 1}" if k + 1 < depth else "d0"
        body = [
            helper.make_node(callee, ["x"], ["t"], domain="local"),
            helper.make_node("Identity", ["t"], ["y"]),
        ]
        functions.append(helper.make_function("local", f"a{k}", ["x"], ["y"], body, [OPSET, LOCAL]))
    for k in range(levels):
        if k == levels - 1:
            body = [helper.make_node("Relu", ["x"], ["y"])]
        else:
            body = [
                helper.make_node(f"d{k + 1}", ["x"], ["t0"], domain="local"),
                helper.make_node(f"d{k + 1}", ["t0"], ["t1"], domain="local"),
                helper.make_node("Identity", ["t1"], ["y"]),
            ]
        functions.append(helper.make_function("local", f"d{k}", ["x"], ["y"], body, [OPSET, LOCAL]))
    conv, weight = _conv_of_x()
    nodes = [
        helper.make_node("a0", ["X"], ["A"], domain="local"),
        helper.make_node("d0", ["X"], ["D"], domain="local"),
        conv,
    ]
    return _model(
        nodes, [_float_input("X", [1, 3, 8, 8])], ["A", "D", "Z"], [weight], functions
    ).SerializeToString()


def function_bomb_cut_count(calls: int = 50, fanout: int = 20, levels: int = 11) -> bytes:
    """``x`` calls the doubling function ``d0`` (``levels`` levels) ``fanout`` times.  The main graph
    first calls ``x`` at the end of a 31-call chain -- where a count cut off at depth 32 caches
    ``x`` as costing just its ``fanout`` calls -- then ``calls`` times directly, where each call
    really expands ``fanout * 2**(levels-1)`` instances (a million in all with the defaults, which a
    count cached per function puts at about 5,000)."""
    functions = []
    for k in range(31):
        callee = f"c{k + 1}" if k < 30 else "x"
        body = [
            helper.make_node(callee, ["a"], ["b"], domain="local"),
            helper.make_node("Identity", ["b"], ["y"]),
        ]
        functions.append(helper.make_function("local", f"c{k}", ["a"], ["y"], body, [OPSET, LOCAL]))
    body = []
    previous = "a"
    for j in range(fanout):
        body.append(helper.make_node("d0", [previous], [f"t{j}"], domain="local"))
        previous = f"t{j}"
    body.append(helper.make_node("Identity", [previous], ["y"]))
    functions.append(helper.make_function("local", "x", ["a"], ["y"], body, [OPSET, LOCAL]))
    for k in range(levels):
        if k == levels - 1:
            body = [helper.make_node("Relu", ["a"], ["y"])]
        else:
            body = [
                helper.make_node(f"d{k + 1}", ["a"], ["t0"], domain="local"),
                helper.make_node(f"d{k + 1}", ["t0"], ["t1"], domain="local"),
                helper.make_node("Identity", ["t1"], ["y"]),
            ]
        functions.append(helper.make_function("local", f"d{k}", ["a"], ["y"], body, [OPSET, LOCAL]))
    conv, weight = _conv_of_x()
    nodes = [helper.make_node("c0", ["X"], ["C"], domain="local")]
    nodes += [helper.make_node("x", ["X"], [f"Y{i}"], domain="local") for i in range(calls)]
    outputs = ["C", *[f"Y{i}" for i in range(calls)], "Z"]
    return _model(
        [*nodes, conv], [_float_input("X", [1, 3, 8, 8])], outputs, [weight], functions
    ).SerializeToString()


def random_function_bomb(rng: random.Random) -> bytes:
    """A function-call graph of random shape: a chain, a fan-out per level, sometimes a recursive
    call, sometimes calls inside an ``If`` branch."""
    chain = rng.choice([0, 0, 1, 5, 31, 32, 33, 40])
    levels = rng.randint(1, 40)
    fanout = rng.choice([1, 1, 2, 2, 3])
    recursive = rng.random() < 0.2
    in_subgraph = rng.random() < 0.3
    total = chain + levels
    functions = []
    for k in range(total):
        body: list[NodeProto] = []
        previous = "x"
        callees = [] if k == total - 1 else [f"f{k + 1}"] * (fanout if k >= chain else 1)
        if recursive and k == total - 1:
            callees = [f"f{rng.randrange(total)}"]
        for j, callee in enumerate(callees):
            call = helper.make_node(callee, [previous], [f"t{j}"], domain="local")
            if in_subgraph and j == 0:
                branch = helper.make_graph([call], "then", [], [_float_input(f"t{j}", None)])
                other = helper.make_graph(
                    [helper.make_node("Identity", [previous], [f"e{j}"])],
                    "else",
                    [],
                    [_float_input(f"e{j}", None)],
                )
                call = helper.make_node("If", ["cond"], [f"t{j}"], then_branch=branch, else_branch=other)
            body.append(call)
            previous = f"t{j}"
        body.append(helper.make_node("Relu", [previous], ["y"]))
        functions.append(helper.make_function("local", f"f{k}", ["x", "cond"], ["y"], body, [OPSET, LOCAL]))
    conv, weight = _conv_of_x()
    nodes = [helper.make_node("f0", ["X", "C"], ["Y"], domain="local"), conv]
    inputs = [_float_input("X", [1, 3, 8, 8]), helper.make_tensor_value_info("C", TensorProto.BOOL, [])]
    return _model(nodes, inputs, ["Y", "Z"], [weight], functions).SerializeToString()


# ---------------------------------------------------------------------------------------------
# Growth under shape inference (data propagation)
# ---------------------------------------------------------------------------------------------


def concat_doubling(levels: int, source: str = "shape") -> bytes:
    """An integer vector doubled ``levels`` times by ``Concat(s, s)``, then given to
    ``ConstantOfShape`` (a tensor of that rank).  ``source``: ``shape`` (``Shape`` of the input),
    ``declared`` (a 1-D int64 graph input of length 4, no values) or ``stored`` (an 8-element
    int64 initializer)."""
    nodes: list[NodeProto] = []
    inputs = [_float_input("X", [1, 3, 8, 8])]
    initializers: list[TensorProto] = []
    if source == "shape":
        nodes.append(helper.make_node("Shape", ["X"], ["s0"]))
    elif source == "declared":
        inputs.append(helper.make_tensor_value_info("L", TensorProto.INT64, [4]))
        nodes.append(helper.make_node("Identity", ["L"], ["s0"]))
    else:
        initializers.append(helper.make_tensor("s0", TensorProto.INT64, [8], [1] * 8))
    for i in range(levels):
        nodes.append(helper.make_node("Concat", [f"s{i}", f"s{i}"], [f"s{i + 1}"], axis=0))
    nodes.append(helper.make_node("ConstantOfShape", [f"s{levels}"], ["Y"]))
    conv, weight = _conv_of_x()
    return _model([*nodes, conv], inputs, ["Y", "Z"], [*initializers, weight]).SerializeToString()


def long_vector_from_stored_value(length: int) -> bytes:
    """``ConstantOfShape([length])`` is a 1-D tensor of ``length`` elements, from a one-element
    initializer; ``Concat`` of it with itself under data propagation would hold 2 * ``length``
    values, and the ``ConstantOfShape`` after it would be of that rank."""
    initializers = [helper.make_tensor("n", TensorProto.INT64, [1], [length])]
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["n"], ["v"], value=helper.make_tensor("one", TensorProto.INT64, [1], [1])
        ),
        helper.make_node("Concat", ["v", "v"], ["w"], axis=0),
        helper.make_node("ConstantOfShape", ["w"], ["Y"]),
    ]
    conv, weight = _conv_of_x()
    return _model(
        [*nodes, conv], [_float_input("X", [1, 3, 8, 8])], ["Y", "Z"], [*initializers, weight]
    ).SerializeToString()


def unsqueeze_chain(count: int) -> bytes:
    """``count`` chained ``Unsqueeze(axes=[0])`` of the input: rank 4 + ``count`` at the end (every
    value on the way keeps its own shape: quadratic memory in shape inference, with or without
    data propagation)."""
    initializers = [helper.make_tensor("axes", TensorProto.INT64, [1], [0])]
    nodes = [helper.make_node("Identity", ["X"], ["u0"])]
    for i in range(count):
        nodes.append(helper.make_node("Unsqueeze", [f"u{i}", "axes"], [f"u{i + 1}"]))
    conv, weight = _conv_of_x()
    return _model(
        [*nodes, conv], [_float_input("X", [1, 3, 8, 8])], [f"u{count}", "Z"], [*initializers, weight]
    ).SerializeToString()


_GROWTH_OPS = (
    "Concat",
    "Concat",
    "Concat",
    "Unsqueeze",
    "Identity",
    "Add",
    "Mul",
    "Gather",
    "Shape-of-COS",
    "Range",
)


def random_propagation_growth(rng: random.Random) -> bytes:
    """Shape arithmetic of random shape: a pool of integer vectors (``Shape`` of the input, a
    declared int64 input of random length, stored constants) grown by random ``Concat`` /
    ``Unsqueeze`` / ``Add`` / ``Mul`` / ``Gather`` / ``Shape(ConstantOfShape(.))`` / ``Range``
    steps, some results turned into shapes by ``ConstantOfShape``, ``Expand`` and ``Reshape``."""
    declared = rng.choice([1, 4, 64, 1 << 10, 1 << 20, 1 << 40])
    inputs = [
        _float_input("X", [1, 3, 8, 8]),
        helper.make_tensor_value_info("L", TensorProto.INT64, [declared]),
    ]
    initializers = [
        helper.make_tensor("k", TensorProto.INT64, [2], [rng.choice([1, 2, 1 << 20]), 2]),
        helper.make_tensor("idx", TensorProto.INT64, [2], [0, 0]),
        helper.make_tensor("ax", TensorProto.INT64, [1], [0]),
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
    ]
    nodes = [helper.make_node("Shape", ["X"], ["p0"]), helper.make_node("Identity", ["L"], ["p1"])]
    pool = ["p0", "p1", "k"]
    outputs = []
    for step in range(rng.randint(1, 48)):
        op = rng.choice(_GROWTH_OPS)
        a, b = rng.choice(pool), rng.choice(pool)
        out = f"v{step}"
        if op == "Concat":
            nodes.append(helper.make_node("Concat", [a, a if rng.random() < 0.7 else b], [out], axis=0))
        elif op == "Unsqueeze":
            nodes.append(helper.make_node("Unsqueeze", [a, "ax"], [out]))
        elif op == "Identity":
            nodes.append(helper.make_node("Identity", [a], [out]))
        elif op in ("Add", "Mul"):
            nodes.append(helper.make_node(op, [a, b], [out]))
        elif op == "Gather":
            nodes.append(helper.make_node("Gather", [a, "idx"], [out]))
        elif op == "Range":
            nodes.append(helper.make_node("Gather", [a, "zero"], [f"{out}_n"]))
            nodes.append(helper.make_node("Range", ["zero", f"{out}_n", "one"], [out]))
            if not any(t.name == "one" for t in initializers):
                initializers.append(helper.make_tensor("one", TensorProto.INT64, [], [1]))
        else:
            nodes.append(helper.make_node("ConstantOfShape", [a], [f"{out}_c"]))
            nodes.append(helper.make_node("Shape", [f"{out}_c"], [out]))
        pool.append(out)
        if rng.random() < 0.25:
            use = rng.choice(["ConstantOfShape", "Expand", "Reshape"])
            target = f"use{step}"
            if use == "ConstantOfShape":
                nodes.append(helper.make_node("ConstantOfShape", [out], [target]))
            else:
                nodes.append(helper.make_node(use, ["X", out], [target]))
            outputs.append(target)
    conv, weight = _conv_of_x()
    return _model([*nodes, conv], inputs, [*outputs, "Z"], [*initializers, weight]).SerializeToString()


# ---------------------------------------------------------------------------------------------
# Absurd numbers
# ---------------------------------------------------------------------------------------------


def weight_with_dims(dims: Sequence[int]) -> bytes:
    """A conv whose weight is a graph input declared with ``dims`` (no initializer to check)."""
    nodes = [helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")]
    inputs = [_float_input("X", [1, 3, 8, 8]), _float_input("W", list(dims))]
    return _model(nodes, inputs, ["Y"]).SerializeToString()


def conv_with_attributes(**attributes: Any) -> bytes:
    """A 3x3 conv of a [1, 3, 8, 8] input with the given (hostile) attributes."""
    nodes = [helper.make_node("Conv", ["X", "W"], ["Y"], name="conv", **attributes)]
    return _model(nodes, [_float_input("X", [1, 3, 8, 8])], ["Y"], [_weight("W")]).SerializeToString()


def resize_then_conv(scale: float) -> bytes:
    """Resize of a [1, 3, 8, 8] input by ``scale`` on both spatial axes, then a 3x3 conv."""
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, scale, scale])
    nodes = [
        helper.make_node("Resize", ["X", "", "scales"], ["R"], mode="nearest"),
        helper.make_node("Conv", ["R", "W"], ["Y"], name="conv"),
    ]
    return _model(nodes, [_float_input("X", [1, 3, 8, 8])], ["Y"], [scales, _weight("W")]).SerializeToString()


# ---------------------------------------------------------------------------------------------
# Wide and long graphs
# ---------------------------------------------------------------------------------------------


def fan_in(count: int) -> bytes:
    """``count`` 1x1 convs of ``X`` whose outputs all feed one ``Sum``."""
    nodes = [helper.make_node("Conv", ["X", f"w{i}"], [f"c{i}"], name=f"conv{i}") for i in range(count)]
    nodes.append(helper.make_node("Sum", [f"c{i}" for i in range(count)], ["Y"], name="sum"))
    weights = [_weight(f"w{i}", (1, 1, 1, 1)) for i in range(count)]
    return _model(nodes, [_float_input("X", [1, 1, 4, 4])], ["Y"], weights).SerializeToString()


def conv_chain(count: int) -> bytes:
    """``count`` 1x1 convs in a row, each followed by an ``Add`` of its own bias."""
    nodes = []
    initializers = []
    previous = "X"
    for i in range(count):
        nodes.append(helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("Add", [f"c{i}", f"b{i}"], [f"a{i}"]))
        initializers += [_weight(f"w{i}", (1, 1, 1, 1)), _weight(f"b{i}", (1, 1, 1, 1))]
        previous = f"a{i}"
    return _model(nodes, [_float_input("X", [1, 1, 4, 4])], [previous], initializers).SerializeToString()


def random_wide_or_long(rng: random.Random) -> bytes:
    """A fan-in (one ``Sum``/``Concat``/``Add`` tree of many convs) or a long chain of convs and
    pass-through ops, of random size."""
    count = rng.choice([1, 2, 10, 100, 1000, 3000])
    if rng.random() < 0.5:
        op = rng.choice(["Sum", "Concat", "Max"])
        nodes = [helper.make_node("Conv", ["X", "w"], [f"c{i}"], name=f"conv{i}") for i in range(count)]
        attributes = {"axis": 1} if op == "Concat" else {}
        nodes.append(helper.make_node(op, [f"c{i}" for i in range(count)], ["Y"], **attributes))
        return _model(
            nodes, [_float_input("X", [1, 1, 4, 4])], ["Y"], [_weight("w", (1, 1, 1, 1))]
        ).SerializeToString()
    nodes = []
    previous = "X"
    for i in range(count):
        op = rng.choice(["Conv", "Conv", "Identity", "Relu", "Add"])
        if op == "Conv":
            nodes.append(helper.make_node("Conv", [previous, "w"], [f"n{i}"], name=f"conv{i}"))
        elif op == "Add":
            nodes.append(helper.make_node("Add", [previous, "b"], [f"n{i}"]))
        else:
            nodes.append(helper.make_node(op, [previous], [f"n{i}"]))
        previous = f"n{i}"
    initializers = [_weight("w", (1, 1, 1, 1)), _weight("b", (1, 1, 1, 1))]
    return _model(nodes, [_float_input("X", [1, 1, 4, 4])], [previous], initializers).SerializeToString()


STRUCTURED: dict[str, Callable[[random.Random], bytes]] = {
    "onnx-function-bomb": random_function_bomb,
    "onnx-propagation": random_propagation_growth,
    "onnx-wide-long": random_wide_or_long,
}
"""Generated (not mutated) ONNX cases for the fuzzers, by name."""
