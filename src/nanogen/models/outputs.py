"""What the stage-2 networks return when asked for more than the image output."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class DiTOutput(NamedTuple):
    """``forward`` returns this instead of a bare tensor when the model has a REG token or REPA is requested."""

    x: Tensor  # (B, C, H, W): velocity or clean-x prediction, as the objective decides
    cls: Tensor | None  # (B, z_dim): the REG token's output, or None
    repa: (
        Tensor | None
    )  # (B, s0 + N, z_dim): projected encoder tokens (REG token + patches) for REPA, or None
