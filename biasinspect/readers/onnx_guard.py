"""A cheap pre-pass that bounds what ONNX shape inference could build, before it runs.

ONNX shape inference with data propagation keeps the *values* of small integer tensors (shape
vectors) as it goes, and turns them back into shapes: ``Shape`` gives a vector as long as its
input's rank, ``Concat`` adds lengths up, ``ConstantOfShape`` / ``Expand`` / ``Reshape`` make a
tensor whose rank is that length.  ``Shape`` followed by N chained ``Concat(s, s)`` makes a
vector of 2**N elements from a file of a few hundred bytes; onnx's C++ code allocates it without
any limit.  Data propagation also treats a 1-D integer tensor of static length L as L unknown
values, so a declared input of shape [2**40] is enough.  Even without data propagation, onnx
makes a ``ConstantOfShape`` of a vector of static length L a tensor of rank L, and a chain of
``Unsqueeze`` grows ranks one node at a time (each value keeping its own shape).

:func:`inference_plan` walks the graph once (subgraphs and model-local function bodies included,
the latter once per distinct input bounds) and computes, for every value, upper bounds for

* its rank without data propagation, and with it;
* its number of elements (data propagation holds the values of integer scalars and vectors).

and so decides how inference may run: with data propagation, without it, or not at all.  The
bounds are deliberately coarse (an op not listed here keeps the largest rank of its inputs and
holds no propagated values); real models stay far below the caps.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from biasinspect import limits
from biasinspect.readers.onnx_proto import (
    _A_INTS,
    _attr,
    _is_default_domain,
    _subgraphs,
    _type_shape,
)

_SATURATED = 1 << 62
"""Bounds saturate here: Python ints are unbounded, but a bound past every cap is just 'too big'."""

_INTEGER_TYPES = frozenset({2, 3, 4, 5, 6, 7, 12, 13, 21, 22, 25, 26})  # (u)int8..64, (u)int4/2
_UNKNOWN_TYPE = 0

# Ops whose output shape is given by the *values* of one input (index): rank = that input's length.
_SHAPE_FROM_VALUES = {"ConstantOfShape": 0, "Expand": 1, "Reshape": 1}
# Ops whose integer output data propagation may hold, with how its length relates to the inputs.
_SUMMED = frozenset({"Concat"})
_INTEGER_PRODUCERS = frozenset({"Range", "NonZero", "TopK", "ArgMax", "ArgMin", "Unique", "OneHot"})
"""Ops with integer outputs of a length not bounded here (at most one axis more than their inputs)."""
_SAME_AS_FIRST = frozenset({"Identity", "CastLike", "Squeeze", "Unsqueeze", "Slice", "Neg", "Abs"})
_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Where", "Equal", "Less", "Greater"})


class InferencePlan(Enum):
    """How ONNX shape inference may run on a model."""

    WITH_DATA_PROPAGATION = "data propagation"
    WITHOUT_DATA_PROPAGATION = "no data propagation"
    SKIP = "skip"


@dataclass(frozen=True)
class _Bound:
    """Upper bounds for one value (see the module docstring)."""

    rank: int
    """Rank without data propagation."""
    rank_propagated: int
    """Rank with data propagation."""
    length: int
    """Elements (data propagation holds that many values of an integer scalar or vector, and a
    vector given as a shape makes a tensor of that rank)."""
    integer: bool


_NOTHING = _Bound(0, 0, 0, False)

_Task = Generator[Any, Any, Any]
"""A step of the evaluation: yields sub-tasks, receives their results, returns its own."""


def _sat(value: int) -> int:
    return min(value, _SATURATED)


def _numel_bound(dims: Iterable[int | None]) -> int:
    count = 1
    for dim in dims:
        count = _sat(count * (dim if dim is not None and dim > 0 else 1))
    return count


def _declared(type_proto: Any, name: str) -> _Bound | None:
    elem_type, shape = _type_shape(type_proto, name)
    if shape is None:
        return None if elem_type == _UNKNOWN_TYPE else _Bound(0, 0, 0, elem_type in _INTEGER_TYPES)
    integer = elem_type in _INTEGER_TYPES or elem_type == _UNKNOWN_TYPE
    # A declared 1-D integer tensor of static length L is L propagated values.
    return _Bound(len(shape), len(shape), _numel_bound(shape), integer)


def _tensor_bound(tensor: Any) -> _Bound:
    """Bound of a TensorProto or (by its dense dims and its values' dtype) a SparseTensorProto."""
    dims = [int(d) for d in tensor.dims]
    data_type = tensor.values.data_type if hasattr(tensor, "values") else tensor.data_type
    integer = int(data_type) in _INTEGER_TYPES
    return _Bound(len(dims), len(dims), _numel_bound(dims), integer)


def _constant_bound(node: Any) -> _Bound:
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.HasField("t"):
            return _tensor_bound(attribute.t)
        if attribute.name == "value_ints":
            return _Bound(1, 1, _sat(len(attribute.ints)), True)
        if attribute.name == "value_int":
            return _Bound(0, 0, 1, True)
        if attribute.name == "value_floats":
            return _Bound(1, 1, _sat(len(attribute.floats)), False)
        if attribute.name == "value_strings":
            return _Bound(1, 1, _sat(len(attribute.strings)), False)
        if attribute.name == "sparse_value" and attribute.HasField("sparse_tensor"):
            return _tensor_bound(attribute.sparse_tensor)
    return _Bound(1, 1, 0, False)


class _Evaluator:
    """Walks node lists in order, keeping a bound per value name."""

    def __init__(self, functions: dict[tuple[str, str, str], Any], key_of: Any) -> None:
        self.functions = functions
        self.key_of = key_of
        self.memo: dict[tuple[Any, ...], list[_Bound]] = {}
        self.stack: list[tuple[str, str, str]] = []
        self.worst = _NOTHING
        self.total_dims = 0
        self.total_dims_propagated = 0

    def note(self, bound: _Bound) -> None:
        worst = self.worst
        # onnx propagates the values of integer scalars and vectors only.
        length = bound.length if bound.rank_propagated <= 1 and bound.integer else 0
        # Every inferred value keeps its own shape (and propagated values): the totals count.
        self.total_dims = _sat(self.total_dims + bound.rank)
        self.total_dims_propagated = _sat(self.total_dims_propagated + bound.rank_propagated + length)
        self.worst = _Bound(
            max(worst.rank, bound.rank),
            max(worst.rank_propagated, bound.rank_propagated),
            max(worst.length, length),
            True,
        )

    def run(self, task: _Task) -> Any:
        """Run a task and the tasks it asks for (each ``yield`` of a task hands over a sub-task
        and receives its result): an explicit stack, so nesting cannot exhaust Python's."""
        stack = [task]
        value: Any = None
        while stack:
            try:
                request = stack[-1].send(value)
            except StopIteration as done:
                stack.pop()
                value = done.value
                continue
            stack.append(request)
            value = None
        return value

    def graph(self, graph: Any, env: dict[str, _Bound]) -> _Task:
        """Bounds of a graph's outputs; ``env`` holds the enclosing scopes' values too (a name a
        subgraph reuses keeps the larger bound: still an upper bound, and no copying)."""
        for info in [*graph.input, *graph.value_info]:
            declared = _declared(info.type, str(info.name))
            if declared is not None:
                self.assign(env, str(info.name), declared)
        for tensor in graph.initializer:
            self.assign(env, str(tensor.name), _tensor_bound(tensor))
        for sparse in graph.sparse_initializer:
            self.assign(env, str(sparse.values.name), _tensor_bound(sparse))
        yield self.nodes(graph.node, env)
        outputs = []
        for info in graph.output:
            bound = env.get(str(info.name), _NOTHING)
            declared = _declared(info.type, str(info.name))
            outputs.append(bound if declared is None else _merge(bound, declared))
        return outputs

    def nodes(self, nodes: Sequence[Any], env: dict[str, _Bound]) -> _Task:
        for node in nodes:
            inputs = [env.get(str(name), _NOTHING) if name else _NOTHING for name in node.input]
            count = max(len(node.output), 1)
            subgraph_outputs = []
            for _, graph in _subgraphs(node):
                subgraph_outputs.append((yield self.graph(graph, env)))
            key = self.key_of(node)
            if key in self.functions:
                outputs = yield self.call(key, inputs, count)
            else:
                outputs = self.node(node, inputs, count, subgraph_outputs)
            for name, bound in zip(node.output, outputs, strict=False):
                if name:
                    self.assign(env, str(name), bound)
        return None

    def assign(self, env: dict[str, _Bound], name: str, bound: _Bound) -> None:
        previous = env.get(name)
        env[name] = bound if previous is None else _merge(previous, bound)
        self.note(bound)

    def node(
        self, node: Any, inputs: list[_Bound], count: int, subgraph_outputs: list[list[_Bound]]
    ) -> list[_Bound]:
        """Bounds of the outputs of a node that is not a function call."""
        op = str(node.op_type)
        widest = max((b.rank for b in inputs), default=0)
        widest_propagated = max((b.rank_propagated for b in inputs), default=0)
        integer = any(b.integer for b in inputs)
        if subgraph_outputs:
            # If: a branch's output; Loop / Scan: a body output with one more axis.
            extra = 0 if op == "If" else 1
            ranks = [b.rank + extra for outs in subgraph_outputs for b in outs]
            ranks_propagated = [b.rank_propagated + extra for outs in subgraph_outputs for b in outs]
            return [
                _Bound(max([widest, *ranks]), max([widest_propagated, *ranks_propagated]), _SATURATED, True)
            ] * count
        if not _is_default_domain(node) and str(node.domain) != "ai.onnx.ml":
            # onnx has no schema for other domains: it infers nothing about their outputs.
            return [_Bound(widest, widest_propagated, 0, False)] * count
        first = inputs[0] if inputs else _NOTHING
        if op == "Constant":
            return [_constant_bound(node)]
        if op == "Shape":
            return [_Bound(1, 1, first.rank_propagated, True)]
        if op == "Size":
            return [_Bound(0, 0, 1, True)]
        if op in _SHAPE_FROM_VALUES:
            # The output's rank is the length of the shape vector: its stored length, its static
            # length (onnx sets the rank from it even without data propagation) or the length of
            # its propagated values.
            index = _SHAPE_FROM_VALUES[op]
            shape = inputs[index] if index < len(inputs) else _NOTHING
            kept = widest if op != "ConstantOfShape" else 0
            rank = max(kept, shape.length)
            return [
                _Bound(rank, max(widest_propagated, rank), _SATURATED, integer or op == "ConstantOfShape")
            ]
        if op == "Unsqueeze":
            axes = _attr(node, "axes")
            added = len(axes.ints) if axes is not None and axes.type == _A_INTS else 0
            if len(inputs) > 1:
                added = max(added, inputs[1].length)
            return [
                _Bound(
                    _sat(first.rank + added), _sat(first.rank_propagated + added), first.length, first.integer
                )
            ]
        if op in _SUMMED:
            return [_Bound(widest, widest_propagated, _sat(sum(b.length for b in inputs)), integer)]
        if op == "Cast":
            to = _attr(node, "to")
            casts_to_integer = to is not None and int(to.i) in _INTEGER_TYPES
            return [_Bound(first.rank, first.rank_propagated, first.length, casts_to_integer)]
        if op in _SAME_AS_FIRST:
            return [_Bound(first.rank, first.rank_propagated, first.length, first.integer)] * count
        if op in _BROADCAST or op == "Gather":
            if all(b.rank_propagated <= 1 for b in inputs):  # vectors: the longest one
                length = max((b.length for b in inputs), default=0)
            else:
                length = 1
                for b in inputs:
                    length = _sat(length * max(b.length, 1))
            if op == "Gather":
                rank = _sat(first.rank + (inputs[1].rank if len(inputs) > 1 else 0))
                rank_propagated = _sat(
                    first.rank_propagated + (inputs[1].rank_propagated if len(inputs) > 1 else 0)
                )
                return [_Bound(rank, rank_propagated, length, first.integer)]
            return [_Bound(widest, widest_propagated, length, integer)] * count
        if op in _INTEGER_PRODUCERS:
            return [_Bound(widest + 1, widest_propagated + 1, _SATURATED, True)] * count
        if op == "Einsum":
            return [
                _Bound(
                    _sat(sum(b.rank for b in inputs)),
                    _sat(sum(b.rank_propagated for b in inputs)),
                    _SATURATED,
                    integer,
                )
            ]
        # Anything else: no more axes than its widest input, and a size not bounded here.
        return [_Bound(widest, widest_propagated, _SATURATED, integer)] * count

    def call(self, key: tuple[str, str, str], inputs: list[_Bound], count: int) -> _Task:
        """Bounds of a function call's outputs: its body evaluated with the call's input bounds
        (once per distinct input bounds)."""
        if key in self.stack:  # onnx refuses recursive functions; nothing is built
            return [_NOTHING] * count
        memo_key = (key, tuple(inputs))
        if memo_key not in self.memo:
            function = self.functions[key]
            env = {str(formal): bound for formal, bound in zip(function.input, inputs, strict=False)}
            self.stack.append(key)
            yield self.nodes(function.node, env)
            self.stack.pop()
            self.memo[memo_key] = [env.get(str(name), _NOTHING) for name in function.output]
        outputs = self.memo[memo_key]
        return (outputs + [_NOTHING] * count)[:count]


def _merge(computed: _Bound, declared: _Bound) -> _Bound:
    return _Bound(
        max(computed.rank, declared.rank),
        max(computed.rank_propagated, declared.rank_propagated),
        max(computed.length, declared.length),
        computed.integer or declared.integer,
    )


def inference_plan(
    model: Any, functions: dict[tuple[str, str, str], Any], key_of: Any
) -> tuple[InferencePlan, str]:
    """How shape inference may run on ``model`` (with the model-local ``functions``, called by
    ``key_of(node)`` keys), and why when it may not run with data propagation."""
    evaluator = _Evaluator(functions, key_of)
    evaluator.run(evaluator.graph(model.graph, {}))
    worst = evaluator.worst
    if evaluator.total_dims > limits.MAX_ONNX_INFERRED_DIMS:
        return (
            InferencePlan.SKIP,
            f"inferred shapes could hold {_shown(evaluator.total_dims)} dims in all (cap {limits.MAX_ONNX_INFERRED_DIMS:,})",
        )
    if worst.rank > limits.MAX_ONNX_RANK:
        return (
            InferencePlan.SKIP,
            f"tensor ranks could reach {_shown(worst.rank)} (cap {limits.MAX_ONNX_RANK:,})",
        )
    if worst.rank_propagated > limits.MAX_ONNX_RANK:
        return (
            InferencePlan.WITHOUT_DATA_PROPAGATION,
            f"data propagation could build ranks up to {_shown(worst.rank_propagated)} (cap {limits.MAX_ONNX_RANK:,})",
        )
    if evaluator.total_dims_propagated > limits.MAX_ONNX_INFERRED_DIMS:
        return (
            InferencePlan.WITHOUT_DATA_PROPAGATION,
            f"data propagation could build {_shown(evaluator.total_dims_propagated)} dims and values in all "
            f"(cap {limits.MAX_ONNX_INFERRED_DIMS:,})",
        )
    if worst.length > limits.MAX_ONNX_PROPAGATED_ELEMENTS:
        return (
            InferencePlan.WITHOUT_DATA_PROPAGATION,
            f"data propagation could hold {_shown(worst.length)} values for one tensor "
            f"(cap {limits.MAX_ONNX_PROPAGATED_ELEMENTS:,})",
        )
    return InferencePlan.WITH_DATA_PROPAGATION, ""


def _shown(bound: int) -> str:
    return "more than 2**62" if bound >= _SATURATED else f"{bound:,}"
