"""The encoder interface and the name -> encoder table (spec ``reference.md`` §6.5).

Names follow the reference's ``type-arch-config`` form (``dinov2-vit-b``). Input to every encoder here is an
image batch in [-1, 1] at any size; each encoder applies its own preprocessing (resize, normalisation).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.errors import ConfigError, NotAvailableError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# dinov2-vit-{s,b,l,g}: the reference loads torch.hub `dinov2_vit{X}14_reg` (with registers); the same weights
# are published as these Hugging Face repos.
DINOV2_HUB = {
    "s": ("facebook/dinov2-with-registers-small", 384),
    "b": ("facebook/dinov2-with-registers-base", 768),
    "l": ("facebook/dinov2-with-registers-large", 1024),
    "g": ("facebook/dinov2-with-registers-giant", 1536),
}

# siglip2-vit-{b,l,so400m,g}: fixed-resolution SigLIP2 checkpoints (SigLIP architecture, SiglipVisionModel).
SIGLIP2_HUB = {
    "b": ("google/siglip2-base-patch16-256", 768),
    "l": ("google/siglip2-large-patch16-256", 1024),
    "so400m": ("google/siglip2-so400m-patch16-256", 1152),
    "g": ("google/siglip2-giant-opt-patch16-256", 1536),
}

# mae-vit-{b,l,h}: the encoder (``.vit``) of the MAE pre-training checkpoints (ViTMAEModel).
MAE_HUB = {
    "b": ("facebook/vit-mae-base", 768),
    "l": ("facebook/vit-mae-large", 1024),
    "h": ("facebook/vit-mae-huge", 1280),
}

# webssl-<arch>-<cfg> -> facebook/webssl-<cfg with '_' -> '-'>, e.g. webssl-vit-dino300m_full2b_224 ->
# facebook/webssl-dino300m-full2b-224 (names have exactly three dash-separated parts, so the config spells the
# hub id's dashes as underscores). Only the DINO-trained WebSSL models (Dinov2 architecture) are accepted.
WEBSSL_CFG = re.compile(r"dino\d+[mb]_[a-z]+\d+[mb]_\d+")


@dataclass
class EncoderFeatures:
    cls: Tensor | None  # (B, D) normalised CLS token, or None for encoders without one
    patches: Tensor  # (B, T, D) normalised patch tokens (registers dropped)


class RepresentationEncoder(nn.Module):
    name: str
    embed_dim: int

    def freeze(self) -> RepresentationEncoder:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> RepresentationEncoder:  # frozen: always in eval mode
        return super().train(False)


class DINOv2(RepresentationEncoder):
    """DINOv2 with registers, patch 14 (§6.5 ``dinov2``).

    Preprocess: [-1, 1] -> [0, 1], ImageNet mean/std, bicubic resize to 224 * R / 256 (R = the generator's
    resolution, so 256-px images give a 16 x 16 token grid); the position embedding is resampled to that grid.
    Output: the final LayerNorm is applied **without** its affine weights (the reference replaces it by a
    non-affine LN), unless ``affine_norm`` (the reference's ``[norm]`` flag).
    """

    def __init__(self, model: nn.Module, name: str, resolution: int = 256, affine_norm: bool = False):
        super().__init__()
        self.model = model
        self.name = name
        self.embed_dim = model.config.hidden_size
        self.num_registers = getattr(model.config, "num_register_tokens", 0)
        self.input_size = 224 * resolution // 256
        self.affine_norm = affine_norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, images: Tensor) -> EncoderFeatures:
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        out = self.model(pixel_values=x, output_hidden_states=True)
        h = out.hidden_states[-1]  # the last block's output, before the final LayerNorm
        ln = self.model.layernorm
        if self.affine_norm:
            h = ln(h)
        else:
            h = F.layer_norm(h, (h.shape[-1],), eps=ln.eps)
        return EncoderFeatures(cls=h[:, 0], patches=h[:, 1 + self.num_registers :])


def _parse(name: str) -> tuple[str, str, str]:
    parts = name.split("-")
    if len(parts) != 3:
        raise ConfigError(f"encoder name '{name}' must have the form type-arch-config, e.g. dinov2-vit-b")
    return parts[0], parts[1], parts[2]


def _available() -> list[str]:
    return (
        [f"dinov2-vit-{s}" for s in DINOV2_HUB]
        + [f"siglip2-vit-{s}" for s in SIGLIP2_HUB]
        + [f"mae-vit-{s}" for s in MAE_HUB]
        + ["webssl-vit-<cfg> (e.g. webssl-vit-dino300m_full2b_224)"]
    )


def _hub(kind: str, size: str) -> tuple[str, int] | None:
    """(hub id, width) of a fixed-size encoder, or None."""
    table = {"dinov2": DINOV2_HUB, "siglip2": SIGLIP2_HUB, "mae": MAE_HUB}.get(kind, {})
    return table.get(size)


def encoder_width(name: str) -> int | None:
    kind, _, size = _parse(name)
    hub = _hub(kind, size)
    return hub[1] if hub else None  # webssl: the width is in the checkpoint's config only


def default_source(name: str) -> str:
    kind, _, size = _parse(name)
    hub = _hub(kind, size)
    if hub:
        return hub[0]
    if kind == "webssl" and WEBSSL_CFG.fullmatch(size):
        return "facebook/webssl-" + size.replace("_", "-")
    raise NotAvailableError(
        f"representation encoder '{name}' is not available in this nanogen release yet; available: "
        + ", ".join(_available())
    )


def env_key(name: str) -> str:
    return "NANOGEN_ENCODER_" + name.upper().replace("-", "_").replace(".", "_")


def _model_class(kind: str):
    import transformers

    if kind == "siglip2":  # the checkpoints hold the whole SigLIP model; load the vision tower only
        return transformers.SiglipVisionModel, {}
    if kind == "mae":  # the checkpoints are ViTMAEForPreTraining; the encoder without masking
        return transformers.ViTMAEModel, {"mask_ratio": 0.0}
    return transformers.AutoModel, {}  # dinov2 (with registers), webssl (Dinov2Model)


def build_encoder(
    name: str, source: str | None = None, resolution: int = 256, *, strip_affine: bool = False
) -> RepresentationEncoder:
    """A frozen encoder by name. ``source``: a local directory or a hub id (default: the env var
    ``NANOGEN_ENCODER_<NAME>``, else the public hub id). Offline and not cached: one clear error.

    ``strip_affine`` (``siglip2`` only): drop the learned affine of SigLIP's final LayerNorm, the reference's
    intent; the default keeps it, as the reference's code actually does (see ``encoders.hf.SigLIP2``)."""
    default = default_source(name)  # also validates the name
    kind, _, _ = _parse(name)
    if strip_affine and kind != "siglip2":
        raise ConfigError(f"strip_affine applies to siglip2 encoders only, not '{name}'")
    source = source or os.environ.get(env_key(name)) or default
    cls, kwargs = _model_class(kind)

    try:
        model = cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise NotAvailableError(
            f"cannot load representation encoder '{name}' from '{source}' ({str(e).splitlines()[0][:160]}); "
            f"its weights are not available locally: fetch it once with 'nanogen prepare --models {name}' "
            f"(needs network), or point {env_key(name)} (or misc.weights.{name}) at a local copy of {default}"
        ) from None
    if kind == "dinov2":
        return DINOv2(model, name, resolution)
    if kind == "webssl":
        # Dinov2 without registers: CLS and patches of the model's own output (its affine final LayerNorm)
        return DINOv2(model, name, resolution, affine_norm=True)
    from nanogen.encoders.hf import MAE, SigLIP2

    if kind == "siglip2":
        return SigLIP2(model, name, resolution, strip_affine=strip_affine)
    if kind == "mae":
        return MAE(model, name, resolution)
    raise AssertionError(kind)  # default_source rejected every other kind
