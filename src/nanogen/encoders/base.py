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

# dinov3-vit-{s16,...,7b16}: the reference loads torch.hub `facebookresearch/dinov3` with local weight files
# `dinov3_vit{X}_pretrain_lvd1689m-<sha8>.pth`; the same weights are published (gated) in the Hugging Face
# `transformers` layout (DINOv3ViTModel) under these ids.
DINOV3_HUB = {
    "s16": ("facebook/dinov3-vits16-pretrain-lvd1689m", 384),
    "s16plus": ("facebook/dinov3-vits16plus-pretrain-lvd1689m", 384),
    "b16": ("facebook/dinov3-vitb16-pretrain-lvd1689m", 768),
    "l16": ("facebook/dinov3-vitl16-pretrain-lvd1689m", 1024),
    "h16plus": ("facebook/dinov3-vith16plus-pretrain-lvd1689m", 1280),
    "7b16": ("facebook/dinov3-vit7b16-pretrain-lvd1689m", 4096),
}

# Perception Encoder, {pe,spatialpe,langpe}-vit-<size>[norm]: the reference loads the original checkpoints
# (facebook/PE-Core-L14-336/PE-Core-L14-336.pt, ...); timm ships the same architectures (Eva, ``vit_pe_*``) and
# the converted weights under these ids. The timm architecture is the hub id's name without its ``.fb`` tag.
PE_HUB = {
    "t": ("timm/vit_pe_core_tiny_patch16_384.fb", 192),  # PE-Core-T16-384
    "s": ("timm/vit_pe_core_small_patch16_384.fb", 384),  # PE-Core-S16-384
    "b": ("timm/vit_pe_core_base_patch16_224.fb", 768),  # PE-Core-B16-224
    "l": ("timm/vit_pe_core_large_patch14_336.fb", 1024),  # PE-Core-L14-336
    "g": ("timm/vit_pe_core_gigantic_patch14_448.fb", 1536),  # PE-Core-G14-448
}
SPATIALPE_HUB = {
    "b": ("timm/vit_pe_spatial_base_patch16_512.fb", 768),  # PE-Spatial-B16-512
    "l": ("timm/vit_pe_spatial_large_patch14_448.fb", 1024),  # PE-Spatial-L14-448
    "g": ("timm/vit_pe_spatial_gigantic_patch14_448.fb", 1536),  # PE-Spatial-G14-448
}
LANGPE_HUB = {
    "l": ("timm/vit_pe_lang_large_patch14_448.fb", 1024),  # PE-Lang-L14-448
    "g": ("timm/vit_pe_lang_gigantic_patch14_448.fb", 1536),  # PE-Lang-G14-448
}
PE_KINDS = {"pe": PE_HUB, "spatialpe": SPATIALPE_HUB, "langpe": LANGPE_HUB}

# convnextv2-<arch>-<cfg> -> facebook/convnextv2-<cfg>-22k-224 (ImageNet-22k pre-trained, 224 px; the four sizes
# published at 224 with 22k pre-training). The arch part is free (like the other families'); the listed form
# is convnextv2-cnn-<cfg>, e.g. convnextv2-cnn-base. Width = the last stage's channels.
CONVNEXTV2_HUB = {
    "nano": ("facebook/convnextv2-nano-22k-224", 640),
    "tiny": ("facebook/convnextv2-tiny-22k-224", 768),
    "base": ("facebook/convnextv2-base-22k-224", 1024),
    "large": ("facebook/convnextv2-large-22k-224", 1536),
}

# Encoders nanogen trains itself (``nanogen train-encoder``, encoders/nano.py): no hub id; the default source is
# the export directory that command writes (relative to the working directory, like nano-vae's export).
NANO_LOCAL = {
    "s": ("results/nano-encoder", 48),  # nano-vit-s: 32 px, patch 4 -> 8x8 tokens of width 48
}

# Named in §6.5 but not built here: the reference runs them on code from their upstream repositories (torch.hub
# facebookresearch/EUPE; the image_encoder.py that google/tipsv2-* ship as remote code), which no installed
# package provides. (timm 1.0.31 has ports, vit_*_patch16_dinov3_qkvb.eupe_lvd1689m and
# vit_*_patch14_reg1_tipsv2.webli, not yet checked against that code.) Their widths are known, so configs can
# still size REPA/REG heads for them.
UNPACKAGED_WIDTHS = {
    "eupe": {"t16": 192, "s16": 384, "b16": 768},
    "tipsv2": {"b14": 768, "l14": 1024, "so14": 1152, "g14": 1536},
}
UNPACKAGED_WHY = {
    "eupe": "needs the upstream EUPE code (torch.hub facebookresearch/EUPE at a pinned commit), "
    "which is not packaged",
    "tipsv2": "needs the upstream TIPSv2 code (the image_encoder.py remote code of google/tipsv2-*), "
    "which is not packaged",
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
    input_size: int

    def set_input_norm(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """The per-channel normalisation of this encoder's input (buffers: no host copy per call)."""
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor, mode: str, antialias: bool = False) -> Tensor:
        """nanogen images in [-1, 1] -> [0, 1] -> resized to ``input_size`` (if needed) with ``mode`` ->
        ``(x - mean) / std``: the shared first step of every encoder (each names its own resize mode)."""
        x = (images.float() + 1) / 2
        if x.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)
        return (x - self.mean) / self.std

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
        self.set_input_norm(IMAGENET_MEAN, IMAGENET_STD)
        self.freeze()

    def forward(self, images: Tensor) -> EncoderFeatures:
        x = self.preprocess(images, "bicubic")
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
        + [f"dinov3-vit-{s}" for s in DINOV3_HUB]
        + [f"siglip2-vit-{s}" for s in SIGLIP2_HUB]
        + [f"mae-vit-{s}" for s in MAE_HUB]
        + ["webssl-vit-<cfg> (e.g. webssl-vit-dino300m_full2b_224)"]
        + [f"{kind}-vit-{s}" for kind, table in PE_KINDS.items() for s in table]
        + ["(pe/spatialpe/langpe: a 'norm' suffix applies ln_post, e.g. pe-vit-lnorm)"]
        + [f"convnextv2-cnn-{s}" for s in CONVNEXTV2_HUB]
        + [f"nano-vit-{s} (trained by nanogen train-encoder)" for s in NANO_LOCAL]
    )


def _pe_size(kind: str, size: str) -> tuple[str, bool]:
    """Perception Encoder config -> (size, ln_post): the spec's suffix ``norm`` (``pe-vit-lnorm``) applies ln_post."""
    if kind in PE_KINDS and size.endswith("norm") and size[: -len("norm")] in PE_KINDS[kind]:
        return size[: -len("norm")], True
    return size, False


def _hub(kind: str, size: str) -> tuple[str, int] | None:
    """(hub id, width) of a fixed-size encoder, or None."""
    tables = {"dinov2": DINOV2_HUB, "dinov3": DINOV3_HUB, "siglip2": SIGLIP2_HUB, "mae": MAE_HUB,
              "convnextv2": CONVNEXTV2_HUB, "nano": NANO_LOCAL, **PE_KINDS}  # fmt: skip
    return tables.get(kind, {}).get(_pe_size(kind, size)[0])


def encoder_width(name: str) -> int | None:
    kind, _, size = _parse(name)
    hub = _hub(kind, size)
    if hub:
        return hub[1]
    return UNPACKAGED_WIDTHS.get(kind, {}).get(size)  # webssl: the width is in the checkpoint's config only


def default_source(name: str) -> str:
    kind, _, size = _parse(name)
    hub = _hub(kind, size)
    if hub:
        return hub[0]
    if kind == "webssl" and WEBSSL_CFG.fullmatch(size):
        return "facebook/webssl-" + size.replace("_", "-")
    if size in UNPACKAGED_WIDTHS.get(kind, {}):
        why = UNPACKAGED_WHY[kind]
        raise NotAvailableError(f"representation encoder '{name}' cannot be built by nanogen: {why}")
    raise ConfigError(f"unknown representation encoder '{name}'; valid: " + ", ".join(_available()))


def env_key(name: str) -> str:
    return "NANOGEN_ENCODER_" + name.upper().replace("-", "_").replace(".", "_")


def _model_class(kind: str):
    import transformers

    if kind == "siglip2":  # the checkpoints hold the whole SigLIP model; load the vision tower only
        return transformers.SiglipVisionModel, {}
    if kind == "mae":  # the checkpoints are ViTMAEForPreTraining; the encoder without masking
        return transformers.ViTMAEModel, {"mask_ratio": 0.0}
    if kind == "dinov3":
        return transformers.DINOv3ViTModel, {}
    if kind == "convnextv2":  # the checkpoints are ConvNextV2ForImageClassification; the backbone only
        return transformers.ConvNextV2Model, {}
    return transformers.AutoModel, {}  # dinov2 (with registers), webssl (Dinov2Model)


def not_loadable(name: str, source: str, default: str, err: BaseException) -> NotAvailableError:
    """The one-line error for weights that cannot be found or read."""
    return NotAvailableError(
        f"cannot load representation encoder '{name}' from '{source}' ({str(err).splitlines()[0][:160]}); "
        f"its weights are not available locally: fetch it once with 'nanogen prepare --models {name}' "
        f"(needs network), or point {env_key(name)} (or misc.weights.{name}) at a local copy of {default}"
    )


def build_encoder(
    name: str, source: str | None = None, resolution: int = 256, *, strip_affine: bool = False
) -> RepresentationEncoder:
    """A frozen encoder by name. ``source``: a local directory or a hub id (default: the env var
    ``NANOGEN_ENCODER_<NAME>``, else the public hub id; ``nano-vit-s``: the ``nanogen train-encoder`` export
    directory, default ``results/nano-encoder``). Offline and not cached: one clear error.
    Perception Encoder sources may also be a single weight file (timm's or the original ``PE-*.pt``).

    ``strip_affine`` (``siglip2`` only): drop the learned affine of SigLIP's final LayerNorm, the reference's
    intent; the default keeps it, as the reference's code actually does (see ``encoders.hf.SigLIP2``)."""
    default = default_source(name)  # also validates the name
    kind, _, size = _parse(name)
    if strip_affine and kind != "siglip2":
        raise ConfigError(f"strip_affine applies to siglip2 encoders only, not '{name}'")
    source = source or os.environ.get(env_key(name)) or default
    if kind == "nano":  # our own export directory; fixed 32-px input whatever the resolution
        from nanogen.encoders.nano import load_nano_encoder

        return load_nano_encoder(name, source)
    if kind in PE_KINDS:
        from nanogen.encoders.pe import PerceptionEncoder, load_pe

        size, ln_post = _pe_size(kind, size)
        arch = PE_KINDS[kind][size][0].split("/")[1].split(".")[0]
        model = load_pe(name, arch, source, default, resolution)
        return PerceptionEncoder(model, name, resolution, ln_post=ln_post)
    cls, kwargs = _model_class(kind)

    try:
        model = cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise not_loadable(name, source, default, e) from None
    if kind == "dinov2":
        return DINOv2(model, name, resolution)
    if kind == "webssl":
        # Dinov2 without registers: CLS and patches of the model's own output (its affine final LayerNorm)
        return DINOv2(model, name, resolution, affine_norm=True)
    from nanogen.encoders.hf import MAE, ConvNeXtV2, DINOv3, SigLIP2

    if kind == "siglip2":
        return SigLIP2(model, name, resolution, strip_affine=strip_affine)
    if kind == "mae":
        return MAE(model, name, resolution)
    if kind == "dinov3":
        return DINOv3(model, name, resolution)
    if kind == "convnextv2":
        return ConvNeXtV2(model, name, resolution)
    raise AssertionError(kind)  # default_source rejected every other kind
