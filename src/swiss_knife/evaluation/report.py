"""Render comparison rows as a terminal table, Markdown, JSON and a self-contained HTML page.

The HTML draws its bar charts as inline SVG, so the report is one file with no dependency and
no network access needed to view it.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .compare import COLUMNS, Column, comparison_rows, format_value, visible_columns
from .evaluate import EvaluationReport


def terminal_table(rows: list[dict[str, Any]]) -> str:
    columns = visible_columns(rows)
    cells = [[c.title for c in columns]]
    cells += [[format_value(row.get(c.key), c.fmt) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for index, row in enumerate(cells):
        parts = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = visible_columns(rows)
    out = ["| " + " | ".join(c.title for c in columns) + " |"]
    out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    for row in rows:
        out.append("| " + " | ".join(format_value(row.get(c.key), c.fmt) for c in columns) + " |")
    return "\n".join(out)


def _measurement_notes(reports: list[EvaluationReport]) -> list[str]:
    notes = []
    for r in reports:
        ppl = r.metrics.get("perplexity")
        if ppl:
            notes.append(
                f"{r.name}: perplexity over {ppl['tokens_scored']} tokens "
                f"({ppl['num_windows']} windows of {ppl['window']}, stride {ppl['stride']})"
            )
        speed = r.metrics.get("speed")
        if speed and speed.get("batches"):
            b = speed["batches"][0]
            notes.append(
                f"{r.name}: speed on {speed['device']} with {speed['threads']} threads, batch "
                f"{b['batch_size']}, prompt {b['prompt_len']}, {b['new_tokens']} new tokens, "
                f"median of {speed['repeats']} after {speed['warmup']} warm-up"
            )
    return notes


def markdown_report(
    reports: list[EvaluationReport], title: str, notes: list[str] | None = None
) -> str:
    rows = comparison_rows(reports)
    lines = [f"# {title}", ""]
    if reports and reports[0].eval_data:
        lines += [f"Evaluation text: {reports[0].eval_data}", ""]
    lines += [markdown_table(rows), ""]
    lines += (
        [
            f"Baseline: `{rows[0]['name']}`. Ratios (x) are baseline / model: above 1 is "
            "smaller or faster. Perplexity change is relative to the baseline.",
            "",
        ]
        if rows
        else []
    )
    for r in reports:
        speed = r.metrics.get("speed")
        if speed and len(speed.get("batches", [])) > 1:
            lines += [f"### Throughput of {r.name}", "", "| batch | prefill tok/s | decode tok/s |"]
            lines.append("|---:|---:|---:|")
            for b in speed["batches"]:
                lines.append(
                    f"| {b['batch_size']} | {b['prefill_tokens_per_s']:.1f} | "
                    f"{b['decode_tokens_per_s']:.1f} |"
                )
            lines.append("")
    all_notes = [*(notes or []), *_measurement_notes(reports)]
    if all_notes:
        lines += ["## How this was measured", ""] + [f"- {n}" for n in all_notes] + [""]
    return "\n".join(lines)


def _svg_bars(rows: list[dict[str, Any]], column: Column) -> str:
    values = [(str(r["name"]), float(r[column.key])) for r in rows if r.get(column.key) is not None]
    if not values:
        return ""
    width, bar_h, gap, label_w = 640, 22, 8, 180
    height = len(values) * (bar_h + gap) + 30
    top = max(v for _, v in values) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(column.title)}">',
        f'<text x="0" y="14" font-size="13" font-weight="bold">{html.escape(column.title)}</text>',
    ]
    for i, (name, value) in enumerate(values):
        y = 24 + i * (bar_h + gap)
        w = max(1.0, (width - label_w - 90) * value / top)
        parts.append(
            f'<text x="0" y="{y + 15}" font-size="12">{html.escape(name[:28])}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" '
            f'fill="{"#888" if i == 0 else "#3b7dd8"}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" font-size="12">'
            f"{format_value(value, column.fmt)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def html_report(reports: list[EvaluationReport], title: str, notes: list[str] | None = None) -> str:
    rows = comparison_rows(reports)
    columns = visible_columns(rows)
    head = "".join(f"<th>{html.escape(c.title)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(format_value(r.get(c.key), c.fmt))}</td>" for c in columns)
        + "</tr>"
        for r in rows
    )
    charts = [
        _svg_bars(rows, c)
        for c in COLUMNS
        if c.key in ("perplexity", "disk_mb", "decode_ms_per_token", "kl_mean", "peak_mem_mb")
    ]
    all_notes = [*(notes or []), *_measurement_notes(reports)]
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in all_notes)
    data_line = (
        f"<p>Evaluation text: {html.escape(reports[0].eval_data)}</p>"
        if reports and reports[0].eval_data
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
tr:first-child td {{ background: #f3f3f3; }}
.charts svg {{ display: block; margin: 1.5em 0; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{data_line}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p>The first row is the baseline. Ratios (x) are baseline / model: above 1 is smaller or faster.</p>
<div class="charts">{"".join(charts)}</div>
<h2>How this was measured</h2><ul>{notes_html}</ul>
</body></html>
"""


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_reports(
    directory: str | Path,
    reports: list[EvaluationReport],
    *,
    title: str = "Swiss Knife comparison",
    notes: list[str] | None = None,
    stem: str = "report",
) -> dict[str, Path]:
    """Write report.json, report.md and report.html; return their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "title": title,
        "notes": notes or [],
        "rows": comparison_rows(reports),
        "reports": [r.to_dict() for r in reports],
    }
    paths = {
        "json": out / f"{stem}.json",
        "markdown": out / f"{stem}.md",
        "html": out / f"{stem}.html",
    }
    _write_atomic(paths["json"], json.dumps(data, indent=2, default=str) + "\n")
    _write_atomic(paths["markdown"], markdown_report(reports, title, notes))
    _write_atomic(paths["html"], html_report(reports, title, notes))
    return paths
