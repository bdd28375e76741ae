"""How far a compressed weight is from the original: the numbers every method reports.

Shared by quantization and pruning (and so kept out of both packages): the signal-to-noise ratio
of a weight in dB, computed from the weights themselves (`weight_sqnr_db`) or from a relative
error ``||W - W'|| / ||W||`` already measured (`sqnr_db`), and the table of the layers a method
hurt most (`sensitivity_table`). Pure functions on tensors and report rows; O(numel) each.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor


def weight_sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||W||^2 / ||W - Q(W)||^2)``, in dB.

    Computed in float64; ``inf`` when the two are equal, ``-inf`` for an all-zero reference.
    """
    signal = float(reference.double().square().sum())
    noise = float((reference.double() - approx.double()).square().sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def sqnr_db(rel_error: float | None) -> float | None:
    """The SQNR in dB of a relative error ``||W - W'|| / ||W||``: ``-20 log10(rel_error)``."""
    if rel_error is None:
        return None
    return math.inf if rel_error == 0 else -20.0 * math.log10(rel_error)


def sensitivity_table(rows: list[dict[str, Any]], limit: int = 10) -> list[dict[str, Any]]:
    """The worst layers first: highest relative error (lowest SQNR); rows without one dropped."""
    ranked = [r for r in rows if r.get("rel_error") is not None]
    ranked.sort(key=lambda r: r["rel_error"], reverse=True)
    return ranked[:limit]


__all__ = ["sensitivity_table", "sqnr_db", "weight_sqnr_db"]
