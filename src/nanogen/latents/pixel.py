"""Pixel space as a tokenizer (spec ``reference.md`` §6.6, last line; §3.5).

encode = bilinear resize to the resolution, then ``2x - 1``; decode = ``(z + 1) / 2`` with no clamp (evaluation
clamps). Used by the JiT / PixelGen / PixNerd configs and by the built-in nano tier.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.latents.base import check_images


class PixelSpace(nn.Module):
    """encode: images in [0, 1] -> latents in [-1, 1]; decode: latents -> images in [0, 1] (not clamped)."""

    def __init__(self, cfg: None = None, image_size: int = 256, channels: int = 3):
        super().__init__()
        self.image_size = self.resolution = image_size
        self.channels = self.latent_dim = channels
        self.patch_size = 1

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def encode(self, images: Tensor, *, check: bool = True) -> Tensor:
        if check:
            check_images(images, "pixel encode")
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return (latents + 1) / 2
