"""fp16 / bf16: the simplest compression, half the bytes of fp32 and no calibration.

bf16 keeps fp32's exponent range (overflow-safe) with 8 bits of mantissa; fp16 keeps 11 bits of
mantissa but overflows above 65504, which some models' activations reach. Saved as an ordinary
dense checkpoint in that dtype.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ...config import QuantizeBase
from ...models import cast_model
from ..checkpoint import dense_writer
from .base import QuantizationOutcome, QuantizeContext, register_method


class HalfPrecisionConfig(QuantizeBase):
    """fp16 / bf16: cast every floating-point weight (targets do not apply)."""

    method: Literal["fp16", "bf16"]


def _apply(
    model: nn.Module, config: HalfPrecisionConfig, ctx: QuantizeContext
) -> QuantizationOutcome:
    before = str(next(model.parameters()).dtype).replace("torch.", "")
    model = cast_model(model, config.method)
    return QuantizationOutcome(
        model=model,
        writer=dense_writer(model),
        format="dense",
        steps=[f"cast weights from {before} to {config.method}"],
    )


register_method("fp16", HalfPrecisionConfig, needs_calibration=False)(_apply)
register_method("bf16", HalfPrecisionConfig, needs_calibration=False)(_apply)
