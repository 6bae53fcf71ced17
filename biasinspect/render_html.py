"""A self-contained HTML report: per model, the totals sentence, a chart and the layer table.

Nothing is fetched: no scripts, no fonts, no CDN.  The chart is inline SVG drawn here, one row
per conv layer with two bars on a log scale: the layer's weights (grey) and its biases, coloured
by bias kind (tied, untied, absent, other).  An absent bias is drawn as a short marker at the
axis, so a bias-free layer is visible rather than missing.  Rows are 14 px high and each carries
its layer's name (and a tooltip with the counts), which keeps 200+ layers readable.  Every string
from a file is escaped.
"""

from __future__ import annotations

import math
from html import escape

from biasinspect.analysis import format_count, totals_sentence
from biasinspect.model import BiasKind, ConvLayer, ModelReport, Report

KIND_COLOURS = {
    BiasKind.TIED: "#1f77b4",
    BiasKind.UNTIED: "#d62728",
    BiasKind.ABSENT: "#8c564b",
    BiasKind.OTHER: "#ff7f0e",
}
"""Bias kind -> bar colour (colour-blind-safe pairs from the Tableau 10 palette)."""

WEIGHT_COLOUR = "#b3aca4"
"""A warm grey: never produced by anti-aliasing black text on white (pure greys)."""

_ROW = 14
_LABEL_WIDTH = 220
_PLOT_WIDTH = 560
_TOP = 34

_STYLE = """
.biasinspect { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #222; }
.biasinspect h1 { font-size: 20px; } .biasinspect h2 { font-size: 16px; margin-top: 32px; word-break: break-all; }
.biasinspect table { border-collapse: collapse; font-size: 12px; margin-top: 12px; }
.biasinspect th, .biasinspect td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; white-space: nowrap; }
.biasinspect td.num { text-align: right; font-variant-numeric: tabular-nums; }
.biasinspect .chart { border: 1px solid #eee; display: inline-block; }
/* Darker than the bar colours, for contrast on white. */
.biasinspect .kind-tied { color: #17609a; } .biasinspect .kind-untied { color: #a51d1e; } .biasinspect .kind-absent { color: #6b4237; }
.biasinspect .kind-other { color: #b35806; } .biasinspect .changed { background: #fff3e0; }
.biasinspect .totals { font-weight: 600; } .biasinspect .warn { color: #8a6d3b; font-size: 12px; } .biasinspect .errors { color: #b00020; }
"""
"""Every rule is scoped to ``.biasinspect`` so that the fragment shown in a notebook leaves the
notebook's own styles alone."""


def _log_x(value: int, decades: int) -> float:
    return _PLOT_WIDTH * math.log10(max(value, 1)) / decades


def chart_svg(layers: tuple[ConvLayer, ...]) -> str:
    """The per-layer chart of one model as an inline SVG element."""
    largest = max(
        [layer.weight_params or 1 for layer in layers] + [layer.bias.params or 1 for layer in layers] + [10]
    )
    decades = max(1, math.ceil(math.log10(largest)))
    height = _TOP + _ROW * len(layers) + 8
    width = _LABEL_WIDTH + _PLOT_WIDTH + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="weights and biases per layer, log scale" data-layers="{len(layers)}">',
        '<g font-size="10" fill="#555">',
    ]
    for decade in range(decades + 1):
        x = _LABEL_WIDTH + _PLOT_WIDTH * decade / decades
        parts.append(f'<line x1="{x:.1f}" y1="{_TOP - 4}" x2="{x:.1f}" y2="{height - 6}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{_TOP - 8}" text-anchor="middle">1e{decade}</text>')
    legend_x = _LABEL_WIDTH
    for label, colour in [("weights", WEIGHT_COLOUR), *((str(kind), c) for kind, c in KIND_COLOURS.items())]:
        parts.append(f'<rect x="{legend_x}" y="2" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{legend_x + 13}" y="11">{escape(label)}</text>')
        legend_x += 70
    parts.append("</g>")
    for index, layer in enumerate(layers):
        y = _TOP + index * _ROW
        colour = KIND_COLOURS[layer.bias.kind]
        name = layer.name if len(layer.name) <= 34 else "..." + layer.name[-31:]
        parts.append(
            f'<g class="layer" data-kind="{layer.bias.kind}"><title>{escape(layer.name)}: weights '
            f"{format_count(layer.weight_params)}, {layer.bias.kind} bias {format_count(layer.bias.params)}</title>"
        )
        parts.append(
            f'<text x="{_LABEL_WIDTH - 6}" y="{y + 10}" font-size="10" text-anchor="end">{escape(name)}</text>'
        )
        weights = layer.weight_params or 0
        parts.append(
            f'<rect class="weights" x="{_LABEL_WIDTH}" y="{y + 1}" width="{_log_x(weights, decades):.1f}" '
            f'height="5" fill="{WEIGHT_COLOUR}"/>'
        )
        if layer.bias.kind is BiasKind.ABSENT:
            # No bias: a short marker of the absent colour at the axis (a bar of zero length
            # would be invisible).
            parts.append(
                f'<rect class="bias" x="{_LABEL_WIDTH}" y="{y + 7}" width="6" height="5" fill="{colour}"/>'
            )
        else:
            # A bias of one element sits at 1e0; give it a visible minimum width.
            bias_width = max(_log_x(layer.bias.params or 1, decades), 3.0)
            parts.append(
                f'<rect class="bias" x="{_LABEL_WIDTH}" y="{y + 7}" width="{bias_width:.1f}" height="5" '
                f'fill="{colour}"/>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _cell(value: object, numeric: bool = False) -> str:
    text = "" if value is None else str(value)
    return f'<td class="num">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>"


def _dims(shape: tuple[int | None, ...] | None) -> str:
    return "" if shape is None else "x".join("?" if d is None else str(d) for d in shape)


def _layer_table(model: ModelReport) -> str:
    headers = ("layer", "op", "in", "out", "groups", "kernel", "output", "weights", "bias", "bias shape",
               "bias params", "followed by", "formula")  # fmt: skip
    rows = []
    for layer in model.layers:
        rows.append(
            "<tr>"
            + _cell(layer.name)
            + _cell(layer.op)
            + _cell(format_count(layer.in_channels), True)
            + _cell(format_count(layer.out_channels), True)
            + _cell(format_count(layer.groups), True)
            + _cell(_dims(layer.kernel_shape))
            + _cell(_dims(layer.output_spatial))
            + _cell(format_count(layer.weight_params), True)
            + f'<td class="kind-{escape(str(layer.bias.kind))}">{escape(str(layer.bias.kind))}</td>'
            + _cell("" if layer.bias.shape is None else str(list(layer.bias.shape)))
            + _cell(format_count(layer.bias.params), True)
            + _cell(layer.followed_by)
            + _cell(layer.formula)
            + "</tr>"
        )
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _model_section(model: ModelReport) -> str:
    where = f" [{model.location}]" if model.location else ""
    parts = [
        f'<section class="model"><h2>{escape(model.path + where)} ({escape(model.format)})</h2>',
        f'<p class="totals">{escape(totals_sentence(model.totals))}</p>',
        f"<p>conv weights {escape(format_count(model.totals.conv_weight_params))}, conv biases "
        f"{escape(format_count(model.totals.conv_bias_params))}, model parameters "
        f"{escape(format_count(model.totals.model_params))}</p>",
    ]
    parts.extend(f'<p class="warn">warning: {escape(warning)}</p>' for warning in model.warnings)
    if model.layers:
        parts.append(f'<div class="chart">{chart_svg(model.layers)}</div>')
        parts.append(_layer_table(model))
    parts.append("</section>")
    return "".join(parts)


def page(title: str, body: str) -> str:
    """A complete, self-contained HTML document."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        'img-src data:">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f'<body><div class="biasinspect">{body}</div></body></html>\n'
    )


def _report_body(report: Report) -> str:
    body = [_model_section(model) for model in report.models]
    if report.errors:
        items = "".join(
            f"<li>{escape(failure.path)}: {escape(failure.message)}</li>" for failure in report.errors
        )
        body.append(
            f'<section class="errors"><h2>Files that could not be inspected</h2><ul>{items}</ul></section>'
        )
    return "".join(body)


def render_html_fragment(report: Report) -> str:
    """The report as an HTML fragment with its scoped styles (for notebooks)."""
    return f'<div class="biasinspect"><style>{_STYLE}</style>{_report_body(report)}</div>'


def render_html(report: Report) -> str:
    """The inspect report as a self-contained HTML page."""
    return page("biasinspect report", "<h1>biasinspect report</h1>" + _report_body(report))


__all__ = ["KIND_COLOURS", "WEIGHT_COLOUR", "chart_svg", "page", "render_html", "render_html_fragment"]
