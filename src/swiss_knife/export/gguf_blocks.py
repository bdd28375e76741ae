"""GGUF tensor encodings: the type names we accept, and turning weights into GGUF bytes.

Two ways in:

- `encode_float` re-quantizes float weights: `gguf.quants.quantize` (llama.cpp's own reference
  code, ported to numpy by the llama.cpp project) for F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, and
  `kquants` for Q4_K/Q5_K/Q6_K, which `gguf` can only read.
- `encode_levels` writes integer levels that a calibrated method already chose (GPTQ, AWQ, RTN,
  HQQ checkpoints) into the 32-weight block types, without rounding anything again. Our grids
  store ``w = (q - z) * s`` with signed levels ``q`` (int4: ``[-8, 7]``); llama.cpp's blocks store
  unsigned levels ``u`` with an fp16 step ``d`` (and, for the ``_1`` types, an fp16 offset ``m``):

  ============  ===========================  ==================  ============================
  GGUF type     llama.cpp decodes            our grid            stored
  ============  ===========================  ==================  ============================
  Q4_0          ``d * (u - 8)``              4 bit, symmetric    ``u = q + 8``, ``d = s``
  Q4_1          ``d * u + m``                4 bit, asymmetric   ``u = q + 8``, ``d = s``,
                                                                 ``m = -s * (z + 8)``
  Q5_0          ``d * (u - 16)``             5 bit, symmetric    ``u = q + 16``, ``d = s``
  Q5_1          ``d * u + m``                5 bit, asymmetric   ``u = q + 16``, ``d = s``,
                                                                 ``m = -s * (z + 16)``
  Q8_0          ``d * u`` (``u`` int8)       8 bit, symmetric    ``u = q``, ``d = s``
  ============  ===========================  ==================  ============================

  all with one scale per 32 consecutive weights of a row. The only change is the fp16 rounding
  of ``d`` and ``m``.

Block layouts (llama.cpp ``ggml-common.h``), 32 weights each: Q4_0 = fp16 ``d`` + 16 bytes whose
low nibble holds weight ``j`` and high nibble weight ``j + 16``; Q4_1 = ``d``, ``m``, then the
same 16 bytes; Q5_0 / Q5_1 = ``d`` (, ``m``), a little-endian 32-bit word whose bit ``j`` is the
fifth bit of weight ``j``, then the 16 nibble bytes; Q8_0 = ``d`` + 32 int8.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants
from numpy.typing import NDArray

from swiss_knife.export.kquants import quantize_k_with_values

GGUFType = Literal[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"
]
ExportType = Literal[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "auto"
]
GGUF_TYPES: tuple[str, ...] = get_args(GGUFType)
EXPORT_TYPES: tuple[str, ...] = get_args(ExportType)

QTYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q5_1": GGMLQuantizationType.Q5_1,
    "q4_k": GGMLQuantizationType.Q4_K,
    "q5_k": GGMLQuantizationType.Q5_K,
    "q6_k": GGMLQuantizationType.Q6_K,
}
FLOAT_TYPES = ("f32", "f16", "bf16")
K_TYPES = ("q4_k", "q5_k", "q6_k")

# The grid a 32-weight block type holds exactly: (bits, symmetric) -> type, offset added to q.
GRID_TYPES: dict[tuple[int, bool], tuple[GGUFType, int]] = {
    (4, True): ("q4_0", 8),
    (4, False): ("q4_1", 8),
    (5, True): ("q5_0", 16),
    (5, False): ("q5_1", 16),
    (8, True): ("q8_0", 0),
}
GRID_GROUP = 32

U8 = NDArray[np.uint8]


def block_size(kind: str) -> int:
    """Weights per block of a type (1 for the float types)."""
    return int(GGML_QUANT_SIZES[QTYPES[kind]][0])


def encoded_nbytes(kind: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of logical (torch-order) ``shape`` takes when stored as ``kind``."""
    block, type_size = GGML_QUANT_SIZES[QTYPES[kind]]
    numel = int(np.prod(shape)) if shape else 1
    return numel // block * type_size


def encode_float(data: NDArray[np.floating], kind: str) -> NDArray[np.generic]:
    """``data`` (float, last dim a multiple of the block size) in GGUF type ``kind``.

    Float types come back as float32/float16 arrays, BF16 and the quantized types as uint8 rows
    of blocks, exactly what `gguf.GGUFWriter` stores for them.
    """
    values = np.ascontiguousarray(data, dtype=np.float32)
    if kind == "f32":
        return values
    if kind == "f16":
        return values.astype(np.float16)
    if kind in K_TYPES:
        return quantize_k_with_values(values, kind)[0]
    return np.asarray(gguf_quants.quantize(values, QTYPES[kind]))


def _f16(values: NDArray[np.floating], what: str) -> NDArray[np.float16]:
    half = values.astype(np.float16)
    if not np.isfinite(half).all():
        raise OverflowError(f"a block {what} does not fit in fp16")
    return half


def _nibbles(u: NDArray[np.integer]) -> U8:
    """``(n, 32)`` levels in ``[0, 16)`` (low 4 bits used) as ``(n, 16)`` bytes."""
    low = (u & 0xF).astype(np.uint8)
    packed: U8 = (low[:, :16] | (low[:, 16:] << 4)).astype(np.uint8)
    return packed


def _fifth_bits(u: NDArray[np.integer]) -> U8:
    """Bit 4 of ``(n, 32)`` levels as one little-endian 32-bit word per block, ``(n, 4)`` bytes."""
    bits = ((u >> 4) & 1).astype(np.uint8)
    return np.packbits(bits, axis=1, bitorder="little")


def encode_levels(
    levels: NDArray[np.integer],
    scale: NDArray[np.floating],
    zero: NDArray[np.integer] | None,
    kind: str,
) -> U8:
    """Write a grid's integer levels into llama.cpp blocks without re-rounding.

    Args:
        levels: ``(rows, cols)`` signed levels ``q`` of our grid (``cols`` a multiple of 32).
        scale: ``(rows, cols // 32)`` float scales ``s``.
        zero: ``(rows, cols // 32)`` signed zero-point levels ``z`` (asymmetric grids), or None.
        kind: the block type from `GRID_TYPES` that holds this grid.

    Returns:
        uint8 ``(rows, bytes per row)``. Raises `OverflowError` if a scale (or offset) does not
        fit in fp16, `ValueError` for shapes or levels the type cannot hold.
    """
    rows, cols = levels.shape
    if cols % GRID_GROUP or scale.shape != (rows, cols // GRID_GROUP):
        raise ValueError(f"{kind}: levels {levels.shape} and scales {scale.shape} do not match")
    entry = next((key for key, value in GRID_TYPES.items() if value[0] == kind), None)
    if entry is None:
        raise ValueError(f"{kind} is not a block type an integer grid maps to")
    bits, symmetric = entry
    offset = GRID_TYPES[entry][1]
    if symmetric != (zero is None):
        raise ValueError(f"{kind} needs {'no' if symmetric else 'a'} zero point")
    q = levels.astype(np.int32).reshape(-1, GRID_GROUP)  # (blocks, 32)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"{kind}: levels outside [{lo}, {hi}]")
    s = np.asarray(scale, dtype=np.float32).reshape(-1, 1)  # (blocks, 1)
    d = _f16(s, "scale").view(np.uint8).reshape(-1, 2)
    if kind == "q8_0":
        blocks = np.concatenate([d, q.astype(np.int8).view(np.uint8)], axis=1)
        return blocks.reshape(rows, -1)
    u = q + offset  # unsigned levels, (blocks, 32)
    parts: list[U8] = [d]
    if zero is not None:
        z = np.asarray(zero, dtype=np.float32).reshape(-1, 1)
        parts.append(_f16(-s * (z + offset), "offset").view(np.uint8).reshape(-1, 2))
    if bits == 5:
        parts.append(_fifth_bits(u))
    parts.append(_nibbles(u))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def decode(data: NDArray[np.generic], kind: str) -> NDArray[np.float32]:
    """Float32 values of GGUF bytes/arrays of type ``kind`` (through `gguf.quants`)."""
    if kind in ("f32", "f16"):
        return np.asarray(data, dtype=np.float32)
    return np.asarray(gguf_quants.dequantize(np.asarray(data), QTYPES[kind]), dtype=np.float32)


__all__ = [
    "EXPORT_TYPES",
    "FLOAT_TYPES",
    "GGUF_TYPES",
    "GRID_GROUP",
    "GRID_TYPES",
    "K_TYPES",
    "QTYPES",
    "ExportType",
    "GGUFType",
    "block_size",
    "decode",
    "encode_float",
    "encode_levels",
    "encoded_nbytes",
]
