"""Render comparison rows as a terminal table, Markdown, JSON and a self-contained HTML page.

The HTML draws its bar charts as inline SVG, so the report is one file with no dependency and
no network access needed to view it.

Every timing is shown as ``median [min–max]`` over its repeats, a speed ratio whose two ranges
overlap as ``within noise`` (see ``compare``), and every report says how it measured: repeats,
the system load average around the timings, and how memory was attributed to each model.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .compare import (
    BUSY_LOAD,
    COLUMNS,
    WITHIN_NOISE,
    Column,
    comparison_rows,
    format_cell,
    machine_busy,
    visible_columns,
)
from .evaluate import EvaluationReport
from .speed import load_average


def legend(rows: list[dict[str, Any]]) -> str | None:
    """How to read the timing and ratio cells, when the table has any."""
    columns = visible_columns(rows)
    if not any(c.spread or c.noise for c in columns):
        return None
    repeats = sorted({r["speed_repeats"] for r in rows if r.get("speed_repeats") is not None})
    runs = "/".join(str(n) for n in repeats) or "the"
    text = (
        f"Timings: median [min–max] of {runs} timed runs. A speed ratio reads "
        f"'{WITHIN_NOISE}' when the two models' [min, max] ranges overlap: that difference is "
        "not a measured speed-up."
    )
    shown = [c.noise for c in columns if c.noise]
    if any(r.get("speed_ratio_busy") and any(r.get(k) is False for k in shown) for r in rows[1:]):
        text += (
            f" '(busy)': the load average was above {BUSY_LOAD:g} per CPU while one of the two "
            "was timed, so even a ratio beyond the ranges may be the load changing between them."
        )
    return text


def terminal_table(rows: list[dict[str, Any]]) -> str:
    columns = visible_columns(rows)
    cells = [[c.title for c in columns]]
    cells += [[format_cell(row, c) for c in columns] for row in rows]
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
    note = legend(rows)
    if note:
        lines += ["", note]
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = visible_columns(rows)
    out = ["| " + " | ".join(c.title for c in columns) + " |"]
    out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    for row in rows:
        out.append("| " + " | ".join(format_cell(row, c) for c in columns) + " |")
    return "\n".join(out)


def _load_text(load: Any) -> str:
    return "/".join(f"{v:.2f}" for v in load) if load else "unknown"


def _ms_range(timing: dict[str, Any], fmt: str = ".2f") -> str:
    text = format(timing["median_ms"], fmt)
    low, high = timing.get("min_ms"), timing.get("max_ms")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low == low:
        text += f" [{low:{fmt}}–{high:{fmt}}]"
    return text


def _measurement_notes(reports: list[EvaluationReport]) -> list[str]:
    notes = []
    memory_method = None
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
            text = (
                f"{r.name}: speed on {speed['device']} with {speed['threads']} threads, batch "
                f"{b['batch_size']}, prompt {b['prompt_len']}, {b['new_tokens']} new tokens, "
                f"{speed['repeats']} timed runs after {speed['warmup']} warm-up: prefill "
                f"{_ms_range(b['prefill'], '.1f')} ms, decode "
                f"{_ms_range(b['decode_per_token'])} ms/token (median [min–max])"
            )
            if "load_avg_before" in speed:
                cpus = speed.get("cpu_count")
                text += (
                    f"; load average (1/5/15 min) {_load_text(speed['load_avg_before'])} "
                    f"before, {_load_text(speed.get('load_avg_after'))} after"
                    + (f", on {cpus} CPUs" if cpus else "")
                )
                if machine_busy(speed):
                    text += " (a busy machine: expect noisy timings)"
            notes.append(text)
        memory = r.metrics.get("memory")
        if memory and "model_peak_bytes" in memory:
            notes.append(
                f"{r.name}: peak memory {memory['model_peak_bytes'] / 1e6:.0f} MB = weights "
                f"and buffers {(memory['parameter_bytes'] + memory['buffer_bytes']) / 1e6:.0f} "
                f"MB + {memory['increase_bytes'] / 1e6:.0f} MB while running"
            )
            memory_method = memory_method or memory.get("note")
        elif memory:
            memory_method = memory_method or (
                "peak memory = weights and buffers + the increase of "
                f"{memory.get('method', 'memory')} over its value when the evaluation began"
            )
    if memory_method:
        notes.append(memory_method)
    return notes


def markdown_report(
    reports: list[EvaluationReport], title: str, notes: list[str] | None = None
) -> str:
    rows = comparison_rows(reports)
    lines = [f"# {title}", ""]
    if reports and reports[0].eval_data:
        lines += [f"Evaluation text: {reports[0].eval_data}", ""]
    lines += [markdown_table(rows), ""]
    note = legend(rows)
    if note:
        lines += [note, ""]
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
            lines += [
                f"### Throughput of {r.name}",
                "",
                "| batch | prefill ms [min–max] | prefill tok/s | decode ms/tok [min–max] "
                "| decode tok/s |",
            ]
            lines.append("|---:|---:|---:|---:|---:|")
            for b in speed["batches"]:
                lines.append(
                    f"| {b['batch_size']} | {_ms_range(b['prefill'], '.1f')} | "
                    f"{b['prefill_tokens_per_s']:.1f} | {_ms_range(b['decode_per_token'])} | "
                    f"{b['decode_tokens_per_s']:.1f} |"
                )
            lines.append("")
    all_notes = [*(notes or []), *_measurement_notes(reports)]
    if all_notes:
        lines += ["## How this was measured", ""] + [f"- {n}" for n in all_notes] + [""]
    return "\n".join(lines)


def _svg_bars(rows: list[dict[str, Any]], column: Column) -> str:
    kept = [r for r in rows if r.get(column.key) is not None]
    values = [(str(r["name"]), float(r[column.key])) for r in kept]
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
    for i, ((name, value), row) in enumerate(zip(values, kept, strict=True)):
        y = 24 + i * (bar_h + gap)
        w = max(1.0, (width - label_w - 90) * value / top)
        parts.append(
            f'<text x="0" y="{y + 15}" font-size="12">{html.escape(name[:28])}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" '
            f'fill="{"#888" if i == 0 else "#3b7dd8"}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" font-size="12">'
            f"{html.escape(format_cell(row, column))}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def html_report(reports: list[EvaluationReport], title: str, notes: list[str] | None = None) -> str:
    rows = comparison_rows(reports)
    columns = visible_columns(rows)
    head = "".join(f"<th>{html.escape(c.title)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(r, c))}</td>" for c in columns) + "</tr>"
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
<p>The first row is the baseline. Ratios (x) are baseline / model: above 1 is smaller or faster.
{html.escape(legend(rows) or "")}</p>
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
        # The timings' own load averages are in each report's speed metrics.
        "load_avg_at_write": load_average(),
        "cpu_count": os.cpu_count(),
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
