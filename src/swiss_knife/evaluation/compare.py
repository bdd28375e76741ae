"""Side-by-side comparison: the first report is the baseline, every other row is measured against it.

Ratios are written so that bigger is better for the compressed model: `size_x` is how many times
smaller, `decode_x`/`prefill_x` how many times faster. Perplexity change is in percent.

Timings are shown as ``median [min–max]`` over the repeats. A speed ratio is only as good as the
timings behind it: when the baseline's and the model's [min, max] ranges overlap, some run of the
slower one was as fast as some run of the faster one, so the ratio is shown as ``within noise``
(``<name>_within_noise`` in the rows) instead of a number that reads like a result. With fewer
than two repeats on either side there is no range to judge by, and the ratio says so.

Ranges only catch noise that varies within one model's runs. Models are timed one after the
other, so a change of load between them (another job starting) shifts one model's whole range;
when the system load average exceeded ``BUSY_LOAD`` times the CPU count around either model's
timings, a ratio beyond the noise is still marked ``(busy)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .evaluate import EvaluationReport
from .memory import model_peak_bytes

#: What a ratio whose two timing ranges overlap is shown as.
WITHIN_NOISE = "within noise"
#: Load average per CPU above which timings are marked as taken on a busy machine. The timed
#: work itself keeps about one runnable thread per CPU, so only load beyond that is others'.
BUSY_LOAD = 1.25


def machine_busy(speed: Mapping[str, Any] | None) -> bool:
    """Whether the load average around a speed measurement was above ``BUSY_LOAD`` per CPU."""
    if not speed:
        return False
    cpus = speed.get("cpu_count")
    if not cpus:
        return False
    loads = [speed.get("load_avg_before"), speed.get("load_avg_after")]
    return any(load[0] > BUSY_LOAD * cpus for load in loads if load)


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str  # format spec for numbers
    #: For a timing: the row keys of its minimum and maximum, shown as "median [min–max]".
    spread: tuple[str, str] | None = None
    #: For a ratio of timings: the row key saying whether it is within noise (True), beyond it
    #: (False) or cannot be judged (None, fewer than two repeats on one side).
    noise: str | None = None
    #: A value that hides the column when every row has it (or none): the runtime column shows
    #: only when some model ran outside transformers.
    hidden_if_all: str | None = None


COLUMNS: tuple[Column, ...] = (
    Column("name", "model", ""),
    Column("dtype", "dtype", ""),
    Column("runtime", "runtime", "", hidden_if_all="transformers"),
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
    Column("prefill_ms", "prefill ms", ".1f", spread=("prefill_ms_min", "prefill_ms_max")),
    Column("prefill_x", "prefill x", ".2f", noise="prefill_x_within_noise"),
    Column(
        "decode_ms_per_token",
        "decode ms/tok",
        ".2f",
        spread=("decode_ms_per_token_min", "decode_ms_per_token_max"),
    ),
    Column("decode_x", "decode x", ".2f", noise="decode_x_within_noise"),
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


def _timing(batch: Mapping[str, Any] | None, key: str) -> Mapping[str, Any] | None:
    timing = batch.get(key) if batch else None
    return timing if isinstance(timing, Mapping) else None


def _spread_known(timing: Mapping[str, Any]) -> bool:
    """Whether a timing has a [min, max] range from at least two repeats."""
    low, high = timing.get("min_ms"), timing.get("max_ms")
    return (
        int(timing.get("repeats") or 0) >= 2
        and isinstance(low, (int, float))
        and isinstance(high, (int, float))
        and low == low  # not NaN
        and high == high
    )


def within_noise(base: Mapping[str, Any] | None, other: Mapping[str, Any] | None) -> bool | None:
    """Whether two timings' [min, max] ranges overlap: True, False, or None if unknowable.

    ``base`` and ``other`` are timing dicts (``median_ms``, ``min_ms``, ``max_ms``, ``repeats``).
    None when either is missing or has fewer than two repeats (no range to compare).
    """
    if base is None or other is None or not (_spread_known(base) and _spread_known(other)):
        return None
    return bool(base["min_ms"] <= other["max_ms"] and other["min_ms"] <= base["max_ms"])


def timing_ratio(
    base: Mapping[str, Any] | None, other: Mapping[str, Any] | None
) -> tuple[float | None, bool | None]:
    """``base median / other median`` (above 1: `other` is faster) and :func:`within_noise`."""
    if base is None or other is None:
        return None, None
    return _ratio(base.get("median_ms"), other.get("median_ms")), within_noise(base, other)


def summarize(report: EvaluationReport) -> dict[str, Any]:
    """The headline numbers of one report, flat."""
    m = report.metrics
    batch = _first_batch(m)
    disk = _get(m, "size", "disk_bytes")
    params = _get(m, "size", "num_params")
    sparsity = _get(m, "size", "sparsity")
    top1 = _get(m, "agreement", "top1_agreement")
    memory = m.get("memory")
    peak = model_peak_bytes(memory) if isinstance(memory, dict) else None
    prefill = _timing(batch, "prefill")
    decode = _timing(batch, "decode_per_token")
    return {
        "name": report.name,
        "dtype": m.get("dtype"),
        "runtime": m.get("runtime"),
        "params_m": params / 1e6 if params is not None else None,
        "sparsity_pct": sparsity * 100 if sparsity is not None else None,
        "disk_mb": disk / 1e6 if disk is not None else None,
        "bits_per_weight": _get(m, "size", "bits_per_weight"),
        "perplexity": _get(m, "perplexity", "perplexity"),
        "tokens_scored": _get(m, "perplexity", "tokens_scored"),
        "kl_mean": _get(m, "agreement", "kl_mean"),
        "top1_agreement_pct": top1 * 100 if top1 is not None else None,
        "bleu": _get(m, "bleu", "bleu"),
        "prefill_ms": prefill.get("median_ms") if prefill else None,
        "prefill_ms_min": prefill.get("min_ms") if prefill else None,
        "prefill_ms_max": prefill.get("max_ms") if prefill else None,
        "decode_ms_per_token": decode.get("median_ms") if decode else None,
        "decode_ms_per_token_min": decode.get("min_ms") if decode else None,
        "decode_ms_per_token_max": decode.get("max_ms") if decode else None,
        "speed_repeats": (prefill or {}).get("repeats"),
        "speed_busy": machine_busy(m.get("speed")) if batch else None,
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
    base_batch = _first_batch(reports[0].metrics)
    for index, (row, report) in enumerate(zip(rows, reports, strict=True)):
        row["baseline"] = index == 0
        row["size_x"] = _ratio(base["disk_mb"], row["disk_mb"])
        ppl_ratio = _ratio(row["perplexity"], base["perplexity"])
        row["ppl_delta_pct"] = (ppl_ratio - 1) * 100 if ppl_ratio is not None else None
        batch = _first_batch(report.metrics)
        for key, timing in (("prefill_x", "prefill"), ("decode_x", "decode_per_token")):
            ratio, noise = timing_ratio(_timing(base_batch, timing), _timing(batch, timing))
            row[key] = ratio
            # The baseline against itself is 1 by definition, not a measurement to judge.
            row[f"{key}_within_noise"] = None if index == 0 else noise
        row["speed_ratio_busy"] = bool(base.get("speed_busy") or row.get("speed_busy"))
    return rows


def format_value(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and fmt:
        return format(value, fmt)
    return str(value)


def format_cell(row: Mapping[str, Any], column: Column) -> str:
    """One table cell: a timing with its range, a ratio judged against the noise, or a value."""
    value = row.get(column.key)
    text = format_value(value, column.fmt)
    if value is None:
        return text
    if column.spread is not None:
        low, high = (row.get(k) for k in column.spread)
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low == low:
            text += f" [{format_value(low, column.fmt)}–{format_value(high, column.fmt)}]"
    if column.noise is not None and not row.get("baseline"):
        verdict = row.get(column.noise)
        if verdict is True:
            return WITHIN_NOISE
        if verdict is None:
            return f"{text} (spread unknown)"
        if row.get("speed_ratio_busy"):
            return f"{text} (busy)"
    return text


def visible_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """Columns that have at least one value (a run without BLEU shows no BLEU column)."""

    def shown(column: Column) -> bool:
        values = [row.get(column.key) for row in rows]
        if column.hidden_if_all is not None and all(
            v in (None, column.hidden_if_all) for v in values
        ):
            return False
        return any(v is not None for v in values)

    return [c for c in COLUMNS if shown(c)]
