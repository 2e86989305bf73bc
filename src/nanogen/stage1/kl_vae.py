"""A trainable KL autoencoder (a diffusers ``AutoencoderKL``) for ``nanogen train-stage1``.

The reference trains only RAE decoders (§6.7). nanogen also trains (or fine-tunes) a KL-VAE with the same
stage-1 recipe (L1 + LPIPS + GAN, EMA, discriminator schedule) plus the usual KL term, so the nano tier has a
real learned latent space on the built-in digits. The trained EMA weights are exported with
``save_pretrained`` and then load as a frozen stage-2 tokenizer through the same code as the pretrained VAEs
(``stage_1: {target: vae, params: {vae_type: nano-vae}}``, ``latents/vae.py``).

Export sets the config's ``shift_factor`` / ``scaling_factor`` to the mean and ``1 / std`` of the posterior-mode
latents over the training images (the LDM recipe for choosing the scale), so stage 2 sees unit-variance latents.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.errors import ConfigError, NotAvailableError


@dataclass
class KLVAEParams:
    """``stage_1.params`` of ``target: kl-vae`` (a stage-1 training target only)."""

    resolution: int = 32  # images are bilinearly resized to this
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # one entry per level; downsample 2**(n-1)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)), summed over latent elements, mean over images
    sample_posterior: bool = True  # train on z ~ q(z|x); evaluation and export use the mode
    init_from: str | None = None  # fine-tune an existing diffusers AutoencoderKL (local dir or hub id) instead


class KLAutoencoder(nn.Module):
    """``forward(images in [0, 1]) -> (reconstruction in [0, 1] nominal range, {"kl": ...})``."""

    def __init__(self, params: KLVAEParams):
        super().__init__()
        import diffusers

        self.params = params
        if params.init_from:
            try:
                vae = diffusers.AutoencoderKL.from_pretrained(params.init_from)
            except (OSError, ValueError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                raise NotAvailableError(
                    f"stage_1.params.init_from: cannot load an AutoencoderKL from '{params.init_from}': {first}"
                ) from None
        else:
            n = len(params.block_out_channels)
            if n < 1 or any(c % params.norm_num_groups for c in params.block_out_channels):
                raise ConfigError(
                    f"stage_1.params.block_out_channels: {params.block_out_channels} must be non-empty multiples of "
                    f"norm_num_groups ({params.norm_num_groups})"
                )
            vae = diffusers.AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(params.block_out_channels),
                layers_per_block=params.layers_per_block,
                latent_channels=params.latent_channels,
                norm_num_groups=params.norm_num_groups,
                sample_size=params.resolution,
            )
        self.vae = vae
        self.resolution = params.resolution
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        if self.resolution % self.downsample:
            raise ConfigError(
                f"stage_1.params.resolution: {self.resolution} is not divisible by the VAE's downsample factor "
                f"{self.downsample}"
            )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h = self.resolution // self.downsample
        return (int(self.vae.config.latent_channels), h, h)

    @property
    def last_layer(self) -> Tensor:
        """The weight the adaptive GAN weight is balanced on (the decoder's output conv)."""
        return self.vae.decoder.conv_out.weight

    def _prep(self, images01: Tensor) -> Tensor:
        x = images01.float()
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return x * 2 - 1

    def forward(self, images01: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        post = self.vae.encode(self._prep(images01)).latent_dist
        z = post.sample() if self.training and self.params.sample_posterior else post.mode()
        recon = (self.vae.decode(z).sample + 1) / 2
        return recon, {"kl": post.kl().mean()}

    @torch.no_grad()
    def latents(self, images01: Tensor) -> Tensor:
        """Posterior-mode latents (unnormalised)."""
        return self.vae.encode(self._prep(images01)).latent_dist.mode()

    def export(self, out_dir: str | os.PathLike, shift: float, scale: float, meta: dict) -> Path:
        """``save_pretrained`` with the latent normalisation in the config, plus a ``nanogen.json`` note."""
        out = Path(out_dir)
        self.vae.register_to_config(shift_factor=float(shift), scaling_factor=float(scale))
        self.vae.save_pretrained(out)
        (out / "nanogen.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return out


def from_params(params: KLVAEParams, weights: dict[str, str] | None = None) -> KLAutoencoder:
    return KLAutoencoder(params)
