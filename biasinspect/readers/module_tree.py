"""Convolutions of a module object tree: a pickled ``nn.Module`` or a TorchScript object.

Both sources are first turned into :class:`ModuleNode` trees (names, class, parameters,
buffers, children in registration order, plain attributes) -- by :func:`module_from_pickle`
here and by :mod:`biasinspect.readers.torchscript` for TorchScript -- and then
:func:`describe_module_tree` reports the facts:

Conv detection
    A module is a conv when its weight (``weight``; ``weight_v`` under the old weight norm;
    ``weight_orig`` under the old spectral norm; the packed weight of a quantized conv) has rank
    3-5 and either its class name contains ``Conv`` or it carries the conv attributes
    ``kernel_size``, ``stride`` and ``groups`` (user subclasses).  Fused containers such as
    ``ConvReLU2d``/``ConvBn2d`` (``Sequential`` subclasses) have no weight of their own: their
    ``Conv2d`` child is the conv.  ``transposed`` comes from the ``transposed`` attribute, else
    from the class name; ``groups`` from the ``groups`` attribute (``None`` if absent).
Bias terms
    ``<conv>.bias`` of rank 1 -> CONV term (any other rank -> ADD); other parameters of the conv
    module whose name contains ``bias`` -> ADD; a parameter of the parent module whose name
    contains ``bias`` with shape [C_out, *spatial] or [1, C_out, *spatial] -> ADD on the one
    matching child conv (bias-less convs preferred; ambiguous -> attached to none, warned),
    unless TorchScript code adds it to the module's input (a positional embedding).
    A separate bias added to the conv's output -> ADD (:func:`_attach_separate_biases`): with
    TorchScript code, the parameters :attr:`ModuleNode.child_adds` records; without it, the
    bias-only sibling registered right after the conv, when its shape fits ([C_out, *spatial],
    [1, C_out, *spatial] or [C_out], the last reported as [C_out, 1, ...]); outside a
    ``Sequential`` a note says the order was assumed.  An untied term gives ``output_spatial``.
followed_by (bias-less convs only)
    A norm child of the conv (QAT ``ConvBn2d``), else the next leaf module in registration order
    (pre-order, observers/fake-quant/``Identity``/``Dropout`` skipped) when it is a BatchNorm /
    SyncBatchNorm / GroupNorm / affine InstanceNorm / LayerNorm of the conv's width: its class name.
model_params
    Elements of every distinct parameter tensor of every module (the ``_parameters`` dicts,
    or the TorchScript ``__parameters__`` lists) -- what ``sum(p.numel() for p in
    model.parameters())`` gives.  Exception: quantized modules keep their packed weights outside
    ``_parameters``; those weights and biases are counted too (as state dicts count them).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from biasinspect import limits
from biasinspect.errors import ResourceLimitError, UnsupportedFormatError
from biasinspect.model import BiasSource, BiasTerm, ConvNode, ModelDescription
from biasinspect.readers.pickle_inert import Call, TensorRef, describe_value, tensor_of
from biasinspect.readers.tensors import added_bias_layout, join_name, untied_spatial, untied_width

__all__ = ["ModuleNode", "describe_module_tree", "is_module_object", "module_from_pickle"]

_NORM_CLASSES = frozenset(
    {
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "LazyBatchNorm1d",
        "LazyBatchNorm2d",
        "LazyBatchNorm3d",
        "GroupNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "FrozenBatchNorm2d",
        "LayerNorm",
    }
)
"""Norm layers whose shift plays the tied-bias role after a bias-less conv (a LayerNorm over
the conv output ``[C, *spatial]`` has a ``[C, *spatial]`` shift: still the norm's, not a bias)."""

_TRANSPARENT = ("Observer", "FakeQuantize", "QuantStub", "Identity", "Dropout")
"""Leaf modules that do not separate a conv from the norm after it (substrings of class names)."""


@dataclass
class ModuleNode:
    """One module of a tree, format-neutral."""

    path: str
    cls: str
    params: dict[str, TensorRef | None] = field(default_factory=dict)
    buffers: dict[str, TensorRef | None] = field(default_factory=dict)
    children: list[ModuleNode] = field(default_factory=list)
    attrs: dict[str, object] = field(default_factory=dict)
    extra_params: list[TensorRef] = field(default_factory=list)
    """Tensors counted as parameters although outside ``params`` (quantized packed weights)."""
    conv_weight: TensorRef | None = None
    """Set by a builder that knows the conv weight (quantized packed weight)."""
    conv_bias: TensorRef | None = None
    forward_conv: dict[str, object] = field(default_factory=dict)
    """Facts parsed from a TorchScript forward (``groups``, ``transposed``), when known."""
    unresolved: list[str] = field(default_factory=list)
    """Parameter names whose value is not a tensor we can size (e.g. UninitializedParameter)."""
    child_adds: dict[str, list[str]] | None = None
    """What this module's code adds to a child's output: child name -> tensors relative to this
    module (``bias`` for its own parameter, ``1.bias`` for the parameter that child ``1`` adds to
    its input).  ``None`` when no code says (pickled modules): then module order is used."""
    input_adds: set[str] = field(default_factory=set)
    """Parameters this module's code adds to its input (a positional embedding); the bias-name
    rule does not attach them to a conv."""

    @property
    def leaf_class(self) -> str:
        """The class name without its module path."""
        return self.cls.rsplit(".", 1)[-1]


def is_module_object(obj: object) -> bool:
    """True for a pickled ``nn.Module`` stub (its ``__dict__`` has ``_modules`` and ``_parameters``),
    or a quantized module whose ``__getstate__`` returns a tuple."""
    if not isinstance(obj, Call):
        return False
    state = obj.state
    if isinstance(state, dict):
        return "_modules" in state and "_parameters" in state
    return _quantized_conv_state(obj) is not None


def _quantized_conv_state(obj: Call) -> tuple[object, ...] | None:
    """Quantized conv ``__getstate__``: (in_ch, out_ch, kernel, stride, padding, dilation,
    transposed, output_padding, groups, padding_mode, weight, bias, scale, zero_point, training)."""
    state = obj.state
    if (
        isinstance(state, tuple)
        and len(state) >= 12
        and tensor_of(state[10]) is not None
        and isinstance(state[8], int)
    ):
        return state
    return None


def _tensor_dict(value: object) -> dict[str, TensorRef | None]:
    out: dict[str, TensorRef | None] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                out[key] = tensor_of(item)
    return out


def module_from_pickle(root: Call, path: str = "") -> ModuleNode:
    """Build a :class:`ModuleNode` tree from a pickled ``nn.Module`` stub (iteratively).

    A module object met twice (shared submodule) is listed once, as ``named_modules()`` does.
    """
    seen: set[int] = {id(root)}
    top = ModuleNode(path, root.func_name or "<dynamic>")
    work: list[tuple[Call, ModuleNode, int]] = [(root, top, 0)]
    budget = limits.MAX_PICKLE_OBJECTS
    while work:
        obj, node, depth = work.pop()
        budget -= 1
        if budget < 0:
            raise ResourceLimitError("module tree is larger than the node budget")
        state = obj.state
        if fill_packed_module(node, obj):
            continue
        if not isinstance(state, dict):
            continue
        node.params = _tensor_dict(state.get("_parameters"))
        raw_params = state.get("_parameters")
        if isinstance(raw_params, dict):
            node.unresolved = [
                k
                for k, v in raw_params.items()
                if isinstance(k, str) and v is not None and node.params.get(k) is None
            ]
        node.buffers = _tensor_dict(state.get("_buffers"))
        for key, value in state.items():
            if isinstance(key, str) and not key.startswith("_"):
                node.attrs[key] = value
        modules = state.get("_modules")
        pending: list[tuple[Call, ModuleNode, int]] = []
        if isinstance(modules, dict):
            for name, child in modules.items():
                if not isinstance(name, str) or not isinstance(child, Call) or id(child) in seen:
                    continue
                seen.add(id(child))
                if depth + 1 > limits.MAX_CONTAINER_DEPTH:
                    raise ResourceLimitError(
                        f"module nesting deeper than {limits.MAX_CONTAINER_DEPTH} levels at "
                        f"{join_name(node.path, name)!r}"
                    )
                child_node = ModuleNode(join_name(node.path, name), child.func_name or "<dynamic>")
                node.children.append(child_node)
                pending.append((child, child_node, depth + 1))
        work.extend(reversed(pending))
    return top


def fill_packed_module(node: ModuleNode, obj: Call) -> bool:
    """Fill ``node`` from a module whose ``__getstate__`` returns a tuple instead of a
    ``__dict__`` (quantized modules, pickled and in TorchScript alike); False for other states.

    A quantized conv's tuple gives its weight, bias, groups and channels; any other tuple
    (quantized Linear's packed params...) has its tensors counted as parameters."""
    qstate = _quantized_conv_state(obj)
    if qstate is not None:
        _fill_quantized(node, qstate)
        return True
    if isinstance(obj.state, tuple):
        node.extra_params.extend(t for t in (tensor_of(v) for v in obj.state) if t is not None)
        return True
    return False


def _fill_quantized(node: ModuleNode, state: tuple[object, ...]) -> None:
    weight = tensor_of(state[10])
    bias = tensor_of(state[11])
    node.conv_weight = weight
    node.conv_bias = bias
    node.attrs.update(
        {
            "in_channels": state[0],
            "out_channels": state[1],
            "kernel_size": state[2],
            "stride": state[3],
            "transposed": state[6],
            "groups": state[8],
        }
    )
    node.extra_params.extend(t for t in (weight, bias) if t is not None)


# --------------------------------------------------------------------------------------------
# Description


def _iter_preorder(root: ModuleNode) -> list[ModuleNode]:
    return _preorder_spans(root)[0]


def _preorder_spans(root: ModuleNode) -> tuple[list[ModuleNode], list[int]]:
    """Nodes in pre-order (registration order), and for each the pre-order index just past its
    subtree, in one iterative walk."""
    order: list[ModuleNode] = []
    ends: list[int] = []
    work: list[tuple[ModuleNode, int]] = [(root, -1)]
    while work:
        node, opened = work.pop()
        if opened >= 0:
            ends[opened] = len(order)
            continue
        index = len(order)
        order.append(node)
        ends.append(index + 1)
        work.append((node, index))
        work.extend((child, -1) for child in reversed(node.children))
    return order, ends


def _parametrized(node: ModuleNode, tensor_name: str) -> tuple[str, TensorRef] | None:
    """The stored original of ``node.parametrizations.<tensor_name>`` (torch.nn.utils.parametrize):
    ``original`` for a one-tensor parametrization, ``original1`` (the full-rank ``v``) for weight
    norm (``original0`` is the magnitude ``g``).  Name relative to ``node``."""
    holder = next((c for c in node.children if c.path.rsplit(".", 1)[-1] == "parametrizations"), None)
    if holder is None:
        return None
    plist = next((c for c in holder.children if c.path.rsplit(".", 1)[-1] == tensor_name), None)
    if plist is None:
        return None
    for name in ("original", "original1"):
        tensor = plist.params.get(name)
        if tensor is not None:
            return f"parametrizations.{tensor_name}.{name}", tensor
    return None


def _conv_weight(node: ModuleNode) -> tuple[str, TensorRef] | None:
    if node.conv_weight is not None:
        return "weight", node.conv_weight
    for name in ("weight", "weight_v", "weight_orig"):
        tensor = node.params.get(name)
        if tensor is not None:
            return name, tensor
    return _parametrized(node, "weight")


def _is_conv(node: ModuleNode) -> tuple[str, TensorRef] | None:
    found = _conv_weight(node)
    if found is None:
        return None
    rank = len(found[1].info.shape)
    if not 3 <= rank <= 5:
        return None
    has_attrs = all(key in node.attrs for key in ("kernel_size", "stride", "groups"))
    if "Conv" in node.leaf_class or has_attrs or node.forward_conv:
        return found
    return None


def _int_attr(node: ModuleNode, name: str) -> int | None:
    value = node.attrs.get(name, node.forward_conv.get(name))
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if not -limits.MAX_MODEL_INT <= value <= limits.MAX_MODEL_INT:
        raise UnsupportedFormatError(
            f"unsupported: module {node.path or '<root>'!r} has {name} = {describe_value(value)}, "
            f"outside the 64-bit range torch itself can hold"
        )
    return value


def _transposed(node: ModuleNode) -> bool | None:
    for source in (node.attrs, node.forward_conv):
        value = source.get("transposed")
        if isinstance(value, bool):
            return value
    if "Transpose" in node.leaf_class:
        return True
    if "Conv" in node.leaf_class:
        return False
    return None


def _out_channels(shape: tuple[int, ...], transposed: bool | None, groups: int | None) -> int | None:
    if transposed:
        return None if groups is None else shape[1] * groups
    return shape[0]


def _norm_width(node: ModuleNode) -> int | None:
    for key in ("num_features", "num_channels"):
        value = node.attrs.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    for tensors in (node.params, node.buffers):
        for key in ("weight", "bias", "running_mean"):
            tensor = tensors.get(key)
            # [C] for most norms; [C, *spatial] for a LayerNorm over the whole conv output.
            if tensor is not None and len(tensor.info.shape) >= 1:
                return tensor.info.shape[0]
    return None


def _is_norm(node: ModuleNode, width: int | None) -> bool:
    leaf = node.leaf_class
    if leaf not in _NORM_CLASSES:
        return False
    if leaf.startswith("InstanceNorm") and node.attrs.get("affine") is not True:
        return False
    if leaf == "GroupNorm" and node.attrs.get("affine") is False:
        return False
    return width is not None and _norm_width(node) == width


def _spatial_bias_fits(shape: tuple[int, ...], c_out: int | None, spatial_rank: int) -> bool:
    """``shape`` is an untied bias of a conv with ``c_out`` channels (the state-dict rule)."""
    return c_out is not None and untied_width(shape, spatial_rank) == c_out


@dataclass
class _Found:
    node: ModuleNode
    weight_name: str
    weight: TensorRef
    transposed: bool | None
    groups: int | None
    c_out: int | None
    terms: list[BiasTerm] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    followed_by: str | None = None


def _op_name(rank: int, transposed: bool | None) -> str:
    if transposed is None:
        return f"Conv{rank - 2}d?"
    return f"{'ConvTranspose' if transposed else 'Conv'}{rank - 2}d"


def describe_module_tree(
    root: ModuleNode,
    *,
    path: str,
    format: str,
    location: str | None = None,
    warnings: Sequence[str] = (),
    unsafe_callables: Sequence[str] = (),
) -> ModelDescription:
    """Report the convs of a module tree (see the module docstring for the rules)."""
    order, ends = _preorder_spans(root)
    notes_out: list[str] = list(warnings)
    found: dict[int, _Found] = {}
    for node in order:
        if node.unresolved:
            notes_out.append(
                f"module {node.path or '<root>'!r} ({node.leaf_class}) has parameters without a known "
                f"shape (not materialised?): {', '.join(node.unresolved)}"
            )
        hit = _is_conv(node)
        if hit is None:
            continue
        weight_name, weight = hit
        transposed = _transposed(node)
        groups = _int_attr(node, "groups")
        item = _Found(
            node,
            weight_name,
            weight,
            transposed,
            groups,
            _out_channels(weight.info.shape, transposed, groups),
        )
        bias_name = "bias"
        bias = node.conv_bias if node.conv_weight is not None else node.params.get("bias")
        if bias is None and node.conv_weight is None:
            # A weight-normed bias is one conv bias of v's shape (g is its magnitude).
            if node.params.get("bias_v") is not None and node.params.get("bias_g") is not None:
                bias_name, bias = "bias_v", node.params["bias_v"]
            else:
                hit = _parametrized(node, "bias")
                if hit is not None:
                    bias_name, bias = hit
        if bias is not None:
            source = BiasSource.CONV if len(bias.info.shape) == 1 else BiasSource.ADD
            item.terms.append(BiasTerm(join_name(node.path, bias_name), bias.info.shape, source))
        spatial_rank = len(weight.info.shape) - 2
        for name, tensor in node.params.items():
            # Case-insensitive like the state-dict reader: ``untiedBias`` is as much a bias.
            if tensor is None or name == "bias" or "bias" not in name.lower():
                continue
            if bias_name == "bias_v" and name in ("bias_g", "bias_v"):
                continue
            shape = tensor.info.shape
            aligned = _spatial_bias_fits(shape, item.c_out, spatial_rank)
            item.terms.append(BiasTerm(join_name(node.path, name), shape, BiasSource.ADD, aligned=aligned))
        if weight_name == "weight_v":
            item.notes.append("weight norm (weight_g/weight_v): weight shape taken from weight_v")
        elif weight_name.startswith("parametrizations.weight."):
            item.notes.append(f"parametrized weight: weight shape taken from {weight_name}")
        elif weight_name == "weight_orig":
            item.notes.append("spectral norm: weight shape taken from weight_orig")
        found[id(node)] = item

    _attach_separate_biases(order, found)
    _attach_parent_biases(order, found, notes_out)
    _attach_followers(order, ends, found)

    convs: list[ConvNode] = []
    for node in order:
        conv = found.get(id(node))
        if conv is None:
            continue
        shape = conv.weight.info.shape
        convs.append(
            ConvNode(
                name=node.path or "<root>",
                op=_op_name(len(shape), conv.transposed),
                weight_name=join_name(node.path, conv.weight_name),
                weight_shape=shape,
                transposed=conv.transposed,
                groups=conv.groups,
                kernel_shape=shape[2:],
                output_spatial=_output_spatial(conv.terms, len(shape) - 2),
                bias_terms=tuple(conv.terms),
                followed_by=conv.followed_by if not conv.terms else None,
                notes=tuple(conv.notes),
            )
        )
    return ModelDescription(
        path=path,
        format=format,
        convs=tuple(convs),
        # A parameter we cannot size makes the total unknown, not smaller.
        model_params=None if any(node.unresolved for node in order) else model_params(order),
        warnings=tuple(notes_out),
        location=location,
        unsafe_callables=tuple(unsafe_callables),
    )


def _output_spatial(terms: list[BiasTerm], spatial_rank: int) -> tuple[int | None, ...] | None:
    """The output size an untied bias term fixes (nothing else in a module tree does)."""
    for term in terms:
        if term.source is BiasSource.ADD and term.aligned:
            spatial = untied_spatial(term.shape, spatial_rank)
            if spatial is not None:
                return spatial
    return None


def _is_bias_module(node: ModuleNode) -> bool:
    """A leaf module holding only bias-named parameters (``SpatialBias``: ``x + self.bias``)."""
    if node.children or not node.params or node.leaf_class in _NORM_CLASSES:
        return False
    return all("bias" in name.lower() for name in node.params)


def _add_separate_term(item: _Found, name: str, tensor: TensorRef | None, proven: bool) -> bool:
    """Attach ``tensor`` (added to ``item``'s output) in the conv output's layout.  A shape that
    does not fit C_out is kept as an unaligned term when the code proves the add (``proven``),
    else not attached.  True when attached."""
    if tensor is None or any(term.name == name for term in item.terms):
        return False
    shape = tensor.info.shape
    widths = () if item.c_out is None else (item.c_out,)
    layout = added_bias_layout(shape, len(item.weight.info.shape) - 2, widths)
    if layout is not None:
        item.terms.append(BiasTerm(name, layout[1], BiasSource.ADD))
        return True
    if proven:
        item.terms.append(BiasTerm(name, shape, BiasSource.ADD, aligned=False))
        return True
    return False


def _attach_separate_biases(order: list[ModuleNode], found: dict[int, _Found]) -> None:
    """Bias terms that a separate module or parameter adds to a conv's output.

    With code (TorchScript), exactly what :attr:`ModuleNode.child_adds` records.  Without it
    (pickled modules), the sibling registered right after the conv (observers, ``Identity``,
    ``Dropout`` skipped) when it is a bias-only module (:func:`_is_bias_module`) of a fitting
    shape: a ``Sequential`` applies its children in that order; any other module is assumed
    to, which a note says.  A module before the conv (a positional embedding) is never taken."""
    for parent in order:
        if not any(id(child) in found for child in parent.children):
            continue
        by_name = {child.path.rsplit(".", 1)[-1]: child for child in parent.children}
        if parent.child_adds is not None:
            for child_name, added in parent.child_adds.items():
                conv_node = by_name.get(child_name)
                if conv_node is None or id(conv_node) not in found:
                    continue
                for relative in added:
                    owner_name, _, param = relative.rpartition(".")
                    owner = by_name.get(owner_name) if owner_name else parent
                    if owner is not None:
                        _add_separate_term(
                            found[id(conv_node)], join_name(owner.path, param), owner.params.get(param), True
                        )
            continue
        sequential = parent.leaf_class.endswith("Sequential")
        for index, child in enumerate(parent.children):
            item = found.get(id(child))
            if item is None:
                continue
            # Indices, not a slice of the tail: a copy per conv would be quadratic.
            following = next(
                (
                    parent.children[later]
                    for later in range(index + 1, len(parent.children))
                    if not any(word in parent.children[later].leaf_class for word in _TRANSPARENT)
                ),
                None,
            )
            if following is None or not _is_bias_module(following):
                continue
            attached = [
                name
                for name, tensor in following.params.items()
                if _add_separate_term(item, join_name(following.path, name), tensor, False)
            ]
            if attached and not sequential:
                item.notes.append(
                    f"{', '.join(join_name(following.path, name) for name in attached)} taken as added"
                    " to this conv's output: the module registered after it holds only a bias"
                    " (module order, not recorded application order)"
                )


_MAX_NAMES_IN_WARNING = 5


def _attach_parent_biases(order: list[ModuleNode], found: dict[int, _Found], warnings: list[str]) -> None:
    """Attach bias-named parameters of a parent module to the one child conv they fit.

    Linear in the tree: the child convs of a parent are indexed by (spatial rank, C_out), so each
    parameter looks up the at most two keys its shape can fit instead of trying every child.
    """
    for parent in order:
        child_convs = [found[id(c)] for c in parent.children if id(c) in found]
        if not child_convs or id(parent) in found:
            continue
        # Already attached from the code (TorchScript: ``self.conv(x) + self.bias``).
        attached = {term.name for conv in child_convs for term in conv.terms}
        rank_of = {id(c): len(c.weight.info.shape) - 2 for c in child_convs}
        position = {id(c): i for i, c in enumerate(child_convs)}
        every: dict[tuple[int, int], list[_Found]] = {}
        bare: dict[tuple[int, int], dict[int, _Found]] = {}
        for conv in child_convs:
            if conv.c_out is None:
                continue
            key = (rank_of[id(conv)], conv.c_out)
            every.setdefault(key, []).append(conv)
            if not conv.terms:
                bare.setdefault(key, {})[id(conv)] = conv
        ranks = sorted({key[0] for key in every})
        for name, tensor in parent.params.items():
            if tensor is None or "bias" not in name.lower():
                continue
            if join_name(parent.path, name) in attached or name in parent.input_adds:
                continue
            shape = tensor.info.shape
            keys = []
            for rank in ranks:
                width = untied_width(shape, rank)
                if width is not None and (rank, width) in every:
                    keys.append((rank, width))
            fit_count = sum(len(every[key]) for key in keys)
            bare_count = sum(len(bare.get(key, {})) for key in keys)
            term_name = join_name(parent.path, name)
            if fit_count == 0:
                if len(child_convs) == 1:
                    # Bias-named but not [C_out, *spatial]: the shape is known, not how it meets
                    # the conv output -- an unaligned term (classified "other"), never dropped.
                    only = child_convs[0]
                    only.terms.append(BiasTerm(term_name, shape, BiasSource.ADD, aligned=False))
                    bare.get((rank_of[id(only)], only.c_out or 0), {}).pop(id(only), None)
                continue
            use_bare = bare_count > 0
            count = bare_count if use_bare else fit_count
            firsts: list[_Found] = []
            for key in keys:
                pool = bare.get(key, {}).values() if use_bare else every[key]
                firsts.extend(itertools.islice(pool, _MAX_NAMES_IN_WARNING))
            firsts.sort(key=lambda c: position[id(c)])
            if count == 1:
                chosen = firsts[0]
                chosen.terms.append(BiasTerm(term_name, shape, BiasSource.ADD))
                bare.get((rank_of[id(chosen)], chosen.c_out or 0), {}).pop(id(chosen), None)
                continue
            names = ", ".join(c.node.path for c in firsts[:_MAX_NAMES_IN_WARNING])
            more = count - min(count, _MAX_NAMES_IN_WARNING)
            warnings.append(
                f"bias parameter {term_name!r} fits several convs "
                f"({names}{f' and {more} more' if more else ''}); attached to none"
            )


def _attach_followers(order: list[ModuleNode], ends: list[int], found: dict[int, _Found]) -> None:
    """Name the norm after each bias-less conv (see the module docstring).

    Linear in the tree (plus a logarithmic lookup per conv): ``ends[i]`` is the pre-order index
    past node ``i``'s subtree, so "the first norm inside the conv" is a search among the norms of
    that width, and "the next leaf after the conv" is the first leaf at or past ``ends[i]``,
    transparent leaves skipped through a precomputed next-solid-leaf table.  No conv re-walks
    its subtree, however deeply convs nest.
    """
    norms_at: dict[int, list[int]] = {}  # norm width -> pre-order positions, ascending
    leaf_at: list[int] = []  # pre-order positions of leaves (convs count as leaves)
    for i, node in enumerate(order):
        if node.leaf_class in _NORM_CLASSES:
            width = _norm_width(node)
            if width is not None and _is_norm(node, width):
                norms_at.setdefault(width, []).append(i)
        if not node.children or id(node) in found:
            leaf_at.append(i)
    next_solid = [len(leaf_at)] * (len(leaf_at) + 1)
    for k in range(len(leaf_at) - 1, -1, -1):
        transparent = any(word in order[leaf_at[k]].leaf_class for word in _TRANSPARENT)
        next_solid[k] = next_solid[k + 1] if transparent else k
    for i, node in enumerate(order):
        item = found.get(id(node))
        if item is None or item.terms or item.c_out is None:
            continue
        inside = norms_at.get(item.c_out, [])
        j = bisect.bisect_right(inside, i)
        if j < len(inside) and inside[j] < ends[i]:
            item.followed_by = order[inside[j]].leaf_class
            continue
        k = next_solid[bisect.bisect_left(leaf_at, ends[i])]
        if k < len(leaf_at):
            nxt = order[leaf_at[k]]
            if _is_norm(nxt, item.c_out):
                item.followed_by = nxt.leaf_class


def model_params(order: list[ModuleNode]) -> int:
    """Elements of every distinct parameter tensor in the tree (identity-deduplicated)."""
    seen: set[int] = set()
    total = 0
    for node in order:
        for tensor in [*node.params.values(), *node.extra_params]:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.info.numel()
    return total
