"""Helpers shared by the text-to-image metric wrappers: optional packages, pretrained models and images,
each failure one line saying what to install or fetch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import torch
from PIL import Image
from torch import Tensor

from nanogen.errors import UserError

T = TypeVar("T")


def require(module: str, what: str, install: str) -> ModuleType:
    """Import an optional package, or one line naming what needs it and the pip install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{what} needs the '{module}' package ({str(e).splitlines()[0]}); "
                        f"install it with: pip install '{install}'") from None


def load_pretrained(load: Callable[..., T], source: str, what: str, *, local: str = "a local directory", **kwargs) -> T:
    """``load(source)`` (a ``from_pretrained``), or one line saying how to get the weights; ``local`` names
    the option that takes a local copy instead."""
    try:
        return load(source, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot load '{source}' ({str(e).splitlines()[0][:160]}); fetch it once with "
                        f"'nanogen prepare --models {source}' (needs network), or pass {local}") from None


def to_pil(image: Tensor) -> Image.Image:
    """A uint8 (3, H, W) image as PIL, the input every VQA / CLIP processor of the references receives."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
