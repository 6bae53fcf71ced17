"""Classification, counting and formulas: pure functions over :mod:`biasinspect.model`.

No I/O happens here and nothing format-specific is known here: readers supply facts
(:class:`~biasinspect.model.ConvNode`), this module decides what they mean.

The rules:

* A bias term is aligned with the conv output ``[N, C_out, *spatial]`` by numpy
  broadcasting (its shape is right-aligned and padded with 1s).  Any spatial extent
  greater than 1 makes it **untied**; otherwise a channel extent equal to C_out makes
  it **tied**; anything else (a scalar, a batch-sized term, a wrong channel count,
  an unknown extent) is **other**.  The conv's own bias input is always tied, except a
  locally connected layer's own ``[C_out, *spatial]`` bias, classified by its shape.
* A layer is untied if any term is untied, else tied if any is tied, else other if
  there are terms, else **absent**.
* C_out is weight dim 0, except for transposed convs, where it is weight dim 1 x groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from biasinspect import limits
from biasinspect.errors import UnsupportedFormatError, UsageError
from biasinspect.model import (
    BiasInfo,
    BiasKind,
    BiasSource,
    BiasTerm,
    ConvLayer,
    ConvNode,
    Dim,
    MaybeShape,
    ModelDescription,
    ModelReport,
    Shape,
    Totals,
    shape_elements,
)

_KIND_PRECEDENCE = (BiasKind.UNTIED, BiasKind.TIED, BiasKind.OTHER)


def product(dims: Iterable[Dim]) -> int | None:
    """Product of dims, or ``None`` when any dim is unknown (1 for no dims)."""
    total = 1
    for dim in dims:
        if dim is None:
            return None
        total *= dim
    return total


def shape_params(shape: MaybeShape) -> int | None:
    """Element count of a shape, ``None`` when unknown."""
    return shape_elements(shape)


def format_count(count: int | None) -> str:
    """``2432`` -> ``"2,432"``; unknown -> ``"?"``."""
    return "?" if count is None else f"{count:,}"


def format_dims(dims: Sequence[Dim]) -> str:
    """``(3, 5, 5)`` -> ``"3x5x5"``, unknown dims as ``?``; ``()`` -> ``"1"``."""
    if not dims:
        return "1"
    return "x".join("?" if dim is None else str(dim) for dim in dims)


def format_shape(shape: MaybeShape) -> str:
    """A shape as ``[32, 28, 28]``; unknown rank as ``?``."""
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


@dataclass(frozen=True)
class ConvGeometry:
    """Channel bookkeeping derived from a weight shape."""

    in_channels: int | None
    out_channels: int | None
    fan_in: Shape | None
    """Factors of the weights feeding one output channel: (C_in/groups, *kernel)."""
    spatial_rank: int | None


def conv_geometry(node: ConvNode) -> ConvGeometry:
    """Derive in/out channels and the per-output-channel fan-in from a node's weight shape."""
    weight = node.weight_shape
    if weight is None or len(weight) < 2:
        rank = len(node.kernel_shape) if node.kernel_shape is not None else None
        return ConvGeometry(None, None, None, rank)
    kernel = tuple(weight[2:])
    groups = node.groups
    if node.transposed:
        per_group_out = weight[1]
        out_channels = None if per_group_out is None or groups is None else per_group_out * groups
        in_channels = weight[0]
        if in_channels is None or groups is None or groups <= 0 or in_channels % groups:
            fan_in: Shape | None = None
        else:
            fan_in = (in_channels // groups, *kernel)
    else:
        out_channels = weight[0]
        per_group_in = weight[1]
        in_channels = None if per_group_in is None or groups is None else per_group_in * groups
        fan_in = (per_group_in, *kernel)
    return ConvGeometry(in_channels, out_channels, fan_in, len(kernel))


def classify_term(
    term: BiasTerm,
    out_channels: int | None,
    spatial_rank: int | None,
    output_spatial: MaybeShape = None,
) -> BiasKind:
    """Classify one bias term by broadcasting it against ``[N, C_out, *spatial]``.

    A term that cannot broadcast against the output (a channel extent other than 1 or C_out, a
    spatial extent other than 1 or the output's) is **other**: it is reported, not interpreted.
    """
    shape = term.shape
    if term.source is BiasSource.CONV and (
        shape is None or spatial_rank is None or len(shape) != spatial_rank + 1
    ):
        # A conv's own bias input ([C_out]) is tied; only a locally connected layer's own bias is
        # stored [C_out, *spatial], and that one is classified by its shape.
        return BiasKind.TIED
    if shape is None or spatial_rank is None or not term.aligned:
        return BiasKind.OTHER
    output_rank = 2 + spatial_rank
    if len(shape) > output_rank:
        return BiasKind.OTHER
    aligned = (1,) * (output_rank - len(shape)) + tuple(shape)
    batch, channel, spatial = aligned[0], aligned[1], aligned[2:]
    if batch != 1 or any(dim is None for dim in spatial):
        return BiasKind.OTHER
    if channel != 1 and (channel is None or out_channels is None or channel != out_channels):
        return BiasKind.OTHER
    if output_spatial is not None and len(output_spatial) == spatial_rank:
        for extent, size in zip(spatial, output_spatial, strict=False):
            if size is not None and extent not in (1, size):
                return BiasKind.OTHER
    if any(dim is not None and dim > 1 for dim in spatial):
        return BiasKind.UNTIED
    if channel == out_channels:
        return BiasKind.TIED
    return BiasKind.OTHER


def layer_kind(kinds: Sequence[BiasKind]) -> BiasKind:
    """Untied if any term is untied, else tied, else other; absent when there are no terms."""
    for kind in _KIND_PRECEDENCE:
        if kind in kinds:
            return kind
    return BiasKind.ABSENT


def _term_expression(shape: MaybeShape) -> str:
    if shape is None:
        return "?"
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    if dims == [1]:
        return "1"
    return format_dims(dims)


def parameter_formula(
    fan_in: Shape | None,
    out_channels: int | None,
    weight_shape: MaybeShape,
    terms: Sequence[BiasTerm],
    kind: BiasKind,
    locations: MaybeShape = None,
) -> str:
    """Spell out a layer's parameter count.

    ``(3x5x5 + 1) x 32 = 2,432`` for one tied bias per channel, ``3x5x5 x 32 + 32x28x28 = 27,488``
    for an untied bias, ``3x5x5 x 32 = 2,400`` without bias.  When the fan-in is unknown
    (a transposed conv whose groups are unknown) the weight shape itself is written out.
    """
    bias_total = _sum_params(terms)
    if locations is not None:
        # A locally connected layer: a distinct filter per output location.
        per_location = product(fan_in) if fan_in is not None else None
        count = product(locations)
        weight_total = (
            None
            if per_location is None or count is None or out_channels is None
            else per_location * out_channels * count
        )
        fan_text = "?" if fan_in is None else format_dims(fan_in)
        channels = "?" if out_channels is None else str(out_channels)
        parts = [
            f"{fan_text} x {channels} x {format_dims(locations)}",
            *(_term_expression(t.shape) for t in terms),
        ]
        total = None if weight_total is None or bias_total is None else weight_total + bias_total
        return f"{' + '.join(parts)} = {format_count(total)}"
    if fan_in is not None and (out_channels is not None or weight_shape is None or weight_shape[0] is None):
        fan_text = format_dims(fan_in)
        weights = product(fan_in)
        weight_total = None if weights is None or out_channels is None else weights * out_channels
        if (
            kind is BiasKind.TIED
            and len(terms) == 1
            and out_channels is not None
            and bias_total == out_channels
            and weight_total is not None
        ):
            return f"({fan_text} + 1) x {out_channels} = {format_count(weight_total + out_channels)}"
        weight_text = f"{fan_text} x {'?' if out_channels is None else out_channels}"
    elif weight_shape is not None:
        weight_total = product(weight_shape)
        weight_text = format_dims(weight_shape)
    else:
        weight_total = None
        weight_text = "?"
    parts = [weight_text, *(_term_expression(term.shape) for term in terms)]
    total = None if weight_total is None or bias_total is None else weight_total + bias_total
    return f"{' + '.join(parts)} = {format_count(total)}"


def _sum_params(terms: Sequence[BiasTerm]) -> int | None:
    return _sum_known(shape_params(term.shape) for term in terms)


def analyze_conv(node: ConvNode) -> ConvLayer:
    """Classify one convolution and compute its counts and formula."""
    geometry = conv_geometry(node)
    term_kinds = [
        classify_term(term, geometry.out_channels, geometry.spatial_rank, node.output_spatial)
        for term in node.bias_terms
    ]
    kind = layer_kind(term_kinds)
    deciding = next((t for t, k in zip(node.bias_terms, term_kinds, strict=False) if k is kind), None)
    bias = BiasInfo(
        kind=kind,
        shape=deciding.shape if deciding is not None else None,
        params=_sum_params(node.bias_terms),
        source=deciding.source if deciding is not None else None,
        terms=node.bias_terms,
    )
    kernel = node.kernel_shape
    if kernel is None and node.weight_shape is not None and len(node.weight_shape) > 2:
        kernel = tuple(node.weight_shape[2:])
    return ConvLayer(
        name=node.name,
        op=node.op,
        in_channels=geometry.in_channels,
        out_channels=geometry.out_channels,
        groups=node.groups,
        kernel_shape=kernel,
        output_spatial=node.output_spatial,
        weight_shape=node.weight_shape,
        weight_params=_weight_params(node),
        bias=bias,
        followed_by=node.followed_by if kind is BiasKind.ABSENT else None,
        formula=parameter_formula(
            geometry.fan_in,
            geometry.out_channels,
            node.weight_shape,
            node.bias_terms,
            kind,
            node.weight_locations,
        ),
        transposed=node.transposed,
    )


def _weight_params(node: ConvNode) -> int | None:
    if node.weight_locations is None:
        return shape_params(node.weight_shape)
    per_location = shape_params(node.weight_shape)
    count = product(node.weight_locations)
    return None if per_location is None or count is None else per_location * count


def _sum_known(values: Iterable[int | None]) -> int | None:
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


def compute_totals(layers: Sequence[ConvLayer], model_params: int | None) -> Totals:
    """Sum the layers; a total is ``None`` (unknown) when any of its addends is unknown."""
    kinds = [layer.bias.kind for layer in layers]
    return Totals(
        conv_layers=len(layers),
        conv_weight_params=_sum_known(layer.weight_params for layer in layers),
        conv_bias_params=_sum_known(layer.bias.params for layer in layers),
        tied=kinds.count(BiasKind.TIED),
        untied=kinds.count(BiasKind.UNTIED),
        absent=kinds.count(BiasKind.ABSENT),
        other=kinds.count(BiasKind.OTHER),
        model_params=model_params,
    )


def _checked_number(value: object, what: str) -> None:
    """Refuse a number no real model has (or a value that is not an integer at all)."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise UnsupportedFormatError(f"unsupported: {what} is not an integer")
    if value < 0:
        raise UnsupportedFormatError(f"unsupported: {what} is negative")
    if value > limits.MAX_DIM:
        raise UnsupportedFormatError(f"unsupported: {what} is too large (over 2**63 - 1)")


def _checked_shape(shape: MaybeShape, what: str) -> None:
    if shape is None:
        return
    if not isinstance(shape, tuple):
        raise UnsupportedFormatError(f"unsupported: {what} is not a shape")
    if len(shape) > limits.MAX_RANK:
        raise UnsupportedFormatError(
            f"unsupported: {what} has {len(shape)} dimensions, over the {limits.MAX_RANK} supported"
        )
    for dim in shape:
        _checked_number(dim, f"a dimension of {what}")
    count = 1
    for dim in shape:
        if dim is None:
            return
        count *= dim
        if count > limits.MAX_DIM:
            raise UnsupportedFormatError(f"unsupported: {what} is too large (over 2**63 - 1 elements)")


def _quoted_name(name: str) -> str:
    text = repr(name)
    return text if len(text) <= 200 else text[:197] + "..."


def check_numbers(description: ModelDescription) -> None:
    """Refuse a description holding numbers past the caps in :mod:`biasinspect.limits`.

    Readers check what their format allows; this is the one check every format passes through,
    so a dim of ``10**5000`` (which ``str()`` cannot even print) or a negative count becomes a
    clean ``unsupported: ...`` failure of that file instead of a traceback or a nonsense total.
    """
    _checked_number(description.model_params, "the model's parameter count")
    for node in description.convs:
        layer = f"layer {_quoted_name(node.name)}"
        _checked_shape(node.weight_shape, f"the weight shape of {layer}")
        _checked_shape(node.kernel_shape, f"the kernel shape of {layer}")
        _checked_shape(node.output_spatial, f"the output size of {layer}")
        _checked_number(node.groups, f"the group count of {layer}")
        for term in node.bias_terms:
            _checked_shape(term.shape, f"the shape of bias {_quoted_name(term.name)} of {layer}")


def analyze(description: ModelDescription) -> ModelReport:
    """Turn a reader's description of one model into its report.

    Raises :class:`UnsupportedFormatError` for numbers past the caps (see :func:`check_numbers`).
    """
    check_numbers(description)
    layers = tuple(analyze_conv(node) for node in description.convs)
    warnings = list(description.warnings)
    warnings.extend(_grouped_notes(description.convs))
    unknown_weights = [layer.name for layer in layers if layer.weight_params is None]
    if unknown_weights:
        warnings.append(
            f"{len(unknown_weights)} conv layer(s) with unknown weight shape, so conv_weight_params is unknown: "
            + ", ".join(unknown_weights[:5])
            + (" ..." if len(unknown_weights) > 5 else "")
        )
    return ModelReport(
        path=description.path,
        format=description.format,
        layers=layers,
        totals=compute_totals(layers, description.model_params),
        warnings=tuple(dict.fromkeys(warnings)),
        location=description.location,
        unsafe_callables=description.unsafe_callables,
    )


def _grouped_notes(convs: Sequence[ConvNode]) -> list[str]:
    """One warning per distinct note; a note shared by many layers is said once, naming a few."""
    layers_by_note: dict[str, list[str]] = {}
    for node in convs:
        for note in node.notes:
            layers_by_note.setdefault(note, []).append(node.name)
    grouped = []
    for note, names in layers_by_note.items():
        if len(names) == 1:
            grouped.append(f"{names[0]}: {note}")
        else:
            shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            grouped.append(f"{len(names)} layers: {note}: {shown}")
    return grouped


def totals_sentence(totals: Totals) -> str:
    """The totals in words: ``16 conv layers: 16 tied (one bias per output channel), 0 untied, 0 absent``."""
    noun = "conv layer" if totals.conv_layers == 1 else "conv layers"
    sentence = (
        f"{totals.conv_layers} {noun}: {totals.tied} tied (one bias per output channel), "
        f"{totals.untied} untied (one bias per channel and location), {totals.absent} absent"
    )
    if totals.other:
        sentence += f", {totals.other} other"
    return sentence


# --- calc: the seed question answered without a model -------------------------------------------


@dataclass(frozen=True)
class CalcResult:
    """Parameter counts of one conv layer, tied and untied side by side."""

    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]
    input_spatial: tuple[int, ...]
    output_spatial: tuple[int, ...]
    weight_params: int
    tied_bias_params: int
    untied_bias_params: int
    tied_total: int
    untied_total: int
    tied_formula: str
    untied_formula: str
    absent_formula: str


def conv_output_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    """Output length of one spatial axis: floor((size + pads - dilation*(kernel-1) - 1) / stride) + 1."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def _broadcast(values: Sequence[int], rank: int, what: str) -> tuple[int, ...]:
    if len(values) == 1:
        return tuple(values) * rank
    if len(values) != rank:
        raise UsageError(f"--{what} has {len(values)} values but the input has {rank} spatial dims")
    return tuple(values)


def calc(
    input_shape: Sequence[int],
    filters: Sequence[int],
    stride: Sequence[int] = (1,),
    padding: Sequence[int] | str = (0,),
    dilation: Sequence[int] = (1,),
    groups: int = 1,
) -> CalcResult:
    """Parameter counts for a conv on an input ``(C, *spatial)`` with filters ``(N, *kernel)``.

    ``padding`` is per-side padding (one value or one per axis), or ``"same"``/``"valid"``.
    """
    if len(input_shape) < 2:
        raise UsageError("--input needs channels and at least one spatial size, e.g. 3x32x32")
    channels, spatial = input_shape[0], tuple(input_shape[1:])
    rank = len(spatial)
    if len(filters) != rank + 1:
        raise UsageError(
            f"--filters needs a count and {rank} kernel size(s) to match --input, e.g. 32x"
            + "x".join(["5"] * rank)
        )
    out_channels, kernel = filters[0], tuple(filters[1:])
    if min((channels, out_channels, groups, *spatial, *kernel)) <= 0:
        raise UsageError("sizes, counts and --groups must be positive")
    if channels % groups or out_channels % groups:
        raise UsageError(
            f"--groups {groups} must divide both the input channels ({channels}) and filters ({out_channels})"
        )
    strides = _broadcast(stride, rank, "stride")
    dilations = _broadcast(dilation, rank, "dilation")
    if min(strides) <= 0 or min(dilations) <= 0:
        raise UsageError("--stride and --dilation must be positive")
    if isinstance(padding, str):
        if padding == "valid":
            output = tuple(
                conv_output_size(s, k, st, 0, d)
                for s, k, st, d in zip(spatial, kernel, strides, dilations, strict=False)
            )
        elif padding == "same":
            output = tuple(math.ceil(s / st) for s, st in zip(spatial, strides, strict=False))
        else:
            raise UsageError(f"--padding must be numbers, 'same' or 'valid', not {padding!r}")
    else:
        pads = _broadcast(padding, rank, "padding")
        if min(pads) < 0:
            raise UsageError("--padding must not be negative")
        output = tuple(
            conv_output_size(s, k, st, 2 * p, d)
            for s, k, st, p, d in zip(spatial, kernel, strides, pads, dilations, strict=False)
        )
    if min(output) <= 0:
        raise UsageError(
            f"the kernel {format_dims(kernel)} does not fit the input {format_dims(spatial)} with this padding"
        )
    fan_in = (channels // groups, *kernel)
    weight_params = product(fan_in)
    assert weight_params is not None
    weight_params *= out_channels
    untied_bias = out_channels * math.prod(output)
    fan_text = format_dims(fan_in)
    return CalcResult(
        in_channels=channels,
        out_channels=out_channels,
        groups=groups,
        kernel=kernel,
        input_spatial=spatial,
        output_spatial=output,
        weight_params=weight_params,
        tied_bias_params=out_channels,
        untied_bias_params=untied_bias,
        tied_total=weight_params + out_channels,
        untied_total=weight_params + untied_bias,
        tied_formula=f"({fan_text} + 1) x {out_channels} = {format_count(weight_params + out_channels)}",
        untied_formula=(
            f"{fan_text} x {out_channels} + {format_dims((out_channels, *output))} "
            f"= {format_count(weight_params + untied_bias)}"
        ),
        absent_formula=f"{fan_text} x {out_channels} = {format_count(weight_params)}",
    )
