"""Image transforms for the pixel datasets (spec ``reference.md`` §7.1, §7.2).

* ``adm_center_crop``: the ADM / guided-diffusion crop used to build the ImageNet 256² training set
  (box-filter halvings while the image is at least twice the target, one bicubic resize, then a center
  crop). nanogen applies it to raw ImageNet folders; the reference's Arrow data was cropped this way offline.
* ``resize_center_crop``: torchvision's ``Resize(size, bicubic) + CenterCrop(size)`` on PIL images, the
  reference's transform for Arrow and WebDataset images (a no-op on the pre-cropped 256² ImageNet).

Images travel from the loader workers as uint8 (3, S, S) tensors, a quarter of the bytes of float32; the
training loop converts them to float on the device. Horizontal flips are decided per (seed, epoch, dataset
position) so a resumed run makes the same choices.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# The same seed stream as nanogen.data.latent_shards' flip coins, so training from pixels and from latents
# extracted with --flip flips the same samples in the same epochs.
FLIP_STREAM = 1 << 40


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM center crop to ``size`` x ``size`` (guided-diffusion's ``center_crop_arr``)."""
    img = img.convert("RGB")
    # Halving with a box filter first keeps the final bicubic step from aliasing on large photos.
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the short side to ``size``, then a center crop, exactly as torchvision does it."""
    img = img.convert("RGB")  # always a copy, so the caller never shares the decoded image
    if img.size == (size, size):
        return img
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # torchvision truncates the long side
    new_size = (size, new_long) if w <= h else (new_long, size)
    img = img.resize(new_size, resample=Image.Resampling.BICUBIC)
    # torchvision rounds the offsets with Python's round (half to even).
    left, top = round((img.width - size) / 2), round((img.height - size) / 2)
    return img.crop((left, top, left + size, top + size))


def to_uint8_chw(img: Image.Image) -> Tensor:
    """(3, H, W) uint8 tensor of an RGB image."""
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def maybe_flip(x: Tensor, flip: bool) -> Tensor:
    """``x`` mirrored left-right (last axis) when ``flip``."""
    return x.flip(-1) if flip else x


def flip_mask(seed: int, epoch: int, n: int) -> Tensor:
    """(n,) bool: True = mirror dataset position i in this epoch (probability 1/2 each)."""
    g = torch.Generator().manual_seed(FLIP_STREAM + seed * 1_000_003 + epoch)
    return torch.rand(n, generator=g) < 0.5


class EpochFlips:
    """The flip coin of dataset position i in the current epoch (``flip_mask``), built lazily per epoch (and per
    worker process); every map-style dataset with ``dataset.flip`` uses it, so pixel and latent-shard training
    mirror the same samples and a resumed run repeats them."""

    def __init__(self, enabled: bool, seed: int, n: int):
        self.enabled, self.seed, self.n = enabled, seed, n
        self.epoch = 0
        self._mask: tuple[int, Tensor] | None = None

    def __call__(self, i: int) -> bool:
        if not self.enabled:
            return False
        if self._mask is None or self._mask[0] != self.epoch:
            self._mask = (self.epoch, flip_mask(self.seed, self.epoch, self.n))
        return bool(self._mask[1][i])
