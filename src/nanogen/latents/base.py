"""The stage-1 interface every latent space follows (spec ``reference.md`` §6.1).

    tok.encode(images)   images (B, 3, H, W) float in [0, 1]  ->  normalised latents (B, *tok.latent_shape)
    tok.decode(latents)  latents                             ->  images (B, 3, R, R) in [0, 1] nominal range
    tok.latent_shape     (C, h, w) at the configured resolution
    tok.latent_dim       C  (the reference also calls it ``hidden_size``)
    tok.patch_size       the downsample factor R / h

Images are resized to the tokenizer's resolution inside ``encode`` (bilinear for pixels and VAEs, bicubic for
RAEs, as in the reference). VAE decodes are clamped to [0, 1]; pixel and RAE decodes are not (the reference
clamps at evaluation), so callers that need valid pixels clamp.

nanogen's data loaders and samplers carry images in [-1, 1]; the stage-2 loop converts at this boundary
(``to_unit`` / ``from_unit``), so every tokenizer keeps the reference's arithmetic exactly.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from nanogen.errors import ConfigError

# bilinear / bicubic resizes overshoot [0, 1] a little; anything beyond this is a range mistake
RANGE_SLACK = 0.05


class Tokenizer(Protocol):
    latent_dim: int
    patch_size: int

    @property
    def latent_shape(self) -> tuple[int, int, int]: ...

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


def to_unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]."""
    return (images + 1) / 2


def from_unit(images: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2 - 1


def check_images(images: Tensor, who: str) -> None:
    """One-line ``ConfigError`` unless ``images`` is a float (B, 3, H, W) batch in [0, 1].

    Costs one host sync (the min / max); hot loops validate their data once up front and pass ``check=False``."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(f"{who}: expected images of shape (B, 3, H, W) in [0, 1], got {shape}")
    if not images.is_floating_point():
        hint = "; divide uint8 images by 255" if images.dtype == torch.uint8 else ""
        raise ConfigError(f"{who}: expected float images in [0, 1], got dtype {images.dtype}{hint}")
    if not images.numel():
        return
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if lo != lo or hi != hi:
        raise ConfigError(f"{who}: images contain NaN")
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        if hi > 2.0 and lo >= -0.5:
            hint = " (looks like [0, 255]: divide by 255)"
        elif lo < -0.5 and hi <= 1 + RANGE_SLACK:
            hint = " (looks like [-1, 1]: use (x + 1) / 2)"
        else:
            hint = ""
        raise ConfigError(f"{who}: images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
