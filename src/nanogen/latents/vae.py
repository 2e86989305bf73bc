"""Pretrained diffusers VAEs as frozen stage-1 tokenizers (spec ``reference.md`` §6.1, §6.6, §2.5).

``VAELatents`` follows the stage-1 interface (``latents/base.py``) with the reference's arithmetic: ``encode``
takes images in [0, 1], bilinearly resizes to ``resolution``, maps to [-1, 1], runs the diffusers encoder, takes
the posterior mode (or a sample), and normalises ``z = (z_raw - shift) * scale``. ``decode`` inverts the
normalisation, runs the decoder and returns ``clamp((x + 1) / 2, 0, 1)``.

Shift / scale resolution order (§6.6), each resolved on its own:

- shift: ``config.latents_mean`` (per channel), else the registry scalar, else ``config.shift_factor``, else 0;
- scale: ``1 / config.latents_std`` (per channel), else the registry scalar, else ``config.scaling_factor``, else 1.

Special cases:

- Qwen-Image VAEs (``AutoencoderKLQwenImage``) are video VAEs: a T=1 axis is added before encode / decode and
  dropped after.
- FLUX.2 (``AutoencoderKLFlux2``): the raw 32-channel /8 latent is patchified 2x2 into 128 channels /16 (channel
  ``c * 4 + 2 * dy + dx``) and normalised with the VAE's BatchNorm running statistics,
  ``(z - bn.running_mean) / sqrt(bn.running_var + eps)`` with ``eps = 1e-5`` as in the reference (note: diffusers'
  own FLUX.2 pipeline uses ``config.batch_norm_eps``, 1e-4). No shift/scale is applied on top.

Weights: ``source`` (a local directory or hub id), else ``$NANOGEN_VAE_<TYPE>`` (type upper-cased, ``-`` and ``.``
replaced by ``_``, e.g. ``NANOGEN_VAE_SD3_5``), else the hub id of the table. A local directory may be either the
VAE folder itself or a pipeline snapshot that holds it in the table's subfolder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.errors import ConfigError, NotAvailableError
from nanogen.latents.base import check_images


class VAEType(NamedTuple):
    hub_id: str
    subfolder: str | None
    cls_name: str  # a diffusers class
    channels: int  # latent channels the tokenizer outputs (after any patchify)
    downsample: int  # spatial downsample factor of the tokenizer output
    shift: float | None  # registry scalars; None = resolve from the model config
    scale: float | None


# §6.6. Registry scalars only where the reference pins them (SD: 0.18215, SDXL: 0.13025, shift 0); everything
# else comes from the model's own config (FLUX.1: scale 0.3611 / shift 0.1159, SD3: 1.5305 / 0.0609, Qwen: per channel).
VAE_TYPES: dict[str, VAEType] = {
    "sdvae-ema": VAEType("stabilityai/sd-vae-ft-ema", None, "AutoencoderKL", 4, 8, 0.0, 0.18215),
    "sdvae-mse": VAEType("stabilityai/sd-vae-ft-mse", None, "AutoencoderKL", 4, 8, 0.0, 0.18215),
    "e2e-sdvae-mse": VAEType("REPA-E/e2e-sdvae-hf", None, "AutoencoderKL", 4, 8, None, None),
    "sdxl-vae": VAEType("madebyollin/sdxl-vae-fp16-fix", None, "AutoencoderKL", 4, 8, 0.0, 0.13025),
    "flux": VAEType("black-forest-labs/FLUX.1-dev", "vae", "AutoencoderKL", 16, 8, None, None),
    "e2e-flux": VAEType("REPA-E/e2e-flux-vae", None, "AutoencoderKL", 16, 8, None, None),
    "sd3.5": VAEType("stabilityai/stable-diffusion-3.5-large", "vae", "AutoencoderKL", 16, 8, None, None),
    "e2e-sd3.5": VAEType("REPA-E/e2e-sd3.5-vae", None, "AutoencoderKL", 16, 8, None, None),
    "e2e-vavae": VAEType("REPA-E/e2e-vavae-hf", None, "AutoencoderKL", 32, 16, None, None),
    "qwen-vae": VAEType("Qwen/Qwen-Image", "vae", "AutoencoderKLQwenImage", 16, 8, None, None),
    "e2e-qwen-vae": VAEType("REPA-E/e2e-qwenimage-vae", None, "AutoencoderKLQwenImage", 16, 8, None, None),
    "flux2": VAEType("black-forest-labs/FLUX.2-dev", "vae", "AutoencoderKLFlux2", 128, 16, None, None),
}

# VAEs nanogen trains itself (``nanogen train-stage1``): no hub id; the default source is the recipe's export dir.
# name -> (type, the stage-1 config that trains it)
LOCAL_VAE_TYPES: dict[str, tuple[VAEType, str]] = {
    "nano-vae": (
        VAEType("results/nano-vae/export", None, "AutoencoderKL", 4, 4, None, None),
        "configs/stage1/nano/nano-vae.yaml",
    ),
}

FLUX2_BN_EPS = 1e-5


def env_key(vae_type: str) -> str:
    return "NANOGEN_VAE_" + vae_type.upper().replace("-", "_").replace(".", "_")


def lookup(vae_type: str) -> VAEType:
    if vae_type in LOCAL_VAE_TYPES:
        return LOCAL_VAE_TYPES[vae_type][0]
    if vae_type not in VAE_TYPES:
        raise ConfigError(f"unknown vae_type '{vae_type}'; valid: {', '.join([*VAE_TYPES, *LOCAL_VAE_TYPES])}")
    return VAE_TYPES[vae_type]


def _cfg_get(config: Any, key: str) -> Any:
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def resolve_shift_scale(
    config: Any, registry_shift: float | None = None, registry_scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """(shift, scale) as float32 tensors, shape (C,) when per-channel else () — §6.6 resolution order."""
    mean, std = _cfg_get(config, "latents_mean"), _cfg_get(config, "latents_std")
    if mean is not None:
        shift = torch.tensor(list(mean), dtype=torch.float32)
    elif registry_shift is not None:
        shift = torch.tensor(float(registry_shift))
    elif _cfg_get(config, "shift_factor") is not None:
        shift = torch.tensor(float(_cfg_get(config, "shift_factor")))
    else:
        shift = torch.tensor(0.0)
    if std is not None:
        scale = 1.0 / torch.tensor(list(std), dtype=torch.float32)
    elif registry_scale is not None:
        scale = torch.tensor(float(registry_scale))
    elif _cfg_get(config, "scaling_factor") is not None:
        scale = torch.tensor(float(_cfg_get(config, "scaling_factor")))
    else:
        scale = torch.tensor(1.0)
    return shift, scale


def patchify2x2(z: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2); output channel c*4 + 2*dy + dx holds z[:, c, 2i+dy, 2j+dx]."""
    B, C, h, w = z.shape
    z = z.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(B, C * 4, h // 2, w // 2)


def unpatchify2x2(z: Tensor) -> Tensor:
    """Inverse of ``patchify2x2``."""
    B, C4, h, w = z.shape
    z = z.reshape(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(B, C4 // 4, h * 2, w * 2)


def bn_normalize(z: Tensor, mean: Tensor, var: Tensor, eps: float = FLUX2_BN_EPS) -> Tensor:
    return (z - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps)


def bn_denormalize(z: Tensor, mean: Tensor, var: Tensor, eps: float = FLUX2_BN_EPS) -> Tensor:
    return z * torch.sqrt(var.view(1, -1, 1, 1) + eps) + mean.view(1, -1, 1, 1)


def _resolve_source(vae_type: str, spec: VAEType, source: str | os.PathLike | None) -> tuple[str, str | None]:
    """(path or hub id, subfolder) to hand to ``from_pretrained``."""
    src = str(source) if source is not None else os.environ.get(env_key(vae_type)) or spec.hub_id
    p = Path(src).expanduser()
    if p.is_dir():
        if spec.subfolder and (p / spec.subfolder / "config.json").is_file():
            return str(p), spec.subfolder
        return str(p), None
    return src, spec.subfolder


class VAELatents(nn.Module):
    """A frozen diffusers VAE. encode: images in [0, 1] -> normalised latents (B, C, h, w);
    decode: latents -> images in [0, 1] (clamped)."""

    def __init__(
        self,
        vae_type: str,
        resolution: int = 256,
        source: str | os.PathLike | None = None,
        sample_mode: str = "mode",
        eps: float = FLUX2_BN_EPS,
    ):
        super().__init__()
        spec = lookup(vae_type)
        if sample_mode not in ("mode", "sample"):
            raise ConfigError(f"VAE sample_mode must be 'mode' or 'sample', got '{sample_mode}'")
        self.vae_type = vae_type
        self.spec = spec
        self.resolution = int(resolution)
        self.sample_mode = sample_mode
        self.eps = eps
        import diffusers

        cls = getattr(diffusers, spec.cls_name, None)
        if cls is None:
            raise NotAvailableError(
                f"vae_type '{vae_type}' needs diffusers.{spec.cls_name}, which diffusers {diffusers.__version__} lacks; "
                "upgrade diffusers"
            )
        path, subfolder = _resolve_source(vae_type, spec, source)
        try:
            vae = cls.from_pretrained(path, subfolder=subfolder)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160].rstrip(".")
            if vae_type in LOCAL_VAE_TYPES:
                recipe = LOCAL_VAE_TYPES[vae_type][1]
                raise NotAvailableError(
                    f"cannot load VAE '{vae_type}' from '{path}' ({first}); nanogen trains this one itself: run "
                    f"`nanogen train-stage1 -c {recipe}` (it exports to {spec.hub_id}), or point "
                    f"misc.weights.{vae_type} (or ${env_key(vae_type)}) at another export"
                ) from None
            raise NotAvailableError(
                f"cannot load VAE '{vae_type}' from '{path}'"
                + (f" (subfolder '{subfolder}')" if subfolder else "")
                + f": {first}; fetch {spec.hub_id} once with `nanogen prepare --models {vae_type}` (needs network), or give a local "
                f"directory via misc.weights.{vae_type} (or ${env_key(vae_type)})"
            ) from None
        vae.eval().requires_grad_(False)
        self.vae = vae
        self.is_video = spec.cls_name == "AutoencoderKLQwenImage"
        self.is_flux2 = spec.cls_name == "AutoencoderKLFlux2"
        cfg = vae.config
        if self.is_video:
            raw_channels, raw_down = int(cfg.z_dim), 2 ** len(cfg.temperal_downsample)
        else:
            raw_channels, raw_down = int(cfg.latent_channels), 2 ** (len(cfg.block_out_channels) - 1)
        if self.is_flux2:
            self.channels, self.downsample = raw_channels * 4, raw_down * 2
            if vae.bn.num_features != self.channels:
                raise ConfigError(
                    f"VAE '{vae_type}': BatchNorm has {vae.bn.num_features} features, expected {self.channels}"
                )
            shift, scale = torch.tensor(0.0), torch.tensor(1.0)
        else:
            self.channels, self.downsample = raw_channels, raw_down
            shift, scale = resolve_shift_scale(cfg, spec.shift, spec.scale)
            for name, t in (("latents_mean", shift), ("latents_std", scale)):
                if t.dim() and t.numel() != raw_channels:
                    raise ConfigError(
                        f"VAE '{vae_type}': config.{name} has {t.numel()} values, the VAE has {raw_channels} channels"
                    )
        # per-channel or scalar, broadcast over (B, C, h, w)
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1) if shift.dim() else shift, persistent=False)
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1) if scale.dim() else scale, persistent=False)

    # nanogen / reference attribute names
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h = self.resolution // self.downsample
        return (self.channels, h, h)

    @property
    def image_size(self) -> int:
        return self.resolution

    @property
    def latent_dim(self) -> int:
        return self.channels

    @property
    def patch_size(self) -> int:
        return self.downsample

    def train(self, mode: bool = True) -> VAELatents:  # always frozen in eval mode
        return super().train(False)

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None, *, check: bool = True) -> Tensor:
        if check:
            check_images(images, "VAE encode")
        param = next(self.vae.parameters())
        x = images.to(param.device, torch.float32)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
            )
        x = (x * 2 - 1).to(param.dtype)
        if self.is_video:
            x = x.unsqueeze(2)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if self.sample_mode == "sample" else dist.mode()
        if self.is_video:
            z = z.squeeze(2)
        z = z.float()
        if self.is_flux2:
            bn = self.vae.bn
            return bn_normalize(patchify2x2(z), bn.running_mean.float(), bn.running_var.float(), self.eps)
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if latents.dim() != 4 or latents.shape[1] != self.channels:
            raise ConfigError(
                f"VAE decode: expected latents of shape (B, {self.channels}, h, w), got {tuple(latents.shape)}"
            )
        param = next(self.vae.parameters())
        z = latents.to(param.device, torch.float32)
        if self.is_flux2:
            bn = self.vae.bn
            z = unpatchify2x2(bn_denormalize(z, bn.running_mean.float(), bn.running_var.float(), self.eps))
        else:
            z = z / self.scale + self.shift
        z = z.to(param.dtype)
        if self.is_video:
            z = z.unsqueeze(2)
        x = self.vae.decode(z).sample
        if self.is_video:
            x = x.squeeze(2)
        return ((x.float() + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# from a config (stage_1: {target: vae | qwen-vae | flux2-vae, params: {...}})


@dataclass
class VAEParams:
    """``stage_1.params`` of the VAE latent spaces (the reference's ``VAE(vae_type, resolution, eps, sample_mode)``)."""

    vae_type: str = "sdvae-ema"  # a key of VAE_TYPES
    resolution: int = 256  # images are resized to this before encoding
    sample_mode: str = "mode"  # "mode" (posterior mode, the reference's default) | "sample"
    eps: float = FLUX2_BN_EPS  # FLUX.2 BatchNorm epsilon

    def check(self) -> None:
        """Config-time checks (no weights touched): a known vae_type and sample_mode."""
        try:
            lookup(self.vae_type)
        except ConfigError as e:
            raise ConfigError(f"stage_1.params.vae_type: {e}") from None
        if self.sample_mode not in ("mode", "sample"):
            raise ConfigError(f"stage_1.params.sample_mode: must be 'mode' or 'sample', got '{self.sample_mode}'")


def from_params(params: VAEParams, weights: dict[str, str] | None = None) -> VAELatents:
    """Build from typed params; ``weights`` (``misc.weights``) may map the vae_type to a local dir or hub id."""
    lookup(params.vae_type)
    source = (weights or {}).get(params.vae_type)
    return VAELatents(params.vae_type, params.resolution, source, params.sample_mode, params.eps)
