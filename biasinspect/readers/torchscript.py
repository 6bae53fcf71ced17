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

__all__ = ["ClassInfo", "module_from_torchscript", "parse_code", "plain_class_name"]

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
                pending.append((value, child, depth + 1))
                continue
            node.attrs[key] = value
        if info is not None:
            for key, value in info.constants.items():
                node.attrs.setdefault(key, value)
            node.forward_conv = dict(info.conv_facts)
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


def _is_script_module(value: Call, classes: dict[str, ClassInfo]) -> bool:
    name = value.func_name or ""
    info = classes.get(name)
    if info is not None:
        return info.is_module
    return name.startswith("__torch__.") and isinstance(value.state, dict)
