"""The damped inverse Hessian of a linear layer, as GPTQ and SparseGPT both solve with it.

Both walk a layer's input columns and spread each column's error over the columns not yet
processed through ``U``, the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``
with ``H = 2/n X^T X`` (`calibration.accumulate_hessian`): GPTQ (`quantization/gptq.py`) to round,
SparseGPT (`pruning/sparsegpt.py`) to prune. Kept here, below both, so that neither method
package imports the other. Cost: two Cholesky factorisations and one inverse, O(in^3), on an
``(in, in)`` float32 matrix (float64 on the fallback).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from swiss_knife.errors import SwissKnifeError

logger = logging.getLogger(__name__)


def inverse_cholesky_upper(H: Tensor, damp: float, *, label: str) -> tuple[Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1``, in float32.

    Tries float32 first; if a factorisation fails (``H`` numerically singular) retries in float64,
    then in float64 with 10x and 100x the damping. Returns ``(U, damp actually used)``; `label`
    names the method in the warning and the error.
    """
    mean_diag = float(torch.diagonal(H).double().mean())
    base = damp if damp > 0 else 1e-6
    attempts = [
        (torch.float32, damp),
        (torch.float64, damp),
        (torch.float64, base * 10),
        (torch.float64, base * 100),
    ]
    for dtype, used in attempts:
        Hd = H.to(dtype).clone()  # (in, in)
        Hd.diagonal().add_(used * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) != 0:
            continue
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) != 0 or not bool(torch.isfinite(U).all()):
            continue
        if used != damp or dtype != torch.float32:
            logger.warning(
                "%s: Hessian not positive definite in float32 with damp=%g; used %s with damp=%g",
                label,
                damp,
                dtype,
                used,
            )
        return U.float(), used
    raise SwissKnifeError(
        f"{label}: the Hessian is not positive definite even with 100x damping; the calibration "
        "inputs of this layer are degenerate (too few tokens, or NaN/inf activations)"
    )


__all__ = ["inverse_cholesky_upper"]
