"""Side-by-side comparison: the first report is the baseline, every other row is measured against it.

Ratios are written so that bigger is better for the compressed model: `size_x` is how many times
smaller, `decode_x`/`prefill_x` how many times faster. Perplexity change is in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .evaluate import EvaluationReport


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str  # format spec for numbers


COLUMNS: tuple[Column, ...] = (
    Column("name", "model", ""),
    Column("dtype", "dtype", ""),
    Column("params_m", "params (M)", ".2f"),
    Column("sparsity_pct", "zeros %", ".1f"),
    Column("disk_mb", "disk (MB)", ".2f"),
    Column("bits_per_weight", "bits/weight", ".2f"),
    Column("size_x", "size x", ".2f"),
    Column("perplexity", "perplexity", ".3f"),
    Column("ppl_delta_pct", "ppl Δ %", "+.2f"),
    Column("kl_mean", "KL", ".4f"),
    Column("top1_agreement_pct", "top-1 %", ".1f"),
    Column("bleu", "BLEU", ".1f"),
    Column("prefill_ms", "prefill ms", ".1f"),
    Column("prefill_x", "prefill x", ".2f"),
    Column("decode_ms_per_token", "decode ms/tok", ".2f"),
    Column("decode_x", "decode x", ".2f"),
    Column("peak_mem_mb", "peak mem (MB)", ".0f"),
)


def _get(metrics: dict[str, Any], *path: str) -> Any:
    node: Any = metrics
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _first_batch(metrics: dict[str, Any]) -> dict[str, Any] | None:
    batches = _get(metrics, "speed", "batches")
    return batches[0] if batches else None


def summarize(report: EvaluationReport) -> dict[str, Any]:
    """The headline numbers of one report, flat."""
    m = report.metrics
    batch = _first_batch(m)
    disk = _get(m, "size", "disk_bytes")
    params = _get(m, "size", "num_params")
    sparsity = _get(m, "size", "sparsity")
    top1 = _get(m, "agreement", "top1_agreement")
    peak = _get(m, "memory", "peak_bytes")
    return {
        "name": report.name,
        "dtype": m.get("dtype"),
        "params_m": params / 1e6 if params is not None else None,
        "sparsity_pct": sparsity * 100 if sparsity is not None else None,
        "disk_mb": disk / 1e6 if disk is not None else None,
        "bits_per_weight": _get(m, "size", "bits_per_weight"),
        "perplexity": _get(m, "perplexity", "perplexity"),
        "tokens_scored": _get(m, "perplexity", "tokens_scored"),
        "kl_mean": _get(m, "agreement", "kl_mean"),
        "top1_agreement_pct": top1 * 100 if top1 is not None else None,
        "bleu": _get(m, "bleu", "bleu"),
        "prefill_ms": _get(batch, "prefill", "median_ms") if batch else None,
        "decode_ms_per_token": _get(batch, "decode_per_token", "median_ms") if batch else None,
        "speed_batch_size": batch.get("batch_size") if batch else None,
        "peak_mem_mb": peak / 1e6 if peak is not None else None,
    }


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return float(numerator) / float(denominator)


def comparison_rows(reports: list[EvaluationReport]) -> list[dict[str, Any]]:
    """One flat row per report, with deltas and ratios against the first (the baseline)."""
    rows = [summarize(r) for r in reports]
    if not rows:
        return rows
    base = rows[0]
    for row in rows:
        row["size_x"] = _ratio(base["disk_mb"], row["disk_mb"])
        ppl_ratio = _ratio(row["perplexity"], base["perplexity"])
        row["ppl_delta_pct"] = (ppl_ratio - 1) * 100 if ppl_ratio is not None else None
        row["prefill_x"] = _ratio(base["prefill_ms"], row["prefill_ms"])
        row["decode_x"] = _ratio(base["decode_ms_per_token"], row["decode_ms_per_token"])
    return rows


def format_value(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and fmt:
        return format(value, fmt)
    return str(value)


def visible_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """Columns that have at least one value (a run without BLEU shows no BLEU column)."""
    return [c for c in COLUMNS if any(row.get(c.key) is not None for row in rows)]
