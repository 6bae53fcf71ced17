"""The vocabulary every biasinspect module speaks.

Readers turn a file into :class:`ModelDescription` objects (format-neutral facts: conv
nodes, their weight shapes, their bias terms, their neighbours).  :mod:`biasinspect.analysis`
turns those facts into :class:`ModelReport` objects (classified layers, formulas, totals),
and :mod:`biasinspect.render` prints them.  Everything here is a frozen dataclass so that a
report can be shared, hashed and compared in tests without defensive copies.

A dimension is an ``int`` when it is known and ``None`` when it is symbolic or could not be
resolved; a whole shape is ``None`` when even its rank is unknown.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

Dim = int | None
"""One dimension: an ``int`` when known, ``None`` when symbolic or unresolved."""

Shape = tuple[Dim, ...]
"""A tensor shape whose rank is known; individual dims may be unknown."""

MaybeShape = Shape | None
"""A shape, or ``None`` when not even the rank is known."""


def shape_elements(shape: MaybeShape) -> int | None:
    """Element count of a shape (1 for a scalar), ``None`` when the rank or any dim is unknown."""
    if shape is None:
        return None
    count = 1
    for dim in shape:
        if dim is None:
            return None
        count *= dim
    return count


class _StrEnum(str, enum.Enum):
    """``enum.StrEnum`` for Python 3.10: members compare and format as their value."""

    def __str__(self) -> str:
        return str(self.value)


class BiasKind(_StrEnum):
    """How a convolution's bias is laid out."""

    TIED = "tied"
    """One bias per output channel: shape [C_out]."""
    UNTIED = "untied"
    """One bias per output channel and output location: [C_out, *spatial]."""
    ABSENT = "absent"
    """No bias at all (often because a BatchNorm follows)."""
    OTHER = "other"
    """A bias-like term that is neither of the above, e.g. one scalar for all channels."""


class BiasSource(_StrEnum):
    """Where a bias term was found."""

    CONV = "conv"
    """The conv's own bias (ONNX input 2, ``<conv>.bias`` in PyTorch)."""
    ADD = "add"
    """A separate addition after the conv (an ONNX ``Add``, or a PyTorch bias parameter)."""


@dataclass(frozen=True)
class BiasTerm:
    """One tensor that is added to a convolution's output."""

    name: str
    shape: MaybeShape
    source: BiasSource
    aligned: bool = True
    """False when the reader knows the tensor's shape but not how it meets the conv output (a
    bias-named parameter of a state dict that is neither [C_out] nor [(1,) C_out, *spatial]);
    such a term is classified **other** instead of being broadcast."""


@dataclass(frozen=True)
class ConvNode:
    """A convolution as a reader found it: facts only, nothing classified yet.

    ``weight_shape`` is in the framework's own layout: [C_out, C_in/groups, *kernel] for a
    convolution, [C_in, C_out/groups, *kernel] for a transposed convolution.
    """

    name: str
    op: str
    weight_name: str
    weight_shape: MaybeShape
    transposed: bool | None
    """``None`` when the reader cannot tell a conv from a transposed conv (some state dicts)."""
    groups: int | None
    """``None`` when unknown (state dicts do not record it)."""
    kernel_shape: MaybeShape = None
    """From node attributes when present; otherwise derived from the weight shape."""
    output_spatial: MaybeShape = None
    bias_terms: tuple[BiasTerm, ...] = ()
    followed_by: str | None = None
    notes: tuple[str, ...] = ()
    """Reader remarks about this layer that end up in the model's warnings."""
    weight_locations: MaybeShape = None
    """For a locally connected layer (Keras ``LocallyConnected1D/2D``): the output extents over
    which it holds a separate filter each; its weights are ``weight_shape`` per location."""


@dataclass(frozen=True)
class ModelDescription:
    """Everything a reader learned about one model (one weight set) in a file."""

    path: str
    format: str
    convs: tuple[ConvNode, ...]
    model_params: int | None
    """Elements of all trainable/floating parameter tensors; ``None`` when unknown."""
    warnings: tuple[str, ...] = ()
    location: str | None = None
    """Where in the file this weight set was found (e.g. ``state_dict`` or ``ema``)."""
    unsafe_callables: tuple[str, ...] = ()
    """Dotted names of callables a pickle would have run under ``torch.load``."""
    companion_files: tuple[str, ...] = ()
    """Files the model itself names as part of it (ONNX external data inside the model's
    folder), normalised; never opened.  A folder scan does not report them as bad models."""


@dataclass(frozen=True)
class BiasInfo:
    """The classified bias of one layer."""

    kind: BiasKind
    shape: MaybeShape
    params: int | None
    source: BiasSource | None
    terms: tuple[BiasTerm, ...] = ()


@dataclass(frozen=True)
class ConvLayer:
    """One classified convolution: a row of the report."""

    name: str
    op: str
    in_channels: int | None
    out_channels: int | None
    groups: int | None
    kernel_shape: MaybeShape
    output_spatial: MaybeShape
    weight_shape: MaybeShape
    weight_params: int | None
    bias: BiasInfo
    followed_by: str | None
    formula: str
    transposed: bool | None = None


@dataclass(frozen=True)
class Totals:
    """Sums over a model's conv layers, plus the whole model's parameter count."""

    conv_layers: int
    conv_weight_params: int | None
    conv_bias_params: int | None
    tied: int
    untied: int
    absent: int
    other: int
    model_params: int | None


@dataclass(frozen=True)
class ModelReport:
    """The report for one model (one weight set) in one file."""

    path: str
    format: str
    layers: tuple[ConvLayer, ...]
    totals: Totals
    warnings: tuple[str, ...] = ()
    location: str | None = None
    unsafe_callables: tuple[str, ...] = ()

    def _repr_html_(self) -> str:
        """Jupyter: the model's totals, chart and table."""
        return Report(models=(self,))._repr_html_()

    def _repr_markdown_(self) -> str:
        """Jupyter: the model as a markdown table."""
        return Report(models=(self,))._repr_markdown_()


@dataclass(frozen=True)
class InspectionFailure:
    """A path that could not be inspected, with the one-line reason."""

    path: str
    message: str


@dataclass(frozen=True)
class Report:
    """The result of inspecting one or more paths."""

    models: tuple[ModelReport, ...] = ()
    errors: tuple[InspectionFailure, ...] = ()

    def _repr_html_(self) -> str:
        """Jupyter: the HTML report as a fragment (styles scoped to it)."""
        from biasinspect.render_html import render_html_fragment

        return render_html_fragment(self)

    def _repr_markdown_(self) -> str:
        """Jupyter: the markdown report."""
        from biasinspect.render import render

        return render(self, "markdown")
