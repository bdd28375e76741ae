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

from swiss_knife.device import factorisation_threads
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
        with factorisation_threads(H.shape[0], H.device):
            U, ok = _factorise(H, dtype, used * mean_diag)
        if not ok:
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


def _factorise(H: Tensor, dtype: torch.dtype, shift: float) -> tuple[Tensor, bool]:
    """Upper Cholesky factor of ``(H + shift * I)^-1`` in `dtype`, and whether it worked. Each
    intermediate ``(in, in)`` matrix is freed as soon as the next exists, so at most two are
    alive besides `H` (3.3 GB each for a 28,672-wide down projection)."""
    Hd = H.to(dtype, copy=True)  # (in, in)
    Hd.diagonal().add_(shift)
    L, info = torch.linalg.cholesky_ex(Hd)
    del Hd
    if int(info) != 0:
        return L, False
    inverse = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    return U, int(info) == 0 and bool(torch.isfinite(U).all())


__all__ = ["inverse_cholesky_upper"]
