"""DiffAug for the stage-1 discriminator (reference §6.7, StyleGAN-T style).

Images are ``(B, C, H, W)`` tensors (any range; the discriminator feeds [-1, 1]). Every op is differentiable
w.r.t. the input (only arithmetic and gather-style indexing are used).

Ops, applied in this fixed order (the order §6.7 lists them), each with exact formulas:

* **translation** -- per sample an integer offset ``dy ∈ [-sy, sy]``, ``dx ∈ [-sx, sx]`` with
  ``sy = int(H * 0.125 + 0.5)``, ``sx = int(W * 0.125 + 0.5)`` (uniform integers, inclusive)::

      out[b, c, i, j] = x[b, c, i + dy_b, j + dx_b]   if 0 <= i + dy_b < H and 0 <= j + dx_b < W
                      = 0                              otherwise

  i.e. the content moves by ``(-dy, -dx)`` pixels and the uncovered band is zero-filled. Implemented as a 1-px
  zero border (``F.pad(x, (1, 1, 1, 1))``) and an index gather whose source index ``i + dy + 1`` is clamped to
  ``[0, H + 1]``, so every out-of-range read lands on the zero border.
* **brightness** -- ``out = x + (u_b - 0.5)`` with ``u_b ~ U[0, 1)`` per sample (an additive shift in [-0.5, 0.5)).
* **saturation** -- ``m = mean_c x`` (per pixel, over channels); ``out = (x - m) * (2 u_b) + m`` (factor U[0, 2)).
* **contrast** -- ``m = mean_{c,h,w} x`` (per image); ``out = (x - m) * (u_b + 0.5) + m`` (factor U[0.5, 1.5)).
* **cutout** (only when ``cutout > 0``) -- square side ``s = int(H * cutout + 0.5)`` (rows) / ``int(W * cutout + 0.5)``
  (cols); per sample centre ``cy ∈ [0, H + (1 - s % 2))`` and ``cx`` likewise (uniform integers, exclusive upper);
  pixels with ``cy - s // 2 <= i < cy - s // 2 + s`` (and the same for columns) are multiplied by 0.

Randomness: for each op in the order above, ONE coin ``c ~ U[0, 1)`` is drawn for the whole batch and the op runs
iff ``c < prob`` (so prob 1 always runs, prob 0 never does). Only when the op runs are its per-sample parameters
drawn, in this order: translation ``dy`` (B,), then ``dx`` (B,) via ``torch.randint``; brightness / saturation /
contrast ``u`` (B,) via ``torch.rand``; cutout ``cy`` (B,), then ``cx`` (B,) via ``torch.randint``. All draws use the
optional ``torch.Generator`` on the generator's device (the input's device when none is given), then move to the
input's device. ``prob == 0`` (or ``prob <= 0``) returns the input unchanged without drawing anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DiffAug", "brightness", "contrast", "cutout", "saturation", "translate", "translation_shift"]

TRANSLATION_RATIO = 0.125


def translation_shift(size: int, ratio: float = TRANSLATION_RATIO) -> int:
    """Maximum absolute integer offset for a side of ``size`` pixels: ``int(size * ratio + 0.5)``."""
    return int(size * ratio + 0.5)


def translate(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """``out[b, :, i, j] = x[b, :, i + dy[b], j + dx[b]]`` when in bounds, else 0 (see module doc)."""
    b, _, h, w = x.shape
    dy = dy.to(device=x.device, dtype=torch.long).view(b, 1, 1)
    dx = dx.to(device=x.device, dtype=torch.long).view(b, 1, 1)
    gi = torch.arange(h, device=x.device).view(1, h, 1)
    gj = torch.arange(w, device=x.device).view(1, 1, w)
    src_i = (gi + dy + 1).clamp(0, h + 1).expand(b, h, w)  # index into the 1-px zero-bordered image
    src_j = (gj + dx + 1).clamp(0, w + 1).expand(b, h, w)
    bi = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, h, w)
    x_pad = F.pad(x, (1, 1, 1, 1))  # (B, C, H+2, W+2), zero border
    out = x_pad.permute(0, 2, 3, 1)[bi, src_i, src_j]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def brightness(x: Tensor, u: Tensor) -> Tensor:
    """``x + (u - 0.5)`` per sample; ``u`` in [0, 1) of shape (B,)."""
    return x + (u.to(x).view(-1, 1, 1, 1) - 0.5)


def saturation(x: Tensor, u: Tensor) -> Tensor:
    """``(x - m) * 2u + m`` with ``m`` the per-pixel channel mean; ``u`` in [0, 1) of shape (B,)."""
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * (u.to(x).view(-1, 1, 1, 1) * 2.0) + m


def contrast(x: Tensor, u: Tensor) -> Tensor:
    """``(x - m) * (u + 0.5) + m`` with ``m`` the per-image mean over (C, H, W); ``u`` in [0, 1) of shape (B,)."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (u.to(x).view(-1, 1, 1, 1) + 0.5) + m


def cutout(x: Tensor, cy: Tensor, cx: Tensor, size_h: int, size_w: int) -> Tensor:
    """Zero the square ``[cy - size_h//2, cy - size_h//2 + size_h) × [cx - size_w//2, ...)`` (clipped) per sample."""
    b, _, h, w = x.shape
    top = (cy.to(device=x.device, dtype=torch.long) - size_h // 2).view(b, 1, 1)
    left = (cx.to(device=x.device, dtype=torch.long) - size_w // 2).view(b, 1, 1)
    gi = torch.arange(h, device=x.device).view(1, h, 1)
    gj = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (gi >= top) & (gi < top + size_h) & (gj >= left) & (gj < left + size_w)  # (B, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


class DiffAug(nn.Module):
    """Differentiable augmentation (translation, brightness, saturation, contrast, optional cutout).

    ``prob``: per-op probability (one coin per op per batch). ``cutout``: cutout side as a fraction of the image
    side (0 disables it, the §2.2 default). ``forward(x, generator=None)``; the parameters actually drawn by the
    last call are kept in ``self.last_params`` (op name -> tensor(s)) for logging and tests.
    """

    OPS = ("translation", "brightness", "saturation", "contrast", "cutout")

    def __init__(self, prob: float = 1.0, cutout: float = 0.0, translation_ratio: float = TRANSLATION_RATIO):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"DiffAug prob must be in [0, 1], got {prob}")
        if not 0.0 <= cutout < 1.0:
            raise ValueError(f"DiffAug cutout must be in [0, 1), got {cutout}")
        self.prob = float(prob)
        self.cutout = float(cutout)
        self.translation_ratio = float(translation_ratio)
        self.last_params: dict[str, object] = {}

    @classmethod
    def from_config(cls, cfg) -> DiffAug:
        """Build from a ``GanAugmentConfig`` (``prob``, ``cutout``)."""
        return cls(prob=cfg.prob, cutout=cfg.cutout)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, cutout={self.cutout}"

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"DiffAug expects (B, C, H, W), got shape {tuple(x.shape)}")
        self.last_params = {}
        if self.prob <= 0.0:
            return x
        b, _, h, w = x.shape
        dev = generator.device if generator is not None else x.device

        def coin() -> bool:
            return bool(torch.rand((), generator=generator, device=dev).item() < self.prob)

        def uniform() -> Tensor:
            return torch.rand(b, generator=generator, device=dev).to(x.device)

        if coin():
            sy = translation_shift(h, self.translation_ratio)
            sx = translation_shift(w, self.translation_ratio)
            dy = torch.randint(-sy, sy + 1, (b,), generator=generator, device=dev).to(x.device)
            dx = torch.randint(-sx, sx + 1, (b,), generator=generator, device=dev).to(x.device)
            x = translate(x, dy, dx)
            self.last_params["translation"] = (dy, dx)
        if coin():
            u = uniform()
            x = brightness(x, u)
            self.last_params["brightness"] = u
        if coin():
            u = uniform()
            x = saturation(x, u)
            self.last_params["saturation"] = u
        if coin():
            u = uniform()
            x = contrast(x, u)
            self.last_params["contrast"] = u
        if self.cutout > 0.0 and coin():
            ch, cw = int(h * self.cutout + 0.5), int(w * self.cutout + 0.5)
            cy = torch.randint(0, h + (1 - ch % 2), (b,), generator=generator, device=dev).to(x.device)
            cx = torch.randint(0, w + (1 - cw % 2), (b,), generator=generator, device=dev).to(x.device)
            x = cutout(x, cy, cx, ch, cw)
            self.last_params["cutout"] = (cy, cx, ch, cw)
        return x
