"""Quantize float rows into llama.cpp's K-quant blocks Q4_K, Q5_K and Q6_K (numpy only).

The `gguf` package (llama.cpp's own Python library) can read these three types back
(`gguf.quants.dequantize`) but cannot write them, so this module does. The block layouts are
llama.cpp's (``ggml-common.h``), and the way scales are chosen follows its reference quantizers
(``quantize_row_q{4,5,6}_K_ref`` in ``ggml-quants.c``, no importance matrix), re-expressed as
array operations over every block of a tensor at once:

Q4_K / Q5_K, 256 weights in 8 sub-blocks of 32, 144 / 176 bytes:
    ``d`` and ``dmin`` (fp16), then 12 bytes holding eight 6-bit sub-block scales ``sc`` and eight
    6-bit mins ``m``, then the levels (4 bits, plus for Q5_K one more bit per weight kept in a
    separate 32-byte plane). A weight is ``d * sc * q - dmin * m``, ``q`` in ``[0, 15]`` / ``[0, 31]``.
    Each sub-block first gets its own float scale and min from a weighted least-squares fit
    (weights ``rms(sub-block) + |x|``) tried over a sweep of candidate step sizes; the eight
    scales and mins are then themselves quantized to 6 bits against the largest of each, and
    the levels are recomputed for the scales the file really holds.

Q6_K, 256 weights in 16 sub-blocks of 16, 210 bytes:
    the low 4 bits of every level, then their top 2 bits, then sixteen int8 sub-block scales,
    then ``d`` (fp16). A weight is ``d * sc * (q - 32)``, ``q`` in ``[0, 63]``. Each sub-block gets
    a signed scale by a sweep of 19 candidate step sizes maximising ``(sum w x l)^2 / sum w l^2``
    with ``w = x^2``; the scales are quantized to int8 against the largest (in magnitude).

`k_scales` exposes the scale choice alone (optionally weighted by a per-weight importance, as
llama.cpp's importance matrix weights its fits) and `pack_k_blocks` the packing of chosen scales
and levels, for the methods that quantize on these grids themselves
(`compression.quantization.gguf_grid`: RTN, and GPTQ with its error feedback).

Rounding is to nearest, ties to even (llama.cpp's ``nearest_int``). Cost: about 20 passes over
the tensor for Q4_K/Q5_K and 19 for Q6_K, O(numel) memory; the tests check the bytes decode
through `gguf.quants.dequantize` to exactly the values these functions meant to store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

QK_K = 256  # weights per super-block
_SCALE_BITS_MAX = 63  # 6-bit sub-block scales and mins of Q4_K / Q5_K
_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a sub-block below this is all zeros

F32 = NDArray[np.float32]
F16 = NDArray[np.float16]
U8 = NDArray[np.uint8]
I8 = NDArray[np.int8]
K_KINDS = ("q4_k", "q5_k", "q6_k")


def _blocks(rows: NDArray[np.floating], qk: int) -> F32:
    """``rows`` (any shape, last dim a multiple of ``qk``) as float32 ``(n_blocks, qk)``."""
    data = np.asarray(rows, dtype=np.float32)
    if data.shape[-1] % qk:
        raise ValueError(f"row length {data.shape[-1]} is not a multiple of {qk}")
    return data.reshape(-1, qk)


def _fit_scale_min(
    x: F32, weights: F32, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[F32, F32]:
    """Per sub-block ``(scale, min)`` with ``x ~ scale * q - min``, ``q`` in ``[0, nmax]``.

    ``x``, ``weights``: ``(n, size)``. Start from the plain min/max step, then try the steps
    ``(max - min) / (nmax + rmin + rdelta * k)`` for ``k = 0..nstep``, each with its
    weighted least-squares scale and offset (the offset kept <= 0 so that 0 stays reachable),
    and keep the one with the smallest weighted squared error.
    """
    lo = np.minimum(x.min(axis=1), 0.0)  # (n,)
    hi = x.max(axis=1)  # (n,)
    span = hi - lo
    flat = span <= 0  # every value equal (and <= 0): scale 0, the min carries the value
    safe_span = np.where(flat, 1.0, span).astype(np.float32)[:, None]  # (n, 1)
    lo2 = lo[:, None]

    def levels(inv_step: F32) -> F32:
        clipped: F32 = np.clip(np.rint(inv_step * (x - lo2)), 0, nmax).astype(np.float32)
        return clipped

    inv = np.float32(nmax) / safe_span
    q = levels(inv)
    scale = (1.0 / inv)[:, 0]  # (n,)
    offset = lo.copy()
    best = (weights * (scale[:, None] * q + lo2 - x) ** 2).sum(axis=1)
    sum_w = weights.sum(axis=1)
    sum_x = (weights * x).sum(axis=1)
    for k in range(nstep + 1):
        q = levels(np.float32(rmin + rdelta * k + nmax) / safe_span)
        sum_l = (weights * q).sum(axis=1)
        sum_l2 = (weights * q * q).sum(axis=1)
        sum_xl = (weights * q * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det_safe = np.where(ok, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det_safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det_safe
        positive = this_min > 0  # an offset above 0 would make 0 unreachable: refit without it
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        this_min = np.where(positive, 0.0, this_min)
        err = (weights * (this_scale[:, None] * q + this_min[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        offset = np.where(better, this_min, offset)
    scale = np.where(flat, 0.0, scale)
    return scale.astype(np.float32), (-offset).astype(np.float32)


def _pack_scales_mins(sc: U8, mn: U8) -> U8:
    """Eight 6-bit scales and mins per block, ``(n, 8)`` each, into llama.cpp's 12 bytes.

    Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; scales and mins 4-7
    keep their low 4 bits in bytes 8-11 and their top 2 bits in the top of bytes 0-3 / 4-7.
    """
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return out


def _f16_bytes(values: NDArray[np.floating]) -> U8:
    """fp16 values ``(n,)`` as ``(n, 2)`` little-endian bytes."""
    return np.ascontiguousarray(values.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _qk_scales(
    x: F32, nmax: int, rmin: float, nstep: int, importance: F32 | None = None
) -> tuple[F16, F16, U8, U8]:
    """Q4_K/Q5_K scales of ``(n, 256)`` super-blocks: fp16 ``d`` and ``dmin`` ``(n,)``, and the
    6-bit sub-block scale and min codes ``sc``, ``mn`` ``(n, 8)``. ``importance`` ``(n, 256)``,
    if given, multiplies the fit's per-weight weights."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)  # (n * 8, 32)
    rms = np.sqrt((sub * sub).mean(axis=1, keepdims=True))
    weights = rms + np.abs(sub)
    if importance is not None:
        weights = weights * importance.reshape(n * 8, 32)
    scale, the_min = _fit_scale_min(sub, weights, nmax, rmin, 0.1, nstep)
    scale = scale.reshape(n, 8)
    the_min = the_min.reshape(n, 8)
    max_scale = np.maximum(scale.max(axis=1), 0.0)  # (n,)
    max_min = np.maximum(the_min.max(axis=1), 0.0)
    inv_scale = np.where(max_scale > 0, _SCALE_BITS_MAX / np.where(max_scale > 0, max_scale, 1), 0)
    inv_min = np.where(max_min > 0, _SCALE_BITS_MAX / np.where(max_min > 0, max_min, 1), 0)
    sc = np.clip(np.rint(inv_scale[:, None] * scale), 0, _SCALE_BITS_MAX).astype(np.uint8)
    mn = np.clip(np.rint(inv_min[:, None] * the_min), 0, _SCALE_BITS_MAX).astype(np.uint8)
    d = (max_scale / _SCALE_BITS_MAX).astype(np.float16)
    dmin = (max_min / _SCALE_BITS_MAX).astype(np.float16)
    return d, dmin, sc, mn


def _qk_levels(x: F32, d: F16, dmin: F16, sc: U8, mn: U8, nmax: int) -> tuple[U8, F32]:
    """Levels ``(n, 256)`` for the scales the file will hold (not for the float fit), and the
    values they decode to."""
    n = x.shape[0]
    step = (d.astype(np.float32)[:, None] * sc).reshape(n, 8, 1)  # (n, 8, 1)
    low = (dmin.astype(np.float32)[:, None] * mn).reshape(n, 8, 1)
    safe = np.where(step != 0, step, 1.0)
    q = np.clip(np.rint((x.reshape(n, 8, 32) + low) / safe), 0, nmax)
    q = np.where(step != 0, q, 0).astype(np.uint8)  # (n, 8, 32)
    values = (step * q.astype(np.float32) - low).reshape(n, QK_K)
    return q.reshape(n, QK_K), values


def _nibbles_q4k(q: U8) -> U8:
    """Low 4 bits of ``(n, 256)`` levels: per 64-weight chunk, byte ``l`` holds weight ``l`` of
    its first sub-block (low nibble) and weight ``l`` of its second (high nibble)."""
    chunks = q.reshape(-1, 4, 2, 32) & 0xF
    return (chunks[:, :, 0, :] | (chunks[:, :, 1, :] << 4)).reshape(-1, 128).astype(np.uint8)


def _pack_q4_k(d: F16, dmin: F16, sc: U8, mn: U8, q: U8) -> U8:
    """Q4_K blocks ``(n, 144)`` from fp16 ``d``, ``dmin`` ``(n,)``, 6-bit ``sc``, ``mn``
    ``(n, 8)`` and levels ``q`` ``(n, 256)`` in ``[0, 15]``."""
    header = np.concatenate([_f16_bytes(d), _f16_bytes(dmin)], axis=1)
    return np.concatenate([header, _pack_scales_mins(sc, mn), _nibbles_q4k(q)], axis=1)


def _pack_q5_k(d: F16, dmin: F16, sc: U8, mn: U8, q: U8) -> U8:
    """Q5_K blocks ``(n, 176)``: as `_pack_q4_k`, levels in ``[0, 31]``."""
    header = np.concatenate([_f16_bytes(d), _f16_bytes(dmin)], axis=1)
    # Fifth bits: byte l of the 32-byte plane holds, in bit k, weight l of sub-block k.
    high = (q.reshape(-1, 8, 32) >> 4).astype(np.uint8)  # (n, 8, 32)
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    qh = np.bitwise_or.reduce(high << shifts, axis=1).astype(np.uint8)  # (n, 32)
    return np.concatenate([header, _pack_scales_mins(sc, mn), qh, _nibbles_q4k(q)], axis=1)


def _encode_q4_k(x: F32) -> tuple[U8, F32]:
    d, dmin, sc, mn = _qk_scales(x, 15, -1.0, 20)
    q, values = _qk_levels(x, d, dmin, sc, mn, 15)
    return _pack_q4_k(d, dmin, sc, mn, q), values


def _encode_q5_k(x: F32) -> tuple[U8, F32]:
    d, dmin, sc, mn = _qk_scales(x, 31, -0.5, 15)
    q, values = _qk_levels(x, d, dmin, sc, mn, 31)
    return _pack_q5_k(d, dmin, sc, mn, q), values


def _fit_signed_scale(x: F32, nmax: int, importance: F32 | None = None) -> F32:
    """Per sub-block signed scale with ``x ~ scale * l``, ``l`` in ``[-nmax, nmax - 1]``.

    The step is anchored on the value of largest magnitude (``-nmax / max``, so that value maps
    to the extreme level) and nudged by ``0.1 * i`` levels for ``i = -9..9``; the candidate with
    the largest ``(sum w x l)^2 / sum w l^2`` (``w = x^2``) wins, the first one on ties.
    """
    idx = np.abs(x).argmax(axis=1)
    peak = x[np.arange(x.shape[0]), idx]  # (n,) signed value of largest magnitude
    zero = np.abs(peak) < _EPS
    peak_safe = np.where(zero, 1.0, peak).astype(np.float32)[:, None]
    w = x * x if importance is None else x * x * importance
    nudges = [0, *range(-9, 0), *range(1, 10)]
    best_metric = np.full(x.shape[0], -np.inf, dtype=np.float32)
    best_scale = np.zeros(x.shape[0], dtype=np.float32)
    for i, nudge in enumerate(nudges):
        inv = np.float32(-(nmax + 0.1 * nudge)) / peak_safe
        lv = np.clip(np.rint(inv * x), -nmax, nmax - 1)
        sum_lx = (w * x * lv).sum(axis=1)
        sum_l2 = (w * lv * lv).sum(axis=1)
        has = sum_l2 > 0
        denom = np.where(has, sum_l2, 1.0)
        metric = np.where(has, sum_lx * sum_lx / denom, 0.0 if i == 0 else -np.inf)
        scale = np.where(has, sum_lx / denom, 0.0)
        better = metric > best_metric
        best_metric = np.where(better, metric, best_metric)
        best_scale = np.where(better, scale, best_scale)
    return np.where(zero, 0.0, best_scale).astype(np.float32)


def _q6_scales(x: F32, importance: F32 | None = None) -> tuple[F16, I8]:
    """Q6_K scales of ``(n, 256)`` super-blocks: fp16 ``d`` ``(n,)`` and the int8 sub-block
    scale codes ``sc`` ``(n, 16)``."""
    n = x.shape[0]
    weights = None if importance is None else importance.reshape(n * 16, 16)
    scales = _fit_signed_scale(x.reshape(n * 16, 16), 32, weights).reshape(n, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(n), pick]  # (n,) signed scale of largest magnitude
    empty = np.abs(max_scale) < _EPS
    inv = np.where(empty, 0.0, -128.0 / np.where(empty, 1.0, max_scale))  # (n,)
    d = np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, inv)).astype(np.float16)
    sc = np.minimum(127, np.rint(inv[:, None] * scales)).astype(np.int8)  # (n, 16)
    return d, sc


def _q6_levels(x: F32, d: F16, sc: I8) -> tuple[U8, F32]:
    """Unsigned levels ``(n, 256)`` in ``[0, 63]`` (signed level + 32) for the stored scales,
    and the values they decode to."""
    n = x.shape[0]
    step = (d.astype(np.float32)[:, None] * sc).reshape(n, 16, 1)
    safe = np.where(step != 0, step, 1.0)
    lv = np.where(step != 0, np.clip(np.rint(x.reshape(n, 16, 16) / safe), -32, 31), 0)
    values = (step * lv.astype(np.float32)).reshape(n, QK_K)
    return (lv + 32).astype(np.uint8).reshape(n, QK_K), values


def _pack_q6_k(d: F16, sc: I8, levels: U8) -> U8:
    """Q6_K blocks ``(n, 210)`` from fp16 ``d`` ``(n,)``, int8 ``sc`` ``(n, 16)`` and unsigned
    levels ``(n, 256)`` in ``[0, 63]``."""
    n = levels.shape[0]
    q = levels.reshape(n, 2, 4, 32)
    # Per 128-weight half: ql[l] = q[l] | q[l+64] << 4, ql[l+32] = q[l+32] | q[l+96] << 4,
    # qh[l] = top 2 bits of q[l], q[l+32], q[l+64], q[l+96] at bit offsets 0, 2, 4, 6.
    low = q & 0xF
    ql = np.concatenate(
        [low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2
    ).reshape(n, 128)
    top = q >> 4
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).reshape(
        n, 64
    )
    return np.concatenate(
        [ql.astype(np.uint8), qh.astype(np.uint8), sc.view(np.uint8), _f16_bytes(d)], axis=1
    )


def _encode_q6_k(x: F32) -> tuple[U8, F32]:
    d, sc = _q6_scales(x)
    q, values = _q6_levels(x, d, sc)
    return _pack_q6_k(d, sc, q), values


@dataclass(frozen=True)
class KScales:
    """The scales of ``n`` super-blocks of one K-quant type, as the file stores them.

    ``d`` ``(n,)`` fp16; Q4_K/Q5_K: ``dmin`` ``(n,)`` fp16 and 6-bit codes ``sc``, ``mn``
    ``(n, 8)`` uint8 (a weight is ``d * sc * q - dmin * mn``); Q6_K: ``dmin`` and ``mn`` None,
    ``sc`` ``(n, 16)`` int8 (a weight is ``d * sc * (q - 32)``).
    """

    kind: str
    d: F16
    sc: NDArray[np.integer]
    dmin: F16 | None = None
    mn: U8 | None = None


_QK_SEARCH = {"q4_k": (15, -1.0, 20), "q5_k": (31, -0.5, 15)}


def k_scales(
    rows: NDArray[np.floating], kind: str, importance: NDArray[np.floating] | None = None
) -> KScales:
    """The scales `quantize_k_with_values` chooses for the super-blocks ``rows`` ``(n, 256)``
    (llama.cpp's reference search, see the module docstring).

    ``importance`` (shaped like ``rows``, non-negative), if given, multiplies the per-weight
    weights of the search's least-squares fits, as llama.cpp's importance matrix does.
    """
    x = _blocks(rows, QK_K)
    imp = None if importance is None else _blocks(importance, QK_K)
    if kind == "q6_k":
        d6, sc6 = _q6_scales(x, imp)
        return KScales(kind, d6, sc6)
    try:
        nmax, rmin, nstep = _QK_SEARCH[kind]
    except KeyError:
        raise ValueError(f"unknown K-quant type {kind!r}; expected one of {K_KINDS}") from None
    d, dmin, sc, mn = _qk_scales(x, nmax, rmin, nstep, imp)
    return KScales(kind, d, sc, dmin, mn)


def pack_k_blocks(scales: KScales, levels: NDArray[np.integer]) -> U8:
    """The GGUF bytes ``(n, type size)`` of super-blocks with the given scales and unsigned
    levels ``(n, 256)`` (``[0, 15]`` Q4_K, ``[0, 31]`` Q5_K, ``[0, 63]`` Q6_K)."""
    q = np.ascontiguousarray(levels, dtype=np.uint8).reshape(-1, QK_K)
    if scales.kind == "q6_k":
        return _pack_q6_k(scales.d, scales.sc.astype(np.int8), q)
    assert scales.dmin is not None and scales.mn is not None
    pack = _pack_q4_k if scales.kind == "q4_k" else _pack_q5_k
    return pack(scales.d, scales.dmin, scales.sc.astype(np.uint8), scales.mn, q)


_ENCODERS = {"q4_k": _encode_q4_k, "q5_k": _encode_q5_k, "q6_k": _encode_q6_k}


def quantize_k_with_values(rows: NDArray[np.floating], kind: str) -> tuple[U8, F32]:
    """K-quant blocks of ``rows`` and the float32 values they decode to, both shaped like
    ``rows`` but for the last dim (bytes per row / weights per row).

    ``kind`` is ``"q4_k"``, ``"q5_k"`` or ``"q6_k"``; the last dim must be a multiple of 256.
    The values are computed with the operations llama.cpp's (and gguf's) decoder applies, so
    decoding the bytes gives them back bit for bit.
    """
    try:
        encode = _ENCODERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown K-quant type {kind!r}; expected one of {sorted(_ENCODERS)}"
        ) from None
    lead = np.shape(rows)[:-1]
    blocks, values = encode(_blocks(rows, QK_K))
    return blocks.reshape(*lead, -1), values.reshape(*lead, -1)


def quantize_q4_k(rows: NDArray[np.floating]) -> U8:
    """Q4_K blocks of ``rows`` (last dim a multiple of 256): uint8 ``(*rows.shape[:-1], bytes)``."""
    return quantize_k_with_values(rows, "q4_k")[0]


def quantize_q5_k(rows: NDArray[np.floating]) -> U8:
    """Q5_K blocks of ``rows`` (last dim a multiple of 256): uint8 ``(*rows.shape[:-1], bytes)``."""
    return quantize_k_with_values(rows, "q5_k")[0]


def quantize_q6_k(rows: NDArray[np.floating]) -> U8:
    """Q6_K blocks of ``rows`` (last dim a multiple of 256): uint8 ``(*rows.shape[:-1], bytes)``."""
    return quantize_k_with_values(rows, "q6_k")[0]


__all__ = [
    "K_KINDS",
    "QK_K",
    "KScales",
    "k_scales",
    "pack_k_blocks",
    "quantize_k_with_values",
    "quantize_q4_k",
    "quantize_q5_k",
    "quantize_q6_k",
]
