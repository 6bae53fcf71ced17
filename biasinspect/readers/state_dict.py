"""Turn a flat ``name -> TensorInfo`` mapping (a state dict) into a :class:`ModelDescription`.

Every state-dict-like source uses this module: safetensors files, PyTorch state dicts and
sharded checkpoints.  Only names, shapes and dtypes are known, so everything below is a
documented heuristic over names and shapes; when the evidence is not there, the result says
"undetermined" (``transposed=None`` plus a note) instead of guessing.

Conv detection
    A conv is a module ``X`` with a ``X.weight`` of rank 3, 4 or 5 (Conv1d/2d/3d) whose dtype is
    floating or quantized (:attr:`TensorInfo.is_parameter_dtype`).  Re-parametrized weights are
    recognised as ONE conv named ``X``, with the weight shape taken from the full-size tensor:

    * ``X.weight_g`` + ``X.weight_v`` (old ``torch.nn.utils.weight_norm``): shape of ``weight_v``;
    * ``X.parametrizations.weight.original0`` (g) + ``original1`` (v) (new parametrize API);
    * ``X.parametrizations.weight.original`` (any single-tensor parametrization, e.g. the new
      ``spectral_norm``);
    * ``X.weight_orig`` + ``X.weight_u`` (old ``spectral_norm``).

    Integer tensors (e.g. ``int8`` in safetensors) are never parameters and never convs: an
    integer ``*.weight`` of conv rank is skipped with a warning (it is usually a packed,
    quantized weight whose real shape is not what is stored).  A rank-3 ``*.weight`` under a
    module path containing ``expert`` is skipped with a warning (stacked MoE expert matrices).

Conv vs ConvTranspose
    A conv weight is [C_out, C_in/g, *k]; a transposed one is [C_in, C_out/g, *k], and a Conv's
    bias length is always dim0 while a ConvTranspose's is dim1 x groups.  With a 1-D own bias
    of length L:

    * L == dim0 != dim1 -> Conv;
    * L == dim1 != dim0 -> ConvTranspose, groups 1;
    * L != dim0, L = dim1 x g with g dividing dim0 -> ConvTranspose, groups g (e.g.
      ``ConvTranspose2d(8, 4, 2, groups=2)``: weight [8, 2, 2, 2], bias [4]);
    * dim0 == dim1 == L -> undetermined (``transposed=None``); L matching nothing -> undetermined.

    A module path containing ``transpose``, ``deconv`` or ``upconv`` is a hint for
    ConvTranspose (said so in the notes): with no bias it gives ConvTranspose with groups
    unknown (a depthwise ConvTranspose [C, 1, *k] has groups C); with dim0 == dim1 == L it
    gives ConvTranspose with groups 1 (L = dim1 x groups); with L == dim0 != dim1 the conv
    stays undetermined when dim1 divides dim0 (a grouped ConvTranspose has that shape too).
    Without an own bias, the width of an untied bias in the conv's own or parent module, or of
    the norm that directly follows (by registration order or as the next item of a
    ``Sequential``) as a sibling in the same parent module, settles the question (width dim1 !=
    dim0 -> ConvTranspose, groups 1); the name-based and unique-width norm pairings below, and
    a norm that follows in registration order from another module, never do (a pre-activation
    norm of width C_in must not make a Conv look transposed: in DenseNet-121,
    ``denselayer2.conv2`` [32, 128, 3, 3] is followed by ``denselayer3.norm1``, whose 128
    channels are the concatenated block input).  Inferring Conv adds no note (it is the reading
    the analysis takes anyway); inferring ConvTranspose does.  Otherwise ``groups`` is ``None``
    (state dicts do not record it).

    ``op`` is ``Conv{n}d`` / ``ConvTranspose{n}d``, or ``Conv{n}d?`` when undetermined (Conv or
    ConvTranspose; the analysis then treats dim0 as C_out).

Bias terms
    * the own bias -> source CONV when of rank 1, else ADD (so that the analysis's broadcasting
      rule classifies it).  It is ``X.bias``, ``X.parametrizations.bias.original``, or ONE
      weight-normed bias: ``X.bias_g`` + ``X.bias_v`` or ``X.parametrizations.bias.original0``
      + ``original1`` (``weight_norm(conv, name="bias")``) with the shape of ``v`` (``g`` is
      counted in model_params as usual);
    * any other tensor in ``X`` whose last name component contains ``bias`` -> ADD, aligned
      when shaped [C_out, *spatial] or [1, C_out, *spatial] (spatial rank = conv rank - 2),
      else ``aligned=False`` (the analysis says "other" instead of broadcasting it);
    * a tensor in the parent module ``P`` (``X = P.child``) whose last component contains
      ``bias`` and whose shape is [C_out, *spatial] or [1, C_out, *spatial] -> ADD on that
      conv.  If several convs of ``P`` fit, convs without their own bias are preferred; if
      still ambiguous, the tensor is attached to none (with a warning).  A tensor that fits
      several convs is decided again after the others settled what they could, so the key
      order does not matter (``bias_a`` fits ``conv_b`` [4, 8, *k] as a ConvTranspose until a
      later ``bias_b`` [4, *spatial] makes ``conv_b`` a Conv).  A parent tensor of
      any other shape -> ADD with ``aligned=False`` on the conv when it is ``P``'s only child
      conv, else attached to none (nothing says which conv it would belong to).  This is the
      rule :mod:`biasinspect.readers.module_tree` applies to pickled modules.
    * a separate bias module (not a conv, no submodule tensors, every tensor bias-named, e.g.
      ``SpatialBias`` whose forward is ``x + self.bias``) that follows the conv -- the module
      registered right after it when the key order is the registration order, or the next
      ``Sequential`` index -- with a tensor shaped [C_out, *spatial] / [1, C_out, *spatial]
      (stored shape) or [C_out] (reported as [C_out, 1, ...], the way it meets the output) ->
      ADD, with a note naming the guess (:func:`_separate_biases`).  A module before the conv
      is never taken: it adds to the conv's input (a positional embedding).
    * an untied term fixes the output size (``output_spatial``), which nothing else in a state
      dict does.

    A ``weight`` and ``bias`` of one shape of rank >= 2 are an element-wise affine (LayerNorm
    over [C, H, W]), not a conv.  Before any bias is matched by width, a norm that directly
    follows a bias-free conv as a sibling settles Conv vs ConvTranspose
    (:func:`_settle_from_following_norms`).

followed_by (only for convs with no bias term at all)
    ``"BatchNorm"``: a module with 1-D ``running_mean`` and ``running_var`` (and, if present,
    ``weight``/``bias``) of the conv's width.  ``"Norm"``: a module whose only tensors are a
    ``weight`` and ``bias`` of one shape [C] or [C, *spatial] with C the conv's width
    (GroupNorm, LayerNorm, affine InstanceNorm...).
    Which module "follows":

    * always: the conv's own child ``X.bn`` (QAT ConvBn{1,2,3}d keeps its BatchNorm there);
    * when the key order is the registration order (torch state dicts, unless the keys are in
      sorted order): the first module after the conv's keys;
    * always: a sibling named like the conv with the conv word replaced by a norm word
      (``conv1``/``bn1``, ``conv``/``norm``, ``convolution``/``normalization``...) or the next
      index of a ``Sequential`` (``P.3`` -> ``P.4``);
    * when the key order is NOT meaningful (safetensors sorts names by dtype then name): also a
      BatchNorm sibling that is the only unclaimed one of the conv's width while the conv is the
      only unmatched bias-less conv of that width in the parent (``conv_stem``/``bn1``).

model_params
    Every floating/quantized tensor except buffers, tied names once: the rules are in
    :mod:`biasinspect.readers.state_dict_params`.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice

from biasinspect.model import BiasSource, BiasTerm, ConvNode, ModelDescription
from biasinspect.readers.state_dict_params import BUFFER_LEAVES, count_model_params
from biasinspect.readers.tensors import (
    TensorInfo,
    added_bias_layout,
    join_name,
    split_name,
    untied_spatial,
    untied_width,
)

TRANSPOSE_HINTS = ("transpose", "deconv", "upconv")
"""Substrings of a module path taken as a hint that the conv is a ConvTranspose."""

_CONV_WORDS = ("convolution", "conv")
_NORM_WORDS = ("normalization", "batch_norm", "batchnorm", "norm", "bn")
_BN_LEAVES = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
_PARAMETRIZATION_RE = re.compile(r"^(.*?)\.?parametrizations\.")
_NUMBER_RE = re.compile(r"([0-9]+)")
"""ASCII digit runs only: ``str.isdigit`` and ``\\d`` also accept ``²`` or ``٣``, which ``int``
rejects or reads differently."""
_MAX_INDEX_DIGITS = 18
"""Longest ``Sequential`` index taken as a number (``int()`` refuses strings over 4300 digits)."""

NaturalKey = tuple[tuple[tuple[int, int, str], ...], ...]


def natural_sort_key(name: str) -> NaturalKey:
    """Sort key comparing dotted names component by component, digit runs as numbers.

    ``layer1.9.conv`` sorts before ``layer1.10.conv``, and ``features.2`` before
    ``features.10``.
    """
    key: list[tuple[tuple[int, int, str], ...]] = []
    for component in name.split("."):
        parts: list[tuple[int, int, str]] = []
        # split() with a capturing group alternates text, digits, text...: odd pieces are digits.
        for index, piece in enumerate(_NUMBER_RE.split(component)):
            if index % 2:
                # Numeric order without int(): fewer significant digits first, then lexically.
                digits = piece.lstrip("0") or "0"
                parts.append((0, len(digits), digits))
            elif piece:
                parts.append((1, 0, piece))
        key.append(tuple(parts))
    return tuple(key)


def _owner_module(name: str) -> str:
    """The module a key belongs to, folding ``X.parametrizations.*`` into ``X``."""
    match = _PARAMETRIZATION_RE.match(name)
    if match is not None:
        return match.group(1)
    return split_name(name)[0]


def _is_valid(info: object) -> bool:
    """True for a TensorInfo whose shape is a tuple of non-negative ints (junk is ignored)."""
    if not isinstance(info, TensorInfo) or not isinstance(info.shape, tuple):
        return False
    return all(type(dim) is int and dim >= 0 for dim in info.shape)


@dataclass
class _Conv:
    """A conv found in the state dict, while its facts are being gathered."""

    module: str
    weight_name: str
    shape: tuple[int, ...]
    first_index: int
    transposed: bool | None = None
    notes: list[str] = field(default_factory=list)
    terms: list[BiasTerm] = field(default_factory=list)
    followed_by: str | None = None
    own_bias: bool = False
    settleable: bool = False
    """True while Conv vs ConvTranspose is open only for lack of evidence (no bias, no hint)."""
    groups: int | None = None
    """Known only when a tensor of C_out channels proved a ConvTranspose: C_out = dim1 x groups = dim1."""

    @property
    def hinted(self) -> bool:
        lowered = self.module.lower()
        return any(hint in lowered for hint in TRANSPOSE_HINTS)

    def widths(self) -> tuple[int, ...]:
        """Possible C_out values given what is known about transposition."""
        if self.transposed is True:
            return (self.shape[1],)
        if self.transposed is False or self.shape[0] == self.shape[1]:
            return (self.shape[0],)
        return (self.shape[0], self.shape[1])

    def default_width(self) -> int:
        """C_out as the analysis will take it (dim1 when transposed, dim0 otherwise)."""
        return self.shape[1] if self.transposed is True else self.shape[0]

    def settle_by_width(self, width: int, evidence: str) -> None:
        """Resolve an undetermined conv from a tensor known to have C_out channels."""
        if not self.settleable:
            return
        self.settleable = False
        if width == self.shape[1]:
            self.transposed = True
            self.groups = 1
            self.notes.append(f"ConvTranspose inferred from {evidence} (width {width} = weight dim1)")
        elif width == self.shape[0]:
            # The reading the analysis would take anyway: no note, to keep warnings useful.
            self.transposed = False

    def op(self) -> str:
        spatial = len(self.shape) - 2
        if self.transposed is True:
            return f"ConvTranspose{spatial}d"
        if self.transposed is False:
            return f"Conv{spatial}d"
        return f"Conv{spatial}d?"


class _StateDict:
    """Indexes over one state dict's valid tensors."""

    def __init__(self, tensors: Mapping[str, TensorInfo]) -> None:
        self.names: list[str] = []
        self.infos: dict[str, TensorInfo] = {}
        for name, info in tensors.items():
            if isinstance(name, str) and _is_valid(info):
                self.names.append(name)
                self.infos[name] = info
        # module -> {leaf: full name} for the module's direct tensors.
        self.leaves: dict[str, dict[str, str]] = {}
        for name in self.names:
            module, leaf = split_name(name)
            self.leaves.setdefault(module, {})[leaf] = name

    def get(self, module: str, leaf: str) -> TensorInfo | None:
        name = self.leaves.get(module, {}).get(leaf)
        return self.infos[name] if name is not None else None

    def norm_kind(self, module: str) -> tuple[str, int] | None:
        """``("BatchNorm", width)`` or ``("Norm", width)`` when ``module`` looks like a norm."""
        leaves = self.leaves.get(module)
        if not leaves:
            return None
        shapes = {leaf: self.infos[name].shape for leaf, name in leaves.items()}
        if "running_mean" in shapes and "running_var" in shapes:
            if not set(shapes) <= _BN_LEAVES:
                return None
            width_shape = shapes["running_mean"]
            if len(width_shape) != 1 or shapes["running_var"] != width_shape:
                return None
            for leaf in ("weight", "bias"):
                if leaf in shapes and shapes[leaf] != width_shape:
                    return None
            return "BatchNorm", width_shape[0]
        if set(shapes) == {"weight", "bias"}:
            # GroupNorm, affine InstanceNorm: [C]; a LayerNorm over the whole conv output:
            # [C, *spatial] (its bias is the norm's shift, not the conv's bias).
            weight, bias = shapes["weight"], shapes["bias"]
            if len(weight) >= 1 and weight == bias:
                return "Norm", weight[0]
        return None

    def bias_only_modules(self, convs: Mapping[str, object]) -> set[str]:
        """Modules (not convs, not the root) whose tensors are all bias-named and that have no
        submodule tensors: a separate bias module such as ``SpatialBias`` (``x + self.bias``)."""
        parents: set[str] = set()
        for module in self.leaves:
            while module:
                module = split_name(module)[0]
                parents.add(module)
        found: set[str] = set()
        for module, leaves in self.leaves.items():
            if not module or module in convs or module in parents:
                continue
            own = [leaf for leaf in leaves if leaf not in BUFFER_LEAVES]
            if own and all("bias" in leaf.lower() for leaf in own):
                found.add(module)
        return found


def _conv_weight(sd: _StateDict, name: str) -> tuple[str, str] | None:
    """``(module, weight_name)`` when ``name`` is the full-size weight of a conv."""
    module, leaf = split_name(name)
    if leaf == "weight":
        return module, name
    if leaf == "weight_v" and sd.get(module, "weight_g") is not None:
        return module, name
    if leaf == "weight_orig" and sd.get(module, "weight_u") is not None:
        return module, name
    if module.endswith("parametrizations.weight"):
        owner = module[: -len("parametrizations.weight")].rstrip(".")
        if leaf == "original1" and sd.get(module, "original0") is not None:
            return owner, name
        if leaf == "original":
            return owner, name
    return None


def _find_convs(sd: _StateDict, warnings: list[str]) -> dict[str, _Conv]:
    convs: dict[str, _Conv] = {}
    for index, name in enumerate(sd.names):
        found = _conv_weight(sd, name)
        if found is None:
            continue
        module, weight_name = found
        info = sd.infos[name]
        if not 3 <= len(info.shape) <= 5 or module in convs:
            continue
        if not info.is_parameter_dtype:
            warnings.append(
                f"{name}: {info.dtype} tensor of shape {list(info.shape)} skipped: integer tensors are"
                " not parameters (possibly a packed quantized conv weight)"
            )
            continue
        bias = sd.get(module, "bias")
        if bias is not None and bias.shape == info.shape:
            # A conv's bias is [C_out] (or [C_out, *spatial]), never the weight's shape: a weight
            # and bias of one shape are an element-wise affine (LayerNorm over [C, H, W]).
            continue
        if len(info.shape) == 3 and "expert" in module.lower():
            warnings.append(
                f"{name}: rank-3 tensor under an experts module skipped: stacked expert matrices,"
                " not a Conv1d"
            )
            continue
        convs[module] = _Conv(module=module, weight_name=weight_name, shape=info.shape, first_index=index)
    return convs


def _own_bias_names(sd: _StateDict, module: str) -> tuple[str | None, str | None]:
    """(bias tensor, its weight-norm magnitude ``g`` or None) of conv ``module``, if any.

    ``X.bias`` or ``X.parametrizations.bias.original`` is the bias itself; a weight-normed bias
    (``weight_norm(conv, name="bias")``: ``X.bias_g`` + ``X.bias_v``, or the parametrize API's
    ``X.parametrizations.bias.original0`` + ``original1``) is ONE bias of the shape of ``v``.
    """
    own = sd.leaves.get(module, {})
    if "bias" in own:
        return own["bias"], None
    if "bias_v" in own and "bias_g" in own:
        return own["bias_v"], own["bias_g"]
    parametrized = sd.leaves.get(join_name(module, "parametrizations.bias"), {})
    if "original" in parametrized:
        return parametrized["original"], None
    if "original1" in parametrized and "original0" in parametrized:
        return parametrized["original1"], parametrized["original0"]
    return None, None


def _own_bias(sd: _StateDict, conv: _Conv) -> None:
    """Attach the conv's own bias (and bias-named extras) and settle Conv vs ConvTranspose."""
    bias_name, magnitude_name = _own_bias_names(sd, conv.module)
    length: int | None = None
    if bias_name is not None:
        shape = sd.infos[bias_name].shape
        if len(shape) == 1:
            conv.terms.append(BiasTerm(bias_name, shape, BiasSource.CONV))
            length = shape[0]
        else:
            conv.terms.append(BiasTerm(bias_name, shape, BiasSource.ADD))
        conv.own_bias = True
    _settle_transposed(conv, length)
    spatial_rank = len(conv.shape) - 2
    for leaf, name in sd.leaves.get(conv.module, {}).items():
        if "bias" not in leaf.lower() or name in (bias_name, magnitude_name):
            continue
        shape = sd.infos[name].shape
        width = untied_width(shape, spatial_rank)
        if width is not None and width in conv.widths():
            conv.terms.append(BiasTerm(name, shape, BiasSource.ADD))
            conv.settle_by_width(width, name)
        else:
            # Bias-named but not laid out as [(1,) C_out, *spatial]: how it meets the output is
            # unknown, so the analysis reports it as "other" instead of broadcasting it.
            conv.terms.append(BiasTerm(name, shape, BiasSource.ADD, aligned=False))


def _settle_transposed(conv: _Conv, length: int | None) -> None:
    """Conv vs ConvTranspose (and groups, when proven) from the own bias length and the name.

    A Conv's bias length is always dim0 (C_out); a ConvTranspose's is dim1 x groups.
    """
    dim0, dim1 = conv.shape[0], conv.shape[1]
    hinted = conv.hinted
    if length is None:
        if hinted:
            # groups stays unknown: a depthwise ConvTranspose [C, 1, *k] has groups C.
            conv.transposed = True
            conv.notes.append("ConvTranspose inferred from the module name (no bias to confirm it)")
        elif dim0 == dim1:
            conv.notes.append(
                "undetermined: Conv or ConvTranspose (weight dims 0 and 1 are equal and there is no bias)"
            )
        else:
            # Later evidence (parent bias, following norm) may settle it; _finish adds the
            # "no bias" note if nothing does.
            conv.settleable = True
        return
    if length == dim0 and length != dim1:
        if hinted and dim1 > 0 and dim0 % dim1 == 0:
            conv.notes.append(
                f"undetermined: the name suggests ConvTranspose but bias length {length} = weight dim0"
                " fits a Conv (or a grouped ConvTranspose)"
            )
        else:
            conv.transposed = False
    elif length == dim1 and length != dim0:
        conv.transposed = True
        conv.groups = 1
        conv.notes.append(f"ConvTranspose inferred: bias length {length} = weight dim1 (groups 1)")
    elif length == dim0 == dim1:
        if hinted:
            # Taking the hint, C_out = dim1 x groups = length = dim1, so groups is 1.
            conv.transposed = True
            conv.groups = 1
            conv.notes.append(
                f"ConvTranspose inferred from the module name (weight dims 0, 1 and the bias all {length})"
            )
        else:
            conv.notes.append(
                f"undetermined: Conv or ConvTranspose (weight dims 0, 1 and the bias all {length})"
            )
    elif length > 0 and dim1 > 0 and length % dim1 == 0 and dim0 % (length // dim1) == 0:
        # Not dim0, so not a Conv: a ConvTranspose whose C_out = dim1 x groups = length.
        groups = length // dim1
        conv.transposed = True
        conv.groups = groups
        conv.notes.append(
            f"ConvTranspose inferred: bias length {length} = weight dim1 ({dim1}) x groups {groups}"
        )
    else:
        conv.notes.append(
            f"undetermined: bias length {length} matches neither weight dim0 ({dim0}) nor dim1 ({dim1})"
            " (a grouped ConvTranspose has bias length dim1 x groups)"
        )


@dataclass
class _WidthSlot:
    """The convs of one parent that a [C_out, *spatial] tensor of one width could belong to."""

    without_own: dict[str, _Conv] = field(default_factory=dict)
    with_own: dict[str, _Conv] = field(default_factory=dict)


_SlotKey = tuple[str, int, int]
"""(parent module, spatial rank, possible C_out): the key of a :class:`_WidthSlot`."""


def _parent_biases(sd: _StateDict, convs: dict[str, _Conv], warnings: list[str]) -> None:
    """Attach bias-named parameters of a conv's parent module shaped [C_out, *spatial]."""
    # (parent, spatial rank, possible C_out) -> candidate convs, split by whether they have an
    # own bias.  Each bias-named tensor then decides 0 / 1 / several candidates from the slot
    # sizes alone, so the pass is linear in names + convs even when thousands of convs of one
    # width share a parent.  A conv settled by a tensor leaves the slots of widths it lost.
    slots: dict[_SlotKey, _WidthSlot] = {}
    # parent -> its child convs (insertion-ordered: deterministic attachment order)
    parents: dict[str, list[_Conv]] = {}
    for conv in convs.values():
        if conv.module:
            parent = split_name(conv.module)[0]
            parents.setdefault(parent, []).append(conv)
            for width in conv.widths():
                slot = slots.setdefault((parent, len(conv.shape) - 2, width), _WidthSlot())
                (slot.with_own if conv.own_bias else slot.without_own)[conv.module] = conv
    queue: deque[tuple[str, str, bool]] = deque()  # (parent, tensor name, first look)
    for parent in parents:
        if parent in convs:
            continue  # a conv's own bias-named tensors were attached by _own_bias
        for leaf, name in sd.leaves.get(parent, {}).items():
            if "bias" in leaf.lower():
                queue.append((parent, name, True))
    # A tensor that fits several convs waits on its slots: a conv settled by a LATER tensor
    # may leave them, after which it fits one conv (``bias_a`` [8, *s] fitting conv_a [8, 3]
    # and, as a ConvTranspose, conv_b [4, 8] until ``bias_b`` [4, *s] makes conv_b a Conv).
    # It is decided again only when a slot's group falls to one conv or none, which happens
    # at most twice per group, so the pass stays linear.  Its warning keeps its first place.
    waiting: dict[_SlotKey, list[str]] = {}
    ambiguous: dict[str, str] = {}  # tensor name -> its warning, while undecided
    while queue:
        parent, name, first = queue.popleft()
        if not first and name not in ambiguous:
            continue  # decided since it was queued again (it waited on two slots)
        shape = sd.infos[name].shape
        # [C_out, *spatial] and [1, C_out, *spatial] imply different spatial ranks, so a
        # conv can sit in at most one of the two slots.
        found: list[tuple[_SlotKey, _WidthSlot, int]] = []
        for channel_dim in (0, 1):
            if len(shape) < 2 + channel_dim or (channel_dim and shape[0] != 1):
                continue
            width = shape[channel_dim]
            key = (parent, len(shape) - 1 - channel_dim, width)
            match = slots.get(key)
            if match is not None and (match.without_own or match.with_own):
                found.append((key, match, width))
        if not found:
            children = parents[parent]
            if first and len(children) == 1:
                # Bias-named but not [(1,) C_out, *spatial]: with one conv in the module it
                # can only be that conv's, but how it meets the output is unknown -> other.
                children[0].terms.append(BiasTerm(name, shape, BiasSource.ADD, aligned=False))
            continue
        preferred = [(slot.without_own, width) for _, slot, width in found if slot.without_own]
        if not preferred:
            preferred = [(slot.with_own, width) for _, slot, width in found]
        count = sum(len(candidates) for candidates, _ in preferred)
        if count > 1:
            shown = [module for candidates, _ in preferred for module in islice(candidates, 5)][:5]
            names = ", ".join(shown) + (", ..." if count > 5 else "")
            ambiguous[name] = f"{name}: shape {list(shape)} fits several convs ({names}); not attached"
            for key, _, _ in found:
                waiting.setdefault(key, []).append(name)
            continue
        ambiguous.pop(name, None)
        candidates, width = preferred[0]
        conv = next(iter(candidates.values()))
        conv.terms.append(BiasTerm(name, shape, BiasSource.ADD))
        before = set(conv.widths())
        conv.settle_by_width(width, name)
        for old in before - set(conv.widths()):
            old_key = (parent, len(conv.shape) - 2, old)
            old_slot = slots.get(old_key)
            if old_slot is None:
                continue
            group = old_slot.with_own if conv.own_bias else old_slot.without_own
            if group.pop(conv.module, None) is not None and len(group) <= 1:
                queue.extend((parent, waiter, False) for waiter in waiting.pop(old_key, ()))
    warnings.extend(ambiguous.values())


def _settle_from_following_norms(sd: _StateDict, convs: dict[str, _Conv], registration_order: bool) -> None:
    """Settle Conv vs ConvTranspose from a norm that directly follows as a sibling, before any
    bias is matched by width: a conv still open to being a ConvTranspose would otherwise make a
    parent bias of another conv's width ambiguous (``bias_c`` [8, 6, 6] fits ``c`` [8, 3, 3, 3]
    and, as a ConvTranspose, ``d`` [4, 8, 3, 3] until ``bn`` of width 4 after ``d`` makes it a
    Conv).  The same sibling evidence :func:`_followed_by` uses to settle, taken earlier."""
    for conv in convs.values():
        if not conv.settleable:
            continue
        candidates = [(join_name(conv.module, "bn"), "its bn submodule")]
        if registration_order:
            follower = _next_registered(sd, conv)
            if follower is not None and split_name(follower)[0] == split_name(conv.module)[0]:
                candidates.append((follower, "registration order"))
        following = _next_in_sequential(conv.module)
        if following is not None:
            candidates.append((following, "next in Sequential"))
        for module, evidence in candidates:
            found = sd.norm_kind(module) if module not in convs else None
            if found is not None and found[1] in conv.widths():
                conv.settle_by_width(found[1], f"the {found[0]} that follows ({evidence})")
                break


def _separate_biases(sd: _StateDict, convs: dict[str, _Conv], registration_order: bool) -> None:
    """Attach the tensors of a separate bias module that follows a conv (``Sequential(conv,
    SpatialBias)``, ``SpatialBias.forward`` being ``x + self.bias``).

    A state dict does not record the order in which modules are applied, so this is inferred
    from the order of the keys (the module registered right after the conv, when the key order
    is the registration order) or from ``Sequential`` indices (``P.0`` conv, ``P.1`` bias module),
    and from the shape: ``[C_out, *spatial]``/``[1, C_out, *spatial]`` (untied) or ``[C_out]``
    (tied, in the output layout ``[C_out, 1, ...]``).  Each such term gets a note naming the
    guess.  A module registered before the conv (a positional embedding added to its input)
    is never taken."""
    modules = sd.bias_only_modules(convs)
    if not modules:
        return
    claimed: set[str] = set()
    for conv in convs.values():
        candidates: list[tuple[str | None, str]] = []
        if registration_order:
            candidates.append((_next_registered(sd, conv), "the module registered next"))
        candidates.append(
            (_next_in_sequential(conv.module) if conv.module else None, "the next Sequential index")
        )
        for module, evidence in candidates:
            if module is None or module not in modules or module in claimed:
                continue
            spatial_rank = len(conv.shape) - 2
            attached = False
            for leaf, name in sd.leaves[module].items():
                if leaf in BUFFER_LEAVES:
                    continue
                shape = sd.infos[name].shape
                layout = added_bias_layout(shape, spatial_rank, conv.widths())
                if layout is None:
                    continue
                width, term_shape = layout
                conv.terms.append(BiasTerm(name, term_shape, BiasSource.ADD))
                conv.settle_by_width(width, name)
                conv.notes.append(
                    f"bias {name} {list(shape)} taken as added to this conv's output, inferred from"
                    f" {evidence} and its shape (a state dict does not record the order of application)"
                )
                attached = True
            if attached:
                claimed.add(module)
                break


def _paired_name(leaf: str) -> list[str]:
    """Sibling names a norm following conv ``leaf`` is likely to have (``conv1`` -> ``bn1``...)."""
    lowered = leaf.lower()
    for word in _CONV_WORDS:
        position = lowered.find(word)
        if position < 0:
            continue
        prefix, suffix = leaf[:position], leaf[position + len(word) :]
        return [f"{prefix}{norm}{suffix}" for norm in _NORM_WORDS]
    return []


def _next_in_sequential(module: str) -> str | None:
    parent, leaf = split_name(module)
    if leaf.isascii() and leaf.isdecimal() and len(leaf) <= _MAX_INDEX_DIGITS:
        return join_name(parent, str(int(leaf) + 1))
    return None


def _next_registered(sd: _StateDict, conv: _Conv) -> str | None:
    """The module registered right after the conv, from the key order."""
    if not conv.module:
        return None
    prefix = conv.module + "."
    # Walk back to the conv's first key, then forward past all of its keys.
    index = conv.first_index
    while index > 0 and sd.names[index - 1].startswith(prefix):
        index -= 1
    while index < len(sd.names) and sd.names[index].startswith(prefix):
        index += 1
    if index >= len(sd.names):
        return None
    return _owner_module(sd.names[index])


def _followed_by(sd: _StateDict, convs: dict[str, _Conv], registration_order: bool) -> None:
    claimed: set[str] = set()
    absent = [conv for conv in convs.values() if not conv.terms]

    def take(conv: _Conv, module: str | None, infer: bool, evidence: str) -> bool:
        if module is None or module in claimed or module in convs:
            return False
        found = sd.norm_kind(module)
        if found is None:
            return False
        kind, width = found
        allowed = conv.widths() if infer else (conv.default_width(),)
        if width not in allowed:
            return False
        conv.followed_by = kind
        claimed.add(module)
        if infer:
            conv.settle_by_width(width, f"the {kind} that follows ({evidence})")
        return True

    for conv in absent:
        # QAT ConvBn1d/2d/3d (torch.ao.nn.intrinsic.qat) keeps its BatchNorm as the conv's own
        # child ``X.bn`` and applies it to the conv's output.
        take(conv, join_name(conv.module, "bn"), True, "its bn submodule")
    if registration_order:
        for conv in absent:
            if conv.followed_by is not None:
                continue
            follower = _next_registered(sd, conv)
            # Only a sibling says what the conv's output width is: the first norm of the next
            # block (DenseNet's ``denselayer3.norm1`` after ``denselayer2.conv2``) normalises
            # that block's input, a concatenation wider than the conv's output, and its width
            # may equal the conv's C_in.  From another module it may still be the follower of
            # the width the analysis takes, but it must not make the conv a ConvTranspose.
            sibling = follower is not None and split_name(follower)[0] == split_name(conv.module)[0]
            take(conv, follower, sibling, "registration order")
    for conv in absent:
        if conv.followed_by is not None:
            continue
        if take(conv, _next_in_sequential(conv.module), True, "next in Sequential"):
            continue
        parent, leaf = split_name(conv.module)
        for candidate in _paired_name(leaf):
            if take(conv, join_name(parent, candidate), False, "name"):
                break
    if registration_order:
        return
    # Unique-width pairing among siblings, for sources whose key order says nothing.
    pending: dict[str, list[_Conv]] = {}
    for conv in absent:
        if conv.followed_by is None and conv.module:
            pending.setdefault(split_name(conv.module)[0], []).append(conv)
    siblings: dict[str, list[str]] = {}
    for module in sd.leaves:
        if module:
            siblings.setdefault(split_name(module)[0], []).append(module)
    for parent, kids in pending.items():
        norms: dict[int, list[str]] = {}
        for module in siblings.get(parent, []):
            if module in claimed or module in convs:
                continue
            found = sd.norm_kind(module)
            if found is not None and found[0] == "BatchNorm":
                norms.setdefault(found[1], []).append(module)
        conv_widths = Counter(kid.default_width() for kid in kids)
        for conv in kids:
            width = conv.default_width()
            if len(norms.get(width, [])) == 1 and conv_widths[width] == 1:
                take(conv, norms[width][0], False, "only match")


def _output_spatial(conv: _Conv) -> tuple[int | None, ...] | None:
    """The output size an attached untied bias fixes (nothing else in a state dict does)."""
    spatial_rank = len(conv.shape) - 2
    for term in conv.terms:
        if term.source is BiasSource.ADD and term.aligned:
            spatial = untied_spatial(term.shape, spatial_rank)
            if spatial is not None:
                return spatial
    return None


def _finish(conv: _Conv) -> ConvNode:
    if conv.settleable:
        what = "bias" if not conv.terms else "per-channel bias"
        conv.notes.append(f"undetermined: no {what} to tell Conv from ConvTranspose")
    return ConvNode(
        name=conv.module or "(root)",
        op=conv.op(),
        weight_name=conv.weight_name,
        weight_shape=conv.shape,
        transposed=conv.transposed,
        groups=conv.groups,
        kernel_shape=conv.shape[2:],
        output_spatial=_output_spatial(conv),
        bias_terms=tuple(conv.terms),
        followed_by=conv.followed_by,
        notes=tuple(conv.notes),
    )


def describe_state_dict(
    tensors: Mapping[str, TensorInfo],
    *,
    path: str,
    format: str,
    location: str | None = None,
    warnings: Sequence[str] = (),
    unsafe_callables: Sequence[str] = (),
    registration_order: bool = True,
) -> ModelDescription:
    """Describe the convolutions of a state dict from its names, shapes and dtypes alone.

    ``registration_order`` says whether the mapping's key order is the modules' registration
    order (true for torch state dicts; false for safetensors, whose headers are sorted).  Even
    when true, keys that are already in sorted order are treated as unordered.  Entries that
    are not :class:`TensorInfo` with a valid shape are ignored.  See the module docstring for
    every rule.
    """
    sd = _StateDict(tensors)
    own_warnings = list(warnings)
    convs = _find_convs(sd, own_warnings)
    for conv in convs.values():
        _own_bias(sd, conv)
    ordered = registration_order and sd.names != sorted(sd.names)
    _settle_from_following_norms(sd, convs, ordered)
    _separate_biases(sd, convs, ordered)
    _parent_biases(sd, convs, own_warnings)
    _followed_by(sd, convs, ordered)
    found = list(convs.values())
    if ordered:
        found.sort(key=lambda conv: conv.first_index)
    else:
        found.sort(key=lambda conv: natural_sort_key(conv.module))
    return ModelDescription(
        path=path,
        format=format,
        convs=tuple(_finish(conv) for conv in found),
        model_params=count_model_params(sd.names, sd.infos, sd.leaves),
        warnings=tuple(own_warnings),
        location=location,
        unsafe_callables=tuple(unsafe_callables),
    )
