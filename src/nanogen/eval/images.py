"""The one place where generated images become uint8 (spec ``evaluation.md`` §0.3, §7.3).

Round to nearest (not truncate): the ADM formula ((x + 1) * 127.5).to(uint8) lands one level low on 63 of
the 256 levels of a perfect image.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_uint8(x: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Float images in ``value_range`` -> uint8 in [0, 255], rounding half to even; clamps out-of-range values."""
    lo, hi = value_range
    scaled = (x.float() - lo) * (255.0 / (hi - lo))
    return scaled.round().clamp(0, 255).to(torch.uint8)
