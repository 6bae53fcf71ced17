"""TorchScript archives (``torch.jit.save`` of scripted or traced modules), read inertly.

A TorchScript zip holds ``<prefix>/data.pkl`` (the module objects: ``__torch__.<qualname>``
stubs whose ``BUILD`` state is a dict of attributes) and ``<prefix>/code/__torch__/**.py``
(the classes as TorchScript source).  The code TEXT is parsed with :func:`ast.parse` -- never
compiled or executed -- to learn, per class:

* ``__parameters__`` / ``__buffers__``: which attributes are parameters (model_params) and
  buffers;
* ``Final`` constants (``groups : Final[int] = 1``, ``transposed``, ``in_channels``...);
* literal ``groups``/``transposed`` arguments of ``torch._convolution`` / ``torch.conv2d`` /
  ``torch.conv_transpose2d`` calls in the methods (traced modules have no constants).

The object tree is then turned into :class:`~biasinspect.readers.module_tree.ModuleNode` and
described by :func:`~biasinspect.readers.module_tree.describe_module_tree`.

Code-size cap: :func:`parse_code` reads at most ``limits.MAX_ZIP_TOTAL_BYTES // 2`` bytes
(256 MiB) of declared ``code/**.py`` text in total (ResourceLimitError past it), leaving the
other half of the archive read budget for the pickles.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from biasinspect import limits
from biasinspect.errors import ResourceLimitError
from biasinspect.readers.archive import Archive
from biasinspect.readers.module_tree import ModuleNode, fill_packed_module
from biasinspect.readers.pickle_inert import Call, tensor_of
from biasinspect.readers.tensors import join_name

__all__ = [
    "ClassInfo",
    "ForwardFlow",
    "forward_flow",
    "module_from_torchscript",
    "parse_code",
    "plain_class_name",
]

_MANGLE_RE = re.compile(r"\.?___torch_mangle_\d+")
_CONV_CALL_RE = re.compile(r"^(?:torch\.)?(?:_convolution|conv[123]d|conv_transpose[123]d|convolution)$")


@dataclass
class ClassInfo:
    """What the TorchScript source says about one class."""

    qualname: str
    is_module: bool
    parameters: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    constants: dict[str, object] = field(default_factory=dict)
    conv_facts: dict[str, object] = field(default_factory=dict)
    forward: ForwardFlow | None = None
    """What ``forward`` adds to what, when the class has a forward."""


@dataclass
class ForwardFlow:
    """The additions a ``forward`` makes, read from its code (see :func:`forward_flow`)."""

    adds_to_input: list[str] = field(default_factory=list)
    """Attributes (``self.<name>``) that ``forward`` adds to its input and returns: a bias module."""
    child_adds: list[tuple[str, str]] = field(default_factory=list)
    """(child, attribute): ``self.<attribute>`` is added to the output of ``self.<child>``,
    which is used nowhere else."""
    feeds: list[tuple[str, str]] = field(default_factory=list)
    """(child, next): the output of ``self.<child>`` goes only into ``self.<next>.forward``."""
    input_adds: list[str] = field(default_factory=list)
    """Attributes added to an input of the forward (a positional embedding), which the
    bias-name rule must then not attach to a conv."""


def plain_class_name(qualname: str) -> str:
    """``__torch__.torch.nn.modules.conv.___torch_mangle_0.Conv2d`` -> ``torch.nn.modules.conv.Conv2d``."""
    name = _MANGLE_RE.sub("", qualname)
    if name.startswith("__torch__."):
        name = name[len("__torch__.") :]
    return name


def _module_name(member: str, code_root: str) -> str:
    rel = member[len(code_root) : -len(".py")]
    return rel.replace("/", ".")


def parse_code(archive: Archive, prefix: str, warnings: list[str]) -> dict[str, ClassInfo]:
    """Parse every ``<prefix>/code/**.py`` member into :class:`ClassInfo` by qualified name."""
    code_root = f"{prefix}code/"
    classes: dict[str, ClassInfo] = {}
    budget = limits.MAX_ZIP_TOTAL_BYTES // 2
    for member in archive.names():
        if not member.startswith(code_root) or not member.endswith(".py"):
            continue
        size = archive.size(member)
        budget -= size
        if budget < 0:
            raise ResourceLimitError("TorchScript code is larger than the code-reading limit")
        text = archive.read(member, limits.MAX_ZIP_MEMBER_BYTES)
        try:
            tree = ast.parse(text.decode("utf-8"), filename=member)
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
            warnings.append(f"TorchScript code {member!r} could not be parsed; its classes are unknown")
            continue
        module = _module_name(member, code_root)
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                info = _class_info(f"{module}.{node.name}", node)
                classes[info.qualname] = info
    return classes


def _literal(node: ast.expr | None) -> object:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None


def _class_info(qualname: str, node: ast.ClassDef) -> ClassInfo:
    is_module = any(isinstance(b, ast.Name) and b.id == "Module" for b in node.bases)
    info = ClassInfo(qualname, is_module)
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            target = stmt.targets[0].id
            value = _literal(stmt.value)
            if target in ("__parameters__", "__buffers__") and isinstance(value, list):
                names = [v for v in value if isinstance(v, str)]
                if target == "__parameters__":
                    info.parameters = names
                else:
                    info.buffers = names
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            value = _literal(stmt.value)
            if value is not None:
                info.constants[stmt.target.id] = value
        elif isinstance(stmt, ast.FunctionDef):
            _scan_conv_calls(stmt, info.conv_facts)
            if stmt.name == "forward":
                info.forward = forward_flow(stmt)
    return info


def _dotted(node: ast.expr) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _scan_conv_calls(func: ast.FunctionDef, facts: dict[str, object]) -> None:
    for node in ast.walk(func):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if not _CONV_CALL_RE.match(name):
            continue
        leaf = name.rsplit(".", 1)[-1]
        args = node.args
        kwargs = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        if leaf in ("_convolution", "convolution"):
            # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, ...)
            transposed = _literal(args[6]) if len(args) > 6 else _literal(kwargs.get("transposed"))
            groups = _literal(args[8]) if len(args) > 8 else _literal(kwargs.get("groups"))
        elif leaf.startswith("conv_transpose"):
            # (input, weight, bias, stride, padding, output_padding, groups, dilation)
            transposed = True
            groups = _literal(args[6]) if len(args) > 6 else kwargs.get("groups", 1)
            groups = _literal(groups) if isinstance(groups, ast.expr) else groups
        else:
            # (input, weight, bias, stride, padding, dilation, groups)
            transposed = False
            groups = _literal(args[6]) if len(args) > 6 else kwargs.get("groups", 1)
            groups = _literal(groups) if isinstance(groups, ast.expr) else groups
        if isinstance(transposed, bool):
            facts["transposed"] = transposed
        if isinstance(groups, int) and not isinstance(groups, bool):
            facts["groups"] = groups


_ADD_CALLS = frozenset({"torch.add", "torch.add_"})
_ADD_METHODS = frozenset({"add", "add_"})
_VIEW_CALLS = frozenset(
    {"view", "reshape", "unsqueeze", "expand_as", "expand", "contiguous", "to", "type_as", "view_as"}
)
"""Calls that re-view or re-type one tensor (``torch.view(bias, [1, -1, 1, 1])``)."""

# Symbolic values of the little dataflow below: ("self",); ("attr", name) for ``self.name``;
# ("arg", i); ("call", child, input) for ``self.child.forward(input, ...)``; ("view", value);
# ("add", left, right); ("other",).  Each call is one tuple object, so identity tells calls apart.
_Value = tuple[object, ...]
_OTHER: _Value = ("other",)


class _Flow:
    """Evaluates one ``forward`` body symbolically (see :func:`forward_flow`)."""

    def __init__(self, func: ast.FunctionDef) -> None:
        arguments = [arg.arg for arg in func.args.args]
        self.self_name = arguments[0] if arguments else ""
        self.env: dict[str, _Value] = {name: ("arg", index) for index, name in enumerate(arguments[1:])}
        self.stores: dict[str, int] = {}
        self.loads: dict[str, int] = {}
        for node in ast.walk(func):
            if isinstance(node, ast.Name):
                counter = self.loads if isinstance(node.ctx, ast.Load) else self.stores
                counter[node.id] = counter.get(node.id, 0) + 1
        self.loaded: dict[str, int] = {}
        self.bound: dict[int, str] = {}  # id(call value) -> the local name holding it
        self.calls: list[_Value] = []
        self.adds: list[tuple[_Value, _Value, bool]] = []  # (call side, other side, only use)
        self.to_inputs: list[_Value] = []  # operands added to an input of the forward

    def value(self, expr: ast.expr) -> _Value:
        if isinstance(expr, ast.Name):
            self.loaded[expr.id] = self.loaded.get(expr.id, 0) + 1
            if expr.id == self.self_name:
                return ("self",)
            if self.stores.get(expr.id, 0) > 1:
                return _OTHER
            return self.env.get(expr.id, _OTHER)
        if (
            isinstance(expr, ast.Attribute)
            and isinstance(expr.value, ast.Name)
            and expr.value.id == self.self_name
        ):
            return ("attr", expr.attr)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self.add(self.value(expr.left), self.value(expr.right), in_place=False)
        if not isinstance(expr, ast.Call) or any(isinstance(arg, ast.Starred) for arg in expr.args):
            return _OTHER
        name = _dotted(expr.func)
        if isinstance(expr.func, ast.Attribute) and not name.startswith("torch."):
            receiver = self.value(expr.func.value)
            arguments = [self.value(arg) for arg in expr.args]
            method = expr.func.attr
            if method == "forward" and receiver[0] == "attr":
                call: _Value = ("call", receiver[1], arguments[0] if arguments else _OTHER)
                self.calls.append(call)
                return call
            if method in _ADD_METHODS and len(arguments) == 1 and not expr.keywords:
                return self.add(receiver, arguments[0], in_place=method == "add_")
            if method in _VIEW_CALLS:
                return ("view", receiver)
            return _OTHER
        arguments = [self.value(arg) for arg in expr.args]
        if name == "getattr" and len(arguments) == 2 and arguments[0] == ("self",):
            attr = _literal(expr.args[1])
            return ("attr", attr) if isinstance(attr, str) else _OTHER
        if name in _ADD_CALLS and len(arguments) == 2 and not expr.keywords:
            return self.add(arguments[0], arguments[1], in_place=name == "torch.add_")
        if name.startswith("torch.") and name[len("torch.") :] in _VIEW_CALLS and arguments:
            return ("view", arguments[0])
        return _OTHER

    def only_use(self, call: _Value, in_place: bool) -> bool:
        """The add being evaluated is the call's only use (an in-place add: its first use)."""
        name = self.bound.get(id(call))
        if name is None:
            return True  # an inline call: its one use is the expression it sits in
        if in_place:
            return self.loaded.get(name, 0) == 1
        return self.loads.get(name, 0) == 1

    def add(self, left: _Value, right: _Value, *, in_place: bool) -> _Value:
        for side, other in ((left, right), (right, left)):
            if side[0] == "call":
                self.adds.append((side, other, self.only_use(side, in_place)))
            elif side[0] == "arg":
                self.to_inputs.append(other)
        return ("add", left, right)

    def run(self, body: list[ast.stmt]) -> _Value:
        """Evaluate the straight-line statements; the value returned (``_OTHER`` if unknown)."""
        returned = _OTHER
        for stmt in body:
            if (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
            ):
                result = self.value(stmt.value)
                target = stmt.targets[0].id
                if self.stores.get(target, 0) == 1:
                    self.env[target] = result
                    if result[0] == "call":
                        self.bound[id(result)] = target
            elif isinstance(stmt, ast.Expr):
                self.value(stmt.value)
            elif isinstance(stmt, ast.Return) and stmt.value is not None:
                returned = self.value(stmt.value)
        return returned


def _attribute(operand: _Value) -> str | None:
    """``name`` when ``operand`` is ``self.name``, possibly re-viewed (``torch.view(bias, ...)``)."""
    while operand[0] == "view":
        inner = operand[1]
        if not isinstance(inner, tuple):
            return None
        operand = inner
    return operand[1] if operand[0] == "attr" and isinstance(operand[1], str) else None


MAX_FORWARD_NESTING = 200
"""Deepest syntax nesting of a ``forward`` whose adds are followed; generated TorchScript code
nests a few levels, a deeper one is read without its adds."""


def _nesting(func: ast.FunctionDef) -> int:
    """Depth of the deepest node under ``func`` (iteratively, so any depth is measured)."""
    deepest = 0
    stack: list[tuple[ast.AST, int]] = [(func, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def forward_flow(func: ast.FunctionDef) -> ForwardFlow:
    """Which attributes ``func`` (a TorchScript ``forward``) adds to its input or to a child's output.

    Only the straight-line statements of the body are followed; TorchScript code is in an
    SSA-like form (``_0 = getattr(self, "0")``, ``input0 = (_0).forward(input, )``, ``bias =
    self.bias``, ``_1 = torch.add(input0, bias)``), and a name assigned twice is unknown.  A
    child's output counts as biased only when the add is its only use (an in-place ``add_``:
    its first use), so a residual ``x + conv(x)`` is not a bias, and an add before a conv
    (``conv(x + self.pos)``) adds to the conv's input, never its output."""
    flow = ForwardFlow()
    if _nesting(func) > MAX_FORWARD_NESTING:
        return flow  # hostile code: nothing learned (the evaluation below recurses)
    evaluator = _Flow(func)
    try:
        returned = evaluator.run(func.body)
    except RecursionError:
        return flow  # a safety net: the nesting cap keeps the evaluation far from the stack limit
    for call, other, only in evaluator.adds:
        attr = _attribute(other)
        if only and attr is not None:
            flow.child_adds.append((str(call[1]), attr))
    for operand in evaluator.to_inputs:
        attr = _attribute(operand)
        if attr is not None:
            flow.input_adds.append(attr)
    for call in evaluator.calls:
        inner = call[2]
        if isinstance(inner, tuple) and inner[0] == "call" and evaluator.only_use(inner, in_place=False):
            flow.feeds.append((str(inner[1]), str(call[1])))
    if returned[0] == "add":
        operands: tuple[object, object] = (returned[1], returned[2])
        for side, added in (operands, operands[::-1]):
            name = _attribute(added) if isinstance(added, tuple) else None
            if side == ("arg", 0) and name is not None:
                flow.adds_to_input.append(name)
    return flow


def module_from_torchscript(root: Call, classes: dict[str, ClassInfo], warnings: list[str]) -> ModuleNode:
    """Build a module tree from a TorchScript ``data.pkl`` root object (iteratively)."""
    top = ModuleNode("", plain_class_name(root.func_name or "<dynamic>"))
    work: list[tuple[Call, ModuleNode, int]] = [(root, top, 0)]
    seen: set[int] = {id(root)}
    codeless: set[str] = set()
    opaque: set[str] = set()
    while work:
        obj, node, depth = work.pop()
        qualname = obj.func_name or ""
        info = classes.get(qualname)
        state = obj.state
        if fill_packed_module(node, obj):
            continue  # a quantized module's __getstate__ tuple, as in a pickled module
        if not isinstance(state, dict):
            if state is not None:
                opaque.add(qualname)
            continue
        if info is None:
            codeless.add(qualname)
        pending: list[tuple[Call, ModuleNode, int]] = []
        child_classes: dict[str, str] = {}
        for key, value in state.items():
            if not isinstance(key, str):
                continue
            if info is not None and key in info.parameters:
                node.params[key] = tensor_of(value)
                continue
            if info is not None and key in info.buffers:
                node.buffers[key] = tensor_of(value)
                continue
            tensor = tensor_of(value)
            if tensor is not None and info is None:
                # No code for this class: its tensors can only be taken as parameters.
                node.params[key] = tensor
                continue
            if isinstance(value, Call) and _is_script_module(value, classes):
                if id(value) in seen:
                    continue
                seen.add(id(value))
                if depth + 1 > limits.MAX_CONTAINER_DEPTH:
                    raise ResourceLimitError(
                        f"module nesting deeper than {limits.MAX_CONTAINER_DEPTH} levels at {key!r}"
                    )
                child = ModuleNode(
                    join_name(node.path, key), plain_class_name(value.func_name or "<dynamic>")
                )
                node.children.append(child)
                child_classes[key] = value.func_name or ""
                pending.append((value, child, depth + 1))
                continue
            node.attrs[key] = value
        if info is not None:
            for key, value in info.constants.items():
                node.attrs.setdefault(key, value)
            node.forward_conv = dict(info.conv_facts)
            if info.forward is not None:
                node.child_adds = _child_adds(info.forward, child_classes, classes)
                node.input_adds = set(info.forward.input_adds)
        work.extend(reversed(pending))
    if opaque:
        warnings.append(
            "TorchScript modules whose saved state is not understood (their tensors were not "
            f"counted, any convs in them not found): {', '.join(sorted(opaque)[:5])}"
        )
    if codeless:
        warnings.append(
            "TorchScript classes without code in the archive (their tensors were counted as "
            f"parameters): {', '.join(sorted(codeless)[:5])}"
        )
    return top


def _child_adds(
    flow: ForwardFlow, child_classes: dict[str, str], classes: dict[str, ClassInfo]
) -> dict[str, list[str]]:
    """Child -> attributes added to its output, relative to the module (``bias`` of the module
    itself, ``1.bias`` of the child ``1`` whose forward adds its own ``bias`` to its input)."""
    adds: dict[str, list[str]] = {}
    for child, attr in flow.child_adds:
        adds.setdefault(child, []).append(attr)
    for child, following in flow.feeds:
        info = classes.get(child_classes.get(following, ""))
        if info is not None and info.forward is not None:
            adds.setdefault(child, []).extend(f"{following}.{attr}" for attr in info.forward.adds_to_input)
    return adds


def _is_script_module(value: Call, classes: dict[str, ClassInfo]) -> bool:
    name = value.func_name or ""
    info = classes.get(name)
    if info is not None:
        return info.is_module
    return name.startswith("__torch__.") and isinstance(value.state, dict)
