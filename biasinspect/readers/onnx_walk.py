"""The ONNX graph walk: main graph, subgraphs, and model-local functions expanded per call site."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from biasinspect import limits
from biasinspect.errors import ResourceLimitError
from biasinspect.model import ConvNode, MaybeShape
from biasinspect.readers.onnx_bias import _conv_node
from biasinspect.readers.onnx_core import _onnx
from biasinspect.readers.onnx_guard import InferencePlan, inference_plan
from biasinspect.readers.onnx_params import _external_location_problem
from biasinspect.readers.onnx_proto import (
    _EXTERNAL,
    _attr_int,
    _conv_spec,
    _ConvSpec,
    _first_line,
    _is_default_domain,
    _nested_nodes,
    _subgraphs,
    _subgraphs_of_attribute,
)
from biasinspect.readers.onnx_shapes import _MAX_EXPR_DEPTH, _Scope

"""How many pass-through nodes are followed from a conv output towards its bias Add."""
_MAX_FUNCTION_DEPTH = 32
"""Deepest chain of nested model-local function calls analysed."""


_FunctionKey = tuple[str, str, str]
"""(domain, name, overload) of a model-local function; "ai.onnx" is spelled ""."""


def _function_key(domain: str, name: str, overload: str) -> _FunctionKey:
    return ("" if domain == "ai.onnx" else domain, name, overload)


def _node_key(node: Any) -> _FunctionKey:
    """The function key a node would call."""
    return _function_key(str(node.domain), str(node.op_type), str(getattr(node, "overload", "")))


def _function_key_of(function: Any) -> _FunctionKey:
    """The key a FunctionProto is called by."""
    return _function_key(str(function.domain), str(function.name), str(getattr(function, "overload", "")))


def _calls_within(nodes: Iterable[Any], functions: dict[_FunctionKey, Any]) -> list[_FunctionKey]:
    """The model-local functions called by a node list, subgraphs included, once per call site."""
    if not functions:  # the common case: no walk needed
        return []
    return [key for node in _nested_nodes(nodes) if (key := _node_key(node)) in functions]


def _expansion(
    roots: Iterable[_FunctionKey],
    calls: dict[_FunctionKey, list[_FunctionKey]],
    own_nodes: dict[_FunctionKey, int],
) -> tuple[int, int]:
    """(function instances, nodes) of a full expansion of nested model-local function calls from
    ``roots`` -- what ONNX shape inference expands and the walk analyses -- counted call path by
    call path (a function called twice at every level doubles per level, however deep), and
    stopped as soon as either passes its cap.  A recursive call is not followed (onnx refuses
    recursive functions; the walk stops there too).

    ``calls`` maps each function to the functions its body calls (subgraphs included), once per
    call site; ``own_nodes`` to its body's node count (subgraphs included).  Iterative: the work
    is at most the capped number of instances, whatever the nesting.
    """
    instances = nodes = 0
    for root in roots:
        path = [root]
        on_path = {root}
        pending = [iter(calls[root])]
        instances += 1
        nodes += own_nodes[root]
        while pending:
            if instances > limits.MAX_ONNX_FUNCTION_INSTANCES or nodes > limits.MAX_ONNX_WALK_NODES:
                return instances, nodes
            callee = next(pending[-1], None)
            if callee is None:
                pending.pop()
                on_path.discard(path.pop())
            elif callee not in on_path:
                instances += 1
                nodes += own_nodes[callee]
                path.append(callee)
                on_path.add(callee)
                pending.append(iter(calls[callee]))
    return instances, nodes


# ------------------------------------------------------------------------------------------------
# The graph walk


@dataclass
class _Context:
    """State shared by one model's reading and walk."""

    model_dir: Path | None
    locate: Callable[[str], str]
    """The name a file next to the model has (for external data files: never opened)."""
    functions: dict[_FunctionKey, Any] = field(default_factory=dict)
    calls: dict[_FunctionKey, list[_FunctionKey]] = field(default_factory=dict)
    """For each function, the functions its body calls (subgraphs included)."""
    model: Any = None
    """The (shape-inferred) model being walked."""
    inputs_static: bool = False
    """Every input of the graph being walked has a fully known shape (so an unknown conv output
    size means shape inference lost track, which is worth a note)."""
    convs: list[ConvNode] = field(default_factory=list)
    node_names: list[str] = field(default_factory=list)
    """For each conv in ``convs``, its name from the node alone (to tell apart convs that share
    one PyTorch module path)."""
    warnings: list[str] = field(default_factory=list)
    called: set[_FunctionKey] = field(default_factory=set)
    inference_cache: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    """Inferred function bodies by (function, bound input types, call attributes)."""
    reachable: dict[_FunctionKey, list[_FunctionKey]] = field(default_factory=dict)
    sizes: dict[_FunctionKey, int] = field(default_factory=dict)
    own_nodes: dict[_FunctionKey, int] = field(default_factory=dict)
    """For each function, its body's nodes (subgraphs included)."""
    visited_nodes: int = 0
    inferred_function_nodes: int = 0
    external_files: set[str] = field(default_factory=set)
    """External data files the model names inside its folder (never opened)."""

    def warn(self, message: str) -> None:
        """Add a warning once."""
        if message not in self.warnings:
            self.warnings.append(message)

    def warn_external(self, tensor: Any) -> None:
        """Warn about a tensor whose external data location is suspicious (nothing is opened)."""
        if tensor.data_location != _EXTERNAL:
            return
        location = next((str(e.value) for e in tensor.external_data if e.key == "location"), "")
        problem = _external_location_problem(location, self.model_dir)
        if problem is not None:
            self.warn(f"external data of tensor '{tensor.name}' {problem}; not opened")
        else:
            self.external_files.add(self.locate(location))

    def reachable_from(self, key: _FunctionKey) -> list[_FunctionKey]:
        """``key`` and every function its body calls, directly or not."""
        if key not in self.reachable:
            seen = {key}
            order = [key]
            for current in order:  # grows while iterating: a breadth-first closure
                for callee in self.calls.get(current, ()):
                    if callee not in seen:
                        seen.add(callee)
                        order.append(callee)
            self.reachable[key] = order
        return self.reachable[key]

    def inference_size(self, key: _FunctionKey) -> int:
        """Nodes ONNX shape inference works through for one call of ``key``: its body and, expanded
        call by call, the bodies of the functions it calls (subgraphs included)."""
        if key not in self.sizes:
            # Iterative post-order over the call graph; a recursive call adds nothing (onnx
            # refuses recursive functions before expanding anything).
            frames = [(key, iter(self.calls[key]))]
            on_path = {key}
            totals = [self.own_nodes[key]]
            while frames:
                current, callees = frames[-1]
                callee = next(callees, None)
                if callee is None:
                    frames.pop()
                    on_path.discard(current)
                    total = totals.pop()
                    self.sizes[current] = total
                    if totals:
                        totals[-1] = min(totals[-1] + total, _SIZE_CEILING)
                elif callee in self.sizes:
                    totals[-1] = min(totals[-1] + self.sizes[callee], _SIZE_CEILING)
                elif callee not in on_path:
                    frames.append((callee, iter(self.calls[callee])))
                    on_path.add(callee)
                    totals.append(self.own_nodes[callee])
        return self.sizes[key]


_SIZE_CEILING = 1 << 62
"""Expanded sizes saturate here (they are compared with caps far below it)."""


_Frame = Iterator[tuple[_Scope, tuple[_FunctionKey, ...]]]


def _walk(ctx: _Context, root: _Scope, stack: tuple[_FunctionKey, ...]) -> None:
    """Collect the convs of a scope and of every subgraph and function call inside it, in node order.

    Iterative (an explicit stack of per-scope generators), so nesting subgraphs inside functions
    inside subgraphs cannot exhaust Python's stack.
    """
    frames: list[_Frame] = [_scope_steps(ctx, root, stack)]
    while frames:
        child = next(frames[-1], None)
        if child is None:
            frames.pop()
        else:
            frames.append(_scope_steps(ctx, *child))


def _scope_steps(ctx: _Context, scope: _Scope, stack: tuple[_FunctionKey, ...]) -> _Frame:
    """Record one scope's convs; yield each nested scope (subgraph, function call) to walk, in order."""
    ctx.visited_nodes += len(scope.nodes)
    if ctx.visited_nodes > limits.MAX_ONNX_WALK_NODES:
        raise ResourceLimitError(
            f"ONNX graph walk exceeds {limits.MAX_ONNX_WALK_NODES:,} nodes (subgraphs and functions included)"
        )
    for index, node in enumerate(scope.nodes):
        spec = _conv_spec(node)
        key = _node_key(node)
        if spec is not None:
            if _attr_int(node, "channels_last", 0):
                spec = _ConvSpec(spec.x, spec.weight, spec.bias, spec.transposed, True, spec.quantized)
            conv = _conv_node(scope, index, spec)
            kernel = conv.kernel_shape
            output = conv.output_spatial
            if ctx.inputs_static and kernel and None not in kernel and (output is None or None in output):
                # The model's input sizes are fixed and so is the kernel: the size of this conv's
                # input was lost on the way (an op neither inference nor our fallback follows).
                x_name = str(node.input[spec.x]) if len(node.input) > spec.x else ""
                conv = replace(
                    conv,
                    notes=(
                        *conv.notes,
                        f"output size unknown: the size of input '{x_name}' could not be inferred, "
                        "although the model's input shapes are fixed",
                    ),
                )
            ctx.convs.append(conv)
            ctx.node_names.append(scope.prefix + scope.node_name(index))
        elif (
            node.op_type in ("Conv", "ConvTranspose")
            and not _is_default_domain(node)
            and key not in ctx.functions
        ):
            ctx.warn(
                f"{scope.prefix}{scope.node_name(index)}: {node.op_type} in domain '{node.domain}' "
                "is not a standard convolution and was not analysed"
            )
        for label, graph in _subgraphs(node):
            prefix = f"{scope.prefix}{scope.node_name(index)}/{label}/"
            yield _Scope.for_graph(graph, parent=scope, prefix=prefix), stack
        function = ctx.functions.get(key)
        if function is not None:
            ctx.called.add(key)
            body = _function_scope(ctx, function, key, scope, index, stack)
            if body is not None:
                yield body, (*stack, key)


def _infer_bounded(ctx: _Context, model: Any, where: str) -> Any:
    """``model`` shape-inferred as far as :func:`~biasinspect.readers.onnx_guard.inference_plan`
    allows (with data propagation, without it, or not at all; a warning says which and why), or
    as it was when inference fails."""
    plan, reason = inference_plan(model, ctx.functions, _node_key)
    if plan is InferencePlan.SKIP:
        ctx.warn(f"shape inference{where} was not run: {reason}")
        return model
    if plan is InferencePlan.WITHOUT_DATA_PROPAGATION:
        ctx.warn(f"shape inference{where} ran without data propagation: {reason}")
    try:
        return _onnx().infer_shapes(model, data_propagation=plan is InferencePlan.WITH_DATA_PROPAGATION)
    except Exception as error:  # InferenceError, ValidationError, RuntimeError, ...
        ctx.warn(f"shape inference failed{where}: {_first_line(error)}")
        return model


def _substitute_attributes(nodes: Iterable[Any], call: Any | None, function: Any, depth: int = 0) -> None:
    """Replace attribute references (``ref_attr_name``) in a function body with the call's values."""
    defaults = {str(a.name): a for a in function.attribute_proto}
    provided = {str(a.name): a for a in call.attribute} if call is not None else {}
    for node in nodes:
        kept = []
        for attribute in node.attribute:
            ref = str(attribute.ref_attr_name)
            if ref:
                source = provided.get(ref, defaults.get(ref))
                if source is None:
                    continue
                replacement = type(attribute)()
                replacement.CopyFrom(source)
                replacement.name = attribute.name
                kept.append(replacement)
            else:
                if depth < _MAX_EXPR_DEPTH:
                    for _, graph in _subgraphs_of_attribute(attribute):
                        _substitute_attributes(graph.node, call, function, depth + 1)
                kept.append(attribute)
        del node.attribute[:]
        node.attribute.extend(kept)


def _function_scope(
    ctx: _Context,
    function: Any,
    key: _FunctionKey,
    caller: _Scope | None,
    call_index: int | None,
    stack: tuple[_FunctionKey, ...],
) -> _Scope | None:
    """A function body's scope for one call site (or, with no caller, with unknown inputs);
    None when the call is not followed (recursion, nesting too deep)."""
    label = f"{key[0]}.{key[1]}" if key[0] else key[1]
    if key in stack:
        ctx.warn(f"function '{label}' calls itself; the recursive call was not followed")
        return None
    if len(stack) >= _MAX_FUNCTION_DEPTH:
        ctx.warn(f"function calls nested deeper than {_MAX_FUNCTION_DEPTH}; '{label}' was not analysed")
        return None
    call = caller.nodes[call_index] if caller is not None and call_index is not None else None
    formals = [str(name) for name in function.input]
    actuals = [str(name) for name in call.input] if call is not None else []
    bindings: dict[str, tuple[_Scope, str]] = {}
    bound_types: list[tuple[int, MaybeShape]] = []
    for position, formal in enumerate(formals):
        actual = actuals[position] if position < len(actuals) else ""
        if caller is None or not actual:
            bound_types.append((0, None))
            continue
        bindings[formal] = (caller, actual)
        bound_types.append((caller.elem_type(actual), caller.shape(actual)))
    # The inferred body depends only on the function, its inputs' types and the call's attributes:
    # call sites that agree on those share one inference (and one copy of the body).
    attributes = (
        tuple(sorted(a.SerializeToString(deterministic=True) for a in call.attribute)) if call else ()
    )
    cache_key = (key, tuple(bound_types), attributes)
    body = ctx.inference_cache.get(cache_key)
    if body is None:
        model = _function_model(ctx, function, key, call, formals, bound_types)
        size = ctx.inference_size(key)
        if ctx.inferred_function_nodes + size > limits.MAX_ONNX_FUNCTION_INFERENCE_NODES:
            # Over budget: walk this call site without inference, and keep nothing for later.
            ctx.warn(
                "shape inference inside functions stopped after "
                f"{limits.MAX_ONNX_FUNCTION_INFERENCE_NODES:,} nodes; shapes in the remaining call sites may be unknown"
            )
            body = model.graph
        else:
            ctx.inferred_function_nodes += size
            body = _infer_bounded(ctx, model, f" in function '{label}'").graph
            ctx.inference_cache[cache_key] = body
    prefix = (
        f"{caller.prefix}{caller.node_name(call_index)}/"
        if caller is not None and call_index is not None
        else f"{label}/"
    )
    return _Scope(
        body.node,
        inputs=formals,
        outputs=[str(name) for name in function.output],
        value_infos=[*body.input, *body.value_info, *body.output],
        prefix=prefix,
        bindings=bindings,
    )


def _function_model(
    ctx: _Context,
    function: Any,
    key: _FunctionKey,
    call: Any | None,
    formals: Sequence[str],
    bound_types: Sequence[tuple[int, MaybeShape]],
) -> Any:
    """A model whose graph is the function body with the call's input types and attributes bound.

    It carries only the functions reachable from this one (doc strings were dropped up front), so
    its size is the function's own, not the model's.
    """
    onnx = _onnx()
    graph = onnx.pb.GraphProto()
    graph.name = str(function.name)
    for formal, (elem_type, shape) in zip(formals, bound_types, strict=True):
        info = graph.input.add()
        info.name = formal
        if elem_type:
            tensor_type = info.type.tensor_type
            tensor_type.elem_type = elem_type
            if shape is not None:
                tensor_type.shape.SetInParent()
                for dim in shape:
                    proto_dim = tensor_type.shape.dim.add()
                    if dim is not None:
                        proto_dim.dim_value = dim
    graph.node.extend(function.node)
    _substitute_attributes(graph.node, call, function)
    for name in function.output:
        graph.output.add().name = str(name)
    model = onnx.pb.ModelProto()
    model.ir_version = ctx.model.ir_version
    domains: dict[str, int] = {str(o.domain): int(o.version) for o in ctx.model.opset_import}
    domains.update({str(o.domain): int(o.version) for o in function.opset_import})
    for domain, version in domains.items():
        model.opset_import.add(domain=domain, version=version)
    model.functions.extend(ctx.functions[k] for k in ctx.reachable_from(key)[1:])
    model.graph.CopyFrom(graph)
    return model


def _drop_doc_strings(functions: Iterable[Any]) -> None:
    """Clear the doc strings of function protos and their nodes (they are copied per call site)."""
    for function in functions:
        function.ClearField("doc_string")
        for node in _nested_nodes(function.node):
            node.ClearField("doc_string")
