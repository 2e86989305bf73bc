"""The identity tokenizer: the generator works on pixels in [-1, 1] (spec ``reference.md`` §3.5, §6).

Used by the JiT / PixelGen / PixNerd configs and by the built-in nano tier.
"""

from __future__ import annotations

from torch import Tensor, nn


class PixelSpace(nn.Module):
    """encode: images in [-1, 1] -> latents (the same tensor); decode: latents -> images in [-1, 1]."""

    def __init__(self, cfg: None = None, image_size: int = 256, channels: int = 3):
        super().__init__()
        self.image_size = image_size
        self.channels = channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents.clamp(-1, 1)
