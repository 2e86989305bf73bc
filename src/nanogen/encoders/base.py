"""The encoder interface and the name -> encoder table (spec ``reference.md`` §6.5).

Names follow the reference's ``type-arch-config`` form (``dinov2-vit-b``). Input to every encoder here is an
image batch in [-1, 1] at any size; each encoder applies its own preprocessing (resize, normalisation).
"""

from __future__ import annotations

import os
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


def encoder_width(name: str) -> int | None:
    kind, _, size = _parse(name)
    if kind == "dinov2" and size in DINOV2_HUB:
        return DINOV2_HUB[size][1]
    return None


def default_source(name: str) -> str:
    kind, _, size = _parse(name)
    if kind == "dinov2" and size in DINOV2_HUB:
        return DINOV2_HUB[size][0]
    raise NotAvailableError(
        f"representation encoder '{name}' is not available in this nanogen release yet; available: "
        + ", ".join(f"dinov2-vit-{s}" for s in DINOV2_HUB)
    )


def env_key(name: str) -> str:
    return "NANOGEN_ENCODER_" + name.upper().replace("-", "_").replace(".", "_")


def build_encoder(name: str, source: str | None = None, resolution: int = 256) -> RepresentationEncoder:
    """A frozen encoder by name. ``source``: a local directory or a hub id (default: the env var
    ``NANOGEN_ENCODER_<NAME>``, else the public hub id). Offline and not cached: one clear error."""
    default = default_source(name)  # also validates the name
    source = source or os.environ.get(env_key(name)) or default
    kind, _, _ = _parse(name)
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise NotAvailableError(
            f"cannot load representation encoder '{name}' from '{source}' ({str(e).splitlines()[0][:160]}); "
            f"fetch it once with 'nanogen prepare --models {name}' (needs network), or point {env_key(name)} "
            f"(or misc.weights.{name}) at a local copy of {default}"
        ) from None
    if kind == "dinov2":
        return DINOv2(model, name, resolution)
    raise AssertionError(kind)  # default_source rejected every other kind
