"""Rendering of reports: a text table (default), markdown, CSV, JSON and HTML (:mod:`biasinspect.render_html`).

JSON is a public contract (see README, "JSON report"): keys are only ever added.

Every text that comes from a file or a path (names, locations, warnings, error reasons, paths)
passes through :func:`printable` before it reaches a text format, so a file cannot put an escape
sequence, a bell or a forged line on the user's terminal.  JSON escapes by itself.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

from biasinspect import __version__
from biasinspect.analysis import CalcResult, format_count, format_dims, format_shape, totals_sentence
from biasinspect.model import BiasTerm, ConvLayer, MaybeShape, ModelReport, Report

FORMATS = ("table", "markdown", "csv", "json", "html")


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` as one line of printable characters: the one escaping rule of every text output.

    Every character Python does not call printable becomes a backslash escape (``\\n``,
    ``\\x1b``, ``\\u202e``): C0 and C1 controls, DEL, line and paragraph separators (U+2028,
    U+2029), bidi overrides and isolates and other format characters, lone surrogates (from
    undecodable file names), unassigned code points and spaces other than U+0020.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def display_path(path: str) -> str:
    """A path as one printable line (``""`` for the empty path, which would otherwise vanish)."""
    return printable(path) if path else '""'


_TABLE_HEADERS = (
    "layer", "op", "in", "out", "groups", "kernel", "output", "weights",
    "bias", "bias shape", "bias params", "followed by", "formula",
)  # fmt: skip
_TABLE_ALIGN = ("left", "left", "right", "right", "right", "left", "left", "right",
                "left", "left", "right", "left", "left")  # fmt: skip


def _shape_json(shape: MaybeShape) -> list[int | None] | None:
    return None if shape is None else list(shape)


def _term_json(term: BiasTerm) -> dict[str, Any]:
    return {
        "name": term.name,
        "shape": _shape_json(term.shape),
        "source": str(term.source),
        "aligned": term.aligned,
    }


def layer_to_json(layer: ConvLayer) -> dict[str, Any]:
    """One layer as the JSON contract spells it."""
    return {
        "name": layer.name,
        "op": layer.op,
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "groups": layer.groups,
        "kernel_shape": _shape_json(layer.kernel_shape),
        "output_spatial": _shape_json(layer.output_spatial),
        "weight_shape": _shape_json(layer.weight_shape),
        "weight_params": layer.weight_params,
        "transposed": layer.transposed,
        "bias": {
            "kind": str(layer.bias.kind),
            "shape": _shape_json(layer.bias.shape),
            "params": layer.bias.params,
            "source": None if layer.bias.source is None else str(layer.bias.source),
            "terms": [_term_json(term) for term in layer.bias.terms],
        },
        "followed_by": layer.followed_by,
        "formula": layer.formula,
    }


def model_to_json(model: ModelReport) -> dict[str, Any]:
    """One model report as the JSON contract spells it."""
    totals = model.totals
    return {
        "path": model.path,
        "format": model.format,
        "location": model.location,
        "layers": [layer_to_json(layer) for layer in model.layers],
        "totals": {
            "conv_layers": totals.conv_layers,
            "conv_weight_params": totals.conv_weight_params,
            "conv_bias_params": totals.conv_bias_params,
            "tied": totals.tied,
            "untied": totals.untied,
            "absent": totals.absent,
            "other": totals.other,
            "model_params": totals.model_params,
        },
        "warnings": list(model.warnings),
        "unsafe_callables": list(model.unsafe_callables),
    }


def report_to_json(report: Report) -> dict[str, Any]:
    """The whole report as a JSON-ready dict."""
    return {
        "tool": "biasinspect",
        "version": __version__,
        "models": [model_to_json(model) for model in report.models],
        "errors": [{"path": failure.path, "message": failure.message} for failure in report.errors],
    }


def render_json(report: Report) -> str:
    """Pretty JSON, one document for all paths."""
    return json.dumps(report_to_json(report), indent=2) + "\n"


def _dims_or_blank(shape: MaybeShape) -> str:
    return "" if shape is None else format_dims(shape)


def _optional(value: object) -> str:
    return "?" if value is None else str(value)


def _layer_row(layer: ConvLayer, cell: Callable[[str], str] = printable) -> list[str]:
    return [cell(value) for value in _raw_layer_row(layer)]


def _raw_layer_row(layer: ConvLayer) -> list[str]:
    return [
        layer.name,
        layer.op,
        _optional(layer.in_channels),
        _optional(layer.out_channels),
        _optional(layer.groups),
        _dims_or_blank(layer.kernel_shape),
        _dims_or_blank(layer.output_spatial) or "?",
        format_count(layer.weight_params),
        str(layer.bias.kind),
        "" if layer.bias.shape is None and not layer.bias.terms else format_shape(layer.bias.shape),
        "0" if not layer.bias.terms else format_count(layer.bias.params),
        layer.followed_by or "",
        layer.formula,
    ]


def model_heading(model: ModelReport) -> str:
    """``path (format)``, with the location inside the file when there is one."""
    where = f" [{model.location}]" if model.location else ""
    return printable(f"{model.path}{where} ({model.format})")


def _totals_lines(model: ModelReport) -> list[str]:
    totals = model.totals
    return [
        totals_sentence(totals),
        f"conv weights {format_count(totals.conv_weight_params)}, conv biases {format_count(totals.conv_bias_params)}, "
        f"model parameters {format_count(totals.model_params)}",
    ]


def _markdown_cell(text: str) -> str:
    """A markdown table cell: printable, and a ``|`` in a name cannot open a new column."""
    return printable(text).replace("|", "\\|")


def _render_text(report: Report, table_format: str, heading_prefix: str) -> str:
    from tabulate import tabulate  # only text formats pay for it (it imports importlib.metadata)

    cell = _markdown_cell if table_format == "github" else printable
    blocks: list[str] = []
    for model in report.models:
        lines = [heading_prefix + model_heading(model)]
        if model.layers:
            lines.append("")
            lines.append(
                tabulate(
                    [_layer_row(layer, cell) for layer in model.layers],
                    headers=_TABLE_HEADERS,
                    tablefmt=table_format,
                    disable_numparse=True,
                    colalign=_TABLE_ALIGN,
                )
            )
            lines.append("")
        lines.extend(_totals_lines(model))
        lines.extend(f"warning: {printable(warning)}" for warning in model.warnings)
        blocks.append("\n".join(lines))
    if report.errors and report.models:  # a batch: list the bad paths beside the good ones
        blocks.append(
            "\n".join(
                [f"{len(report.errors)} path(s) could not be inspected:"]
                + [
                    f"  {display_path(failure.path)}: {printable(failure.message)}"
                    for failure in report.errors
                ]
            )
        )
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def render_table(report: Report) -> str:
    """The default human-readable report."""
    return _render_text(report, "simple", "")


def render_markdown(report: Report) -> str:
    """A markdown report: one heading and one pipe table per model."""
    return _render_text(report, "github", "## ")


_CSV_HEADERS = (
    "path", "location", "format", "layer", "op", "in_channels", "out_channels", "groups", "kernel_shape",
    "output_spatial", "weight_shape", "weight_params", "bias_kind", "bias_shape", "bias_params", "bias_source",
    "followed_by", "formula",
)  # fmt: skip


def render_csv(report: Report) -> str:
    """One CSV row per conv layer over all models; shapes as ``32x28x28``, unknown values empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_HEADERS)
    for model in report.models:
        for layer in model.layers:
            writer.writerow(
                [
                    _csv_text(model.path),
                    _csv_text(model.location or ""),
                    _csv_text(model.format),
                    _csv_text(layer.name),
                    _csv_text(layer.op),
                    _csv_value(layer.in_channels),
                    _csv_value(layer.out_channels),
                    _csv_value(layer.groups),
                    _dims_or_blank(layer.kernel_shape),
                    _dims_or_blank(layer.output_spatial),
                    _dims_or_blank(layer.weight_shape),
                    _csv_value(layer.weight_params),
                    str(layer.bias.kind),
                    _dims_or_blank(layer.bias.shape),
                    _csv_value(layer.bias.params if layer.bias.terms else 0),
                    "" if layer.bias.source is None else str(layer.bias.source),
                    _csv_text(layer.followed_by or ""),
                    _csv_text(layer.formula),
                ]
            )
    return buffer.getvalue()


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(text: str) -> str:
    """A CSV text cell: printable, and never read as a formula by a spreadsheet (OWASP's rule:
    a cell starting with ``= + - @`` gets a leading ``'``)."""
    shown = printable(text)
    return "'" + shown if shown.startswith(_FORMULA_STARTS) else shown


def _csv_value(value: int | None) -> str:
    return "" if value is None else str(value)


def check_renderable(model: ModelReport) -> None:
    """Render one model's rows in every format without keeping them: the dry run that puts
    rendering inside the per-file guard (:func:`biasinspect.api.inspect` calls it per model), so a
    value that cannot be rendered is that file's failure, not a traceback ending the batch."""
    json.dumps(model_to_json(model))
    model_heading(model)
    _totals_lines(model)
    for layer in model.layers:
        _layer_row(layer, _markdown_cell)
    render_csv(Report(models=(model,)))


def render(report: Report, fmt: str) -> str:
    """Render in one of :data:`FORMATS`."""
    if fmt == "html":
        from biasinspect.render_html import render_html

        return render_html(report)
    renderers = {"table": render_table, "markdown": render_markdown, "csv": render_csv, "json": render_json}
    return renderers[fmt](report)


def render_calc(result: CalcResult, fmt: str) -> str:
    """The ``calc`` answer: tied and untied counts side by side."""
    if fmt == "json":
        return (
            json.dumps(
                {
                    "tool": "biasinspect",
                    "version": __version__,
                    "input": [result.in_channels, *result.input_spatial],
                    "filters": [result.out_channels, *result.kernel],
                    "groups": result.groups,
                    "output": [result.out_channels, *result.output_spatial],
                    "weight_params": result.weight_params,
                    "tied": {
                        "bias_params": result.tied_bias_params,
                        "total": result.tied_total,
                        "formula": result.tied_formula,
                    },
                    "untied": {
                        "bias_params": result.untied_bias_params,
                        "total": result.untied_total,
                        "formula": result.untied_formula,
                    },
                    "absent": {
                        "bias_params": 0,
                        "total": result.weight_params,
                        "formula": result.absent_formula,
                    },
                },
                indent=2,
            )
            + "\n"
        )
    rows: Sequence[Sequence[str]] = [
        ["tied (one bias per output channel)", format_count(result.tied_bias_params),
         format_count(result.tied_total), result.tied_formula],
        ["untied (one bias per channel and location)", format_count(result.untied_bias_params),
         format_count(result.untied_total), result.untied_formula],
        ["absent (no bias)", "0", format_count(result.weight_params), result.absent_formula],
    ]  # fmt: skip
    table_format = "github" if fmt == "markdown" else "simple"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["bias", "bias_params", "total_params", "formula"])
        writer.writerows(rows)
        return buffer.getvalue()
    heading = (
        f"input {format_dims((result.in_channels, *result.input_spatial))}, "
        f"{result.out_channels} filters of {format_dims((result.in_channels // result.groups, *result.kernel))}"
        + (f" in {result.groups} groups" if result.groups > 1 else "")
        + f" -> output {format_dims((result.out_channels, *result.output_spatial))}"
    )
    from tabulate import tabulate

    table = tabulate(
        rows,
        headers=("bias", "bias params", "total params", "formula"),
        tablefmt=table_format,
        disable_numparse=True,
        colalign=("left", "right", "right", "left"),
    )
    return f"{heading}\n\n{table}\n"
