"""Compare two models' conv layers: did an export keep the biases?

Pure functions over two :class:`~biasinspect.model.ModelReport` objects (no I/O).  Layers are
matched in two passes:

1. **by name**: both sides' layer names reduced to a module path (``/features/features.0/Conv``
   from the legacy ONNX exporter, ``features.0`` from a state dict or torch.export, ``/conv/Conv``
   from OpenVINO all become ``features.0`` or ``conv``), matched when equal and unique;
2. **by order**: the layers left over on both sides are aligned in order on their geometry
   (output channels, weights per output channel, kernel), longest common subsequence first.
   Such a match is marked ``order``, never passed off as a name match.

Each matched pair lists its changes: the bias kind (``absent -> tied`` where a norm followed is a
*folded norm*), the bias parameter count and the weight shape.  Layers found on one side only
are listed as such.
"""

from __future__ import annotations

import difflib
import enum
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from biasinspect.model import BiasKind, ConvLayer, ModelReport


class ChangeKind(str, enum.Enum):
    """What can differ between a source layer and its export."""

    KIND = "kind"
    PARAMS = "params"
    WEIGHT_SHAPE = "weight_shape"
    ONLY_SOURCE = "only_source"
    ONLY_EXPORT = "only_export"

    def __str__(self) -> str:
        return str(self.value)


class MatchedBy(str, enum.Enum):
    """How a pair of layers was matched."""

    NAME = "name"
    ORDER = "order"

    def __str__(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class Change:
    """One difference, with a short human description."""

    kind: ChangeKind
    description: str
    folded_norm: bool = False
    """A bias-free conv followed by a norm (source) has a tied bias in the export: the norm was
    folded into the conv, the usual effect of export optimisation."""


@dataclass(frozen=True)
class LayerDiff:
    """One row of a diff: a matched pair, or a layer on one side only."""

    source: ConvLayer | None
    export: ConvLayer | None
    matched_by: MatchedBy | None
    changes: tuple[Change, ...]

    @property
    def name(self) -> str:
        """The source layer's name, or the export's for a layer found in the export only."""
        layer = self.source if self.source is not None else self.export
        return layer.name if layer is not None else ""


@dataclass(frozen=True)
class DiffSummary:
    """Counts over a diff's rows."""

    matched: int
    changed: int
    folded_norms: int
    only_source: int
    only_export: int


@dataclass(frozen=True)
class DiffReport:
    """The comparison of one source model with one export."""

    source: ModelReport
    export: ModelReport
    layers: tuple[LayerDiff, ...]
    summary: DiffSummary
    notes: tuple[str, ...] = ()

    def _repr_html_(self) -> str:
        """Jupyter: the diff's HTML form."""
        from biasinspect.render_diff import render_diff

        return render_diff(self, "html")

    def _repr_markdown_(self) -> str:
        """Jupyter: the diff as markdown."""
        from biasinspect.render_diff import render_diff

        return render_diff(self, "markdown")


_OP_COMPONENT = re.compile(r"^[A-Z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*$")
"""An exporter's op name at the end of a node path (``Conv``, ``ConvTranspose_3``, and
onnxruntime's quantized ``Conv_quant``)."""

_SUFFIXES = ("/WithoutBiases", ".weight")


def module_path(name: str) -> str:
    """A layer name reduced to a module path, so that names from different tools compare.

    ``/layer1/layer1.0/conv1/Conv`` (legacy torch ONNX scopes, where a component may extend the
    one before it: ``downsample`` then ``downsample.0``) -> ``layer1.0.conv1``; ``/conv/Conv`` ->
    ``conv``; ``features.0`` stays.
    """
    text = name
    for suffix in _SUFFIXES:
        text = text.removesuffix(suffix)
    if "/" not in text:
        return text
    parts = [part for part in text.split("/") if part]
    if len(parts) > 1 and _OP_COMPONENT.match(parts[-1]):
        parts = parts[:-1]
    path, last = "", ""
    for part in parts:
        if last and part.startswith(last + "."):
            path = path[: len(path) - len(last)] + part
        elif part != last:
            path = f"{path}.{part}" if path else part
        last = part
    return path


def _geometry(layer: ConvLayer) -> tuple[object, ...]:
    """Output channels, weights per output channel and kernel: the same in every framework's
    layout (a state dict that does not know ``groups`` still knows these)."""
    out, params = layer.out_channels, layer.weight_params
    per_output = None if out is None or params is None or out == 0 else params // out
    kernel = None if layer.kernel_shape is None else tuple(layer.kernel_shape)
    return (out, per_output, kernel)


def _bias_text(layer: ConvLayer) -> str:
    if layer.bias.kind is BiasKind.ABSENT and layer.followed_by:
        return f"absent ({layer.followed_by} follows)"
    if layer.bias.shape is not None and layer.bias.kind is not BiasKind.ABSENT:
        return f"{layer.bias.kind} {list(layer.bias.shape)}"
    return str(layer.bias.kind)


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def compare_layers(source: ConvLayer, export: ConvLayer) -> tuple[Change, ...]:
    """The changes from ``source`` to ``export`` (empty when the bias and weights are the same)."""
    changes: list[Change] = []
    if source.bias.kind is not export.bias.kind:
        folded = (
            source.bias.kind is BiasKind.ABSENT
            and source.followed_by is not None
            and export.bias.kind is BiasKind.TIED
        )
        text = f"{_bias_text(source)} -> {_bias_text(export)}" + (" (folded norm)" if folded else "")
        changes.append(Change(ChangeKind.KIND, text, folded_norm=folded))
    if source.bias.params != export.bias.params:
        changes.append(
            Change(
                ChangeKind.PARAMS, f"bias params {_count(source.bias.params)} -> {_count(export.bias.params)}"
            )
        )
    if _geometry(source) != _geometry(export):
        before = "?" if source.weight_shape is None else "x".join(map(_dimension, source.weight_shape))
        after = "?" if export.weight_shape is None else "x".join(map(_dimension, export.weight_shape))
        changes.append(
            Change(
                ChangeKind.WEIGHT_SHAPE,
                f"weights {before} ({_count(source.weight_params)}) -> {after} ({_count(export.weight_params)})",
            )
        )
    return tuple(changes)


def _dimension(dim: int | None) -> str:
    return "?" if dim is None else str(dim)


def _unique_paths(layers: Sequence[ConvLayer]) -> dict[str, int]:
    paths = [module_path(layer.name) for layer in layers]
    counts = Counter(paths)
    return {path: index for index, path in enumerate(paths) if counts[path] == 1 and path}


def diff_models(source: ModelReport, export: ModelReport) -> DiffReport:
    """Match ``source``'s conv layers with ``export``'s and list what changed."""
    by_name_source = _unique_paths(source.layers)
    by_name_export = _unique_paths(export.layers)
    pairs: dict[int, tuple[int, MatchedBy]] = {}
    for path, index in by_name_source.items():
        if path in by_name_export:
            pairs[index] = (by_name_export[path], MatchedBy.NAME)
    taken_export = {index for index, _how in pairs.values()}
    rest_source = [i for i in range(len(source.layers)) if i not in pairs]
    rest_export = [j for j in range(len(export.layers)) if j not in taken_export]
    matcher = difflib.SequenceMatcher(
        a=[_geometry(source.layers[i]) for i in rest_source],
        b=[_geometry(export.layers[j]) for j in rest_export],
        autojunk=False,
    )
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            pairs[rest_source[block.a + offset]] = (rest_export[block.b + offset], MatchedBy.ORDER)
    matched_export = {index for index, _how in pairs.values()}

    rows: list[LayerDiff] = []
    export_pending = sorted(j for j in range(len(export.layers)) if j not in matched_export)
    for i, layer in enumerate(source.layers):
        if i in pairs:
            j, how = pairs[i]
            # Export-only layers that come before this pair's export layer are listed first.
            while export_pending and export_pending[0] < j:
                rows.append(_only_export(export.layers[export_pending.pop(0)]))
            rows.append(LayerDiff(layer, export.layers[j], how, compare_layers(layer, export.layers[j])))
        else:
            rows.append(LayerDiff(layer, None, None, (Change(ChangeKind.ONLY_SOURCE, "only in the source"),)))
    rows.extend(_only_export(export.layers[j]) for j in export_pending)
    matched = [row for row in rows if row.matched_by is not None]
    summary = DiffSummary(
        matched=len(matched),
        changed=sum(1 for row in matched if row.changes),
        folded_norms=sum(1 for row in matched for change in row.changes if change.folded_norm),
        only_source=sum(1 for row in rows if row.export is None),
        only_export=sum(1 for row in rows if row.source is None),
    )
    notes: list[str] = []
    by_order = sum(1 for row in matched if row.matched_by is MatchedBy.ORDER)
    if by_order:
        notes.append(
            f"{by_order} layer pair(s) matched by order and weight geometry only (their names differ); "
            "check them"
        )
    return DiffReport(source, export, tuple(rows), summary, tuple(notes))


def _only_export(layer: ConvLayer) -> LayerDiff:
    return LayerDiff(None, layer, None, (Change(ChangeKind.ONLY_EXPORT, "only in the export"),))


__all__ = [
    "Change",
    "ChangeKind",
    "DiffReport",
    "DiffSummary",
    "LayerDiff",
    "MatchedBy",
    "compare_layers",
    "diff_models",
    "module_path",
]
