"""Rendering of a :class:`~biasinspect.diff.DiffReport`: table (default), markdown and JSON.

The JSON is a public contract like the inspect report's: keys are only ever added.
"""

from __future__ import annotations

import json
from typing import Any

from biasinspect import __version__
from biasinspect.diff import DiffReport, LayerDiff
from biasinspect.model import ConvLayer
from biasinspect.render import layer_to_json, printable

DIFF_FORMATS = ("table", "markdown", "json", "html")

_HEADERS = ("source layer", "export layer", "matched by", "source bias", "export bias", "changes")


def _bias_cell(layer: ConvLayer | None) -> str:
    if layer is None:
        return ""
    kind = str(layer.bias.kind)
    if layer.bias.shape is not None and kind != "absent":
        kind += " [" + ", ".join("?" if d is None else str(d) for d in layer.bias.shape) + "]"
    if kind == "absent" and layer.followed_by:
        kind += f" ({layer.followed_by} follows)"
    return kind


def _row(row: LayerDiff, markdown: bool = False) -> list[str]:
    """One table row; names from the files are escaped (and ``|`` too in markdown)."""
    cells = [
        row.source.name if row.source else "",
        row.export.name if row.export else "",
        str(row.matched_by) if row.matched_by else "",
        _bias_cell(row.source),
        _bias_cell(row.export),
        "; ".join(change.description for change in row.changes) or "unchanged",
    ]
    cells = [printable(cell) for cell in cells]
    return [cell.replace("|", "\\|") for cell in cells] if markdown else cells


def summary_sentence(report: DiffReport) -> str:
    """The summary in words, e.g. ``16 matched, 3 changed (3 folded norms), 0 only in source, ...``."""
    s = report.summary
    return (
        f"{s.matched} matched, {s.changed} changed ({s.folded_norms} folded norm{'s' if s.folded_norms != 1 else ''}), "
        f"{s.only_source} only in source, {s.only_export} only in export"
    )


def _text(report: DiffReport, table_format: str, heading: str) -> str:
    from tabulate import tabulate

    rows = [_row(row, markdown=table_format == "github") for row in report.layers]
    lines = [
        f"{heading}{printable(report.source.path)} ({report.source.format}) -> "
        f"{printable(report.export.path)} ({report.export.format})",
        "",
        tabulate(rows, headers=_HEADERS, tablefmt=table_format, disable_numparse=True)
        if rows
        else "(no conv layers)",
        "",
        summary_sentence(report),
    ]
    lines.extend(f"note: {printable(note)}" for note in report.notes)
    return "\n".join(lines) + "\n"


def diff_to_json(report: DiffReport) -> dict[str, Any]:
    """The diff as the JSON contract spells it."""

    def bias(layer: ConvLayer | None) -> dict[str, Any] | None:
        return None if layer is None else layer_to_json(layer)["bias"]

    return {
        "tool": "biasinspect",
        "version": __version__,
        "source": report.source.path,
        "export": report.export.path,
        "layers": [
            {
                "source_name": row.source.name if row.source else None,
                "export_name": row.export.name if row.export else None,
                "matched_by": str(row.matched_by) if row.matched_by else None,
                "changes": [str(change.kind) for change in row.changes],
                "details": [change.description for change in row.changes],
                "folded_norm": any(change.folded_norm for change in row.changes),
                "source_bias": bias(row.source),
                "export_bias": bias(row.export),
                "source_followed_by": row.source.followed_by if row.source else None,
            }
            for row in report.layers
        ],
        "summary": {
            "matched": report.summary.matched,
            "changed": report.summary.changed,
            "folded_norms": report.summary.folded_norms,
            "only_source": report.summary.only_source,
            "only_export": report.summary.only_export,
        },
        "notes": list(report.notes),
    }


def diff_html(report: DiffReport) -> str:
    """The diff as a self-contained HTML page: the summary and one table row per layer pair,
    changed rows highlighted."""
    from html import escape

    from biasinspect.render_html import page

    rows = []
    for row in report.layers:
        cells = "".join(f"<td>{escape(text)}</td>" for text in _row(row))
        rows.append(f'<tr class="{"changed" if row.changes else "same"}">{cells}</tr>')
    head = "".join(f"<th>{escape(h)}</th>" for h in _HEADERS)
    notes = "".join(f'<p class="warn">note: {escape(note)}</p>' for note in report.notes)
    body = (
        f"<h1>biasinspect diff</h1><h2>{escape(report.source.path)} ({escape(report.source.format)}) -&gt; "
        f"{escape(report.export.path)} ({escape(report.export.format)})</h2>"
        f'<p class="totals">{escape(summary_sentence(report))}</p>{notes}'
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return page("biasinspect diff", body)


def render_diff(report: DiffReport, fmt: str) -> str:
    """Render a diff as ``table``, ``markdown``, ``json`` or ``html``."""
    if fmt == "html":
        return diff_html(report)
    if fmt == "json":
        return json.dumps(diff_to_json(report), indent=2) + "\n"
    if fmt == "markdown":
        return _text(report, "github", "### ")
    return _text(report, "simple", "")


__all__ = ["DIFF_FORMATS", "diff_to_json", "render_diff", "summary_sentence"]
