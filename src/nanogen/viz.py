"""Pictures: sample grids and loss curves, written as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from nanogen.eval.images import to_uint8


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (H', W', 3) uint8 grid, ``nrow`` images per row."""
    x = to_uint8(images.detach().cpu())
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    B, C, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = torch.full((3, rows * (H + pad) + pad, nrow * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = x[i, :3]
    return grid.permute(1, 2, 0).numpy()


def save_grid(images: Tensor, path: Path, nrow: int | None = None, scale: int = 1) -> Path:
    img = Image.fromarray(image_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path


def save_captioned_grid(images: Tensor, captions: list[str], path: Path, nrow: int, scale: int = 2) -> Path:
    """One row per caption (``nrow`` samples each), the caption written to the left of its row: a T2I grid a
    person can read without a separate prompt list."""
    grid = Image.fromarray(image_grid(images, nrow))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    rows = max(1, len(captions))
    row_h = grid.height / rows
    try:
        font = ImageFont.load_default(size=14)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        font = ImageFont.load_default()
    d = ImageDraw.Draw(grid)
    text_w = 12 + int(max((d.textlength(c, font=font) for c in captions), default=0))
    img = Image.new("RGB", (text_w + grid.width, grid.height), "white")
    img.paste(grid, (text_w, 0))
    d = ImageDraw.Draw(img)
    for r, caption in enumerate(captions):
        d.text((6, int(r * row_h + row_h / 2)), caption, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path


def save_loss_curve(steps: list[int], losses: list[float], path: Path, width: int = 640, height: int = 320) -> Path:
    """A dependency-free line plot (PIL), log-scaled y, for ``loss.png`` in the run directory."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    m = 40
    if len(steps) >= 2:
        ys = np.log10(np.clip(np.asarray(losses, dtype=np.float64), 1e-12, None))
        lo, hi = float(ys.min()), float(ys.max())
        hi = hi if hi > lo else lo + 1
        x0, x1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1
        pts = [
            (m + (s - x0) / (x1 - x0) * (width - 2 * m), height - m - (y - lo) / (hi - lo) * (height - 2 * m))
            for s, y in zip(steps, ys, strict=True)
        ]
        d.line(pts, fill=(31, 119, 180), width=2)
        d.text((m, 8), f"training loss (log10)  {10**hi:.4g} .. {10**lo:.4g}", fill="black")
        d.text((m, height - m + 8), f"step {x0}", fill="black")
        d.text((width - m - 80, height - m + 8), f"step {steps[-1]}", fill="black")
    d.rectangle([m, m, width - m, height - m], outline="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
