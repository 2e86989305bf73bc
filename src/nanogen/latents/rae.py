"""RAE: a frozen representation encoder + a trained ViT pixel decoder (spec ``reference.md`` §6.2-6.4).

Like every tokenizer (``latents/base.py``), the RAE takes and returns images in [0, 1]. Like the reference,
``decode`` does **not** clamp (evaluation clamps).

Readings taken where the spec is silent or ambiguous:

* 2-D sin-cos position embedding (MAE ``get_2d_sincos_pos_embed``): MAE builds ``np.meshgrid(grid_w, grid_h)``
  (``xy`` indexing), so ``grid[0]`` holds the **column** index and ``grid[1]`` the **row** index, and then
  concatenates ``[emb(grid[0]), emb(grid[1])]``. Hence, for the token at row ``i``, column ``j`` (token index
  ``i * g + j``, row-major), the first ``D/2`` dims encode the column ``j`` and the last ``D/2`` the row ``i``.
  Each half is ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 1 / 10000 ** (k / (D/4))``, ``k < D/4``.
  The cls slot is all zeros.
* Latent-grid interpolation (token count != decoder grid): bilinear, ``align_corners=False``, applied to the
  embedded tokens. Bilinear weights sum to 1, so it commutes with the affine ``decoder_embed``; the order does
  not matter beyond rounding.
* Module names follow Hugging Face's ``ViTMAEDecoder`` (``decoder_embed``, ``decoder_pos_embed``,
  ``decoder_layers.{i}.attention.attention.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``, ``layernorm_before/after``, ``decoder_norm``, ``decoder_pred``); the
  trainable cls token is ``cls_token``. ``decoder_pos_embed`` is a fixed, persistent buffer.
* The stats ``mean``/``var`` are non-persistent buffers: they come from the stats file, not from checkpoints.
* Input images whose size differs from ``resolution`` are bicubically resized to it first (§6.2 step 2); the
  encoder then applies its own preprocessing. The §6.2 "multiply by 255 if max <= 1" heuristic is replaced by a
  strict check: images must lie in [0, 1] (a [0, 255] batch gets a one-line error instead of a silent guess).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.errors import CheckpointError, ConfigError, UserError
from nanogen.latents.base import check_images

DECODER_PATCH_SIZE = 16


# ----------------------------------------------------------------------------------------------- config


@dataclass
class ViTDecoderConfig:
    """The fields of an HF ViT-MAE-style decoder config that the RAE decoder uses (§6.3)."""

    hidden_size: int  # encoder (latent) channel dim C_enc, overridden from the encoder
    decoder_hidden_size: int
    decoder_num_hidden_layers: int
    decoder_num_attention_heads: int
    decoder_intermediate_size: int
    patch_size: int = DECODER_PATCH_SIZE
    image_size: int = 256
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ConfigError(
                f"decoder_hidden_size {self.decoder_hidden_size} is not divisible by "
                f"decoder_num_attention_heads {self.decoder_num_attention_heads}"
            )
        if self.decoder_hidden_size % 4:
            raise ConfigError(
                f"decoder_hidden_size {self.decoder_hidden_size} must be divisible by 4 (2-D sin-cos)"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_act != "gelu":
            raise ConfigError(f"decoder hidden_act '{self.hidden_act}' is not supported (only 'gelu')")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_json(
        cls, path: str | os.PathLike, encoder_dim: int, num_tokens: int, patch_size: int = DECODER_PATCH_SIZE
    ) -> ViTDecoderConfig:
        """Read a ``configs/decoder/*/config.json`` and apply §6.3's overrides: ``hidden_size := encoder_dim``,
        ``patch_size := 16``, ``image_size := 16 * sqrt(num_tokens)`` (16: ``patch_size``, the RAE's
        ``decoder_patch_size``; every shipped RAE uses 16, the nano RAE 4)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read decoder config '{path}': {str(e).splitlines()[0]}") from None
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ConfigError(f"RAE token count {num_tokens} is not a square")
        keys = ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads")
        missing = [k for k in (*keys, "decoder_intermediate_size") if k not in raw]
        if missing:
            raise ConfigError(f"decoder config '{path}' lacks {', '.join(missing)}")
        return cls(
            hidden_size=int(encoder_dim),
            decoder_hidden_size=int(raw["decoder_hidden_size"]),
            decoder_num_hidden_layers=int(raw["decoder_num_hidden_layers"]),
            decoder_num_attention_heads=int(raw["decoder_num_attention_heads"]),
            decoder_intermediate_size=int(raw["decoder_intermediate_size"]),
            patch_size=int(patch_size),
            image_size=int(patch_size) * side,
            num_channels=int(raw.get("num_channels", 3)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            hidden_act=str(raw.get("hidden_act", "gelu")),
            qkv_bias=bool(raw.get("qkv_bias", True)),
        )


# --------------------------------------------------------------------------------------- position embedding


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(M,) positions -> (M, dim): ``[sin(pos * w), cos(pos * w)]``, ``w_k = 1 / 10000 ** (k / (dim/2))``."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> Tensor:
    """MAE 2-D sin-cos table, (1 + g*g, dim) with a zero cls row (or (g*g, dim)), float32.

    Row ``i * g + j`` (row ``i``, column ``j``): the first ``dim/2`` values encode the column ``j``, the last
    ``dim/2`` the row ``i`` (MAE's ``meshgrid(grid_w, grid_h)`` order; see the module docstring)."""
    idx = torch.arange(grid_size * grid_size)
    col, row = idx % grid_size, idx // grid_size
    emb = torch.cat([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


# ------------------------------------------------------------------------------------------------- layers


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.num_heads = heads
        self.query = nn.Linear(dim, dim, bias=bias)
        self.key = nn.Linear(dim, dim, bias=bias)
        self.value = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.num_heads

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return out.transpose(1, 2).reshape(b, t, d)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.attention = _SelfAttention(dim, heads, bias)
        self.output = _Dense(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.output.dense(self.attention(x))


class ViTLayer(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))``, then ``x + fc2(gelu(fc1(LN(x))))`` (HF ``ViTMAELayer`` naming)."""

    def __init__(self, cfg: ViTDecoderConfig):
        super().__init__()
        d, f = cfg.decoder_hidden_size, cfg.decoder_intermediate_size
        self.layernorm_before = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attention = _Attention(d, cfg.decoder_num_attention_heads, cfg.qkv_bias)
        self.layernorm_after = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.intermediate = _Dense(d, f)
        self.output = _Dense(f, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


def unpatchify(x: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """(B, g*g, p*p*C) tokens, each laid out (p_row, p_col, C), row-major grid -> (B, C, g*p, g*p)."""
    b, t, _ = x.shape
    g = math.isqrt(t)
    if g * g != t:
        raise ValueError(f"unpatchify needs a square token count, got {t}")
    p = patch_size
    x = x.reshape(b, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, g * p, g * p)


# ------------------------------------------------------------------------------------------------ decoder


class RAEDecoder(nn.Module):
    """ViT-MAE-style pixel decoder (§6.3): latent tokens (B, N, C_enc) -> images (B, 3, p*g, p*g) in the
    reference's [0, 1] range (not clamped)."""

    def __init__(self, cfg: ViTDecoderConfig):
        super().__init__()
        self.config = cfg
        d = cfg.decoder_hidden_size
        self.decoder_embed = nn.Linear(cfg.hidden_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("decoder_pos_embed", sincos_2d(d, cfg.grid_size)[None], persistent=True)
        self.decoder_layers = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.decoder_num_hidden_layers))
        self.decoder_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.decoder_pred = nn.Linear(d, cfg.patch_size**2 * cfg.num_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(
                    m.weight
                )  # MAE's decoder init; the RAE decoder is always trained/loaded
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_pos_embed(self) -> None:
        """Refill the fixed position table (e.g. after ``to_empty`` from the meta device)."""
        with torch.no_grad():
            table = sincos_2d(self.config.decoder_hidden_size, self.config.grid_size)[None]
            self.decoder_pos_embed.copy_(table.to(self.decoder_pos_embed.device))

    def embed(self, tokens: Tensor) -> Tensor:
        """(B, N, C_enc) -> (B, 1 + g*g, D): embed, resample the grid if needed, prepend cls, add positions."""
        x = self.decoder_embed(tokens)
        b, n, d = x.shape
        g = self.config.grid_size
        if n != g * g:
            s = math.isqrt(n)
            if s * s != n:
                raise ValueError(f"RAE decoder needs a square token count, got {n}")
            x = x.transpose(1, 2).reshape(b, d, s, s)
            x = F.interpolate(x, size=(g, g), mode="bilinear", align_corners=False)
            x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        return x + self.decoder_pos_embed.to(x.dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for layer in self.decoder_layers:
            x = layer(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return unpatchify(x, self.config.patch_size, self.config.num_channels)


# ---------------------------------------------------------------------------------------------- tokenizer


def load_stats(path: str | os.PathLike, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """Read a stats file ``{'mean': (C,H,W), 'var': (C,H,W)}`` and check it against ``shape``."""
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"cannot read RAE stats file '{path}': {str(e).splitlines()[0][:160]}"
        ) from None
    if not isinstance(stats, dict) or "mean" not in stats or "var" not in stats:
        raise CheckpointError(f"RAE stats file '{path}' must hold a dict with 'mean' and 'var' tensors")
    mean, var = stats["mean"], stats["var"]
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise CheckpointError(
                f"RAE stats file '{path}': '{name}' has shape {got}, but the encoder latents have shape "
                f"{tuple(shape)} (C, H, W); use the stats computed for this encoder and resolution"
            )
    return mean.float(), var.float()


class RAE(nn.Module):
    """Representation autoencoder tokenizer (§6.2).

    ``encode(images in [0, 1]) -> (B, C, g, g)``; ``decode(latents) -> images`` in [0, 1] nominal range (no clamp).
    ``encoder``: a frozen module returning ``EncoderFeatures`` (``build_encoder``) with an ``embed_dim``.
    ``decoder``: an ``RAEDecoder`` or a decoder config JSON path (built for ``encoder.embed_dim`` and
    ``(resolution/p)**2`` tokens, ``p = decoder_patch_size``: 16 as in the reference, 4 for the 32-px nano RAE).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: RAEDecoder | str | os.PathLike,
        resolution: int = 256,
        noise_tau: float = 0.8,
        stats_path: str | os.PathLike | None = None,
        eps: float = 1e-5,
        pretrained_decoder_path: str | os.PathLike | None = None,
        decoder_patch_size: int = DECODER_PATCH_SIZE,
    ):
        super().__init__()
        p = int(decoder_patch_size)
        if p < 1 or resolution % p:
            raise ConfigError(f"RAE resolution {resolution} must be a multiple of the decoder patch size {p}")
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.resolution = resolution
        self.grid = resolution // p
        self.num_tokens = self.grid**2  # base_patches: 256 tokens at 256 px whatever the encoder's patch size
        self.latent_dim = self.hidden_size = int(encoder.embed_dim)
        self.patch_size = p  # the downsample factor
        if not isinstance(decoder, RAEDecoder):
            decoder = RAEDecoder(ViTDecoderConfig.from_json(decoder, self.latent_dim, self.num_tokens, p))
        if decoder.config.hidden_size != self.latent_dim:
            raise ConfigError(
                f"RAE decoder takes {decoder.config.hidden_size}-dim latents but the encoder gives {self.latent_dim}"
            )
        self.decoder = decoder
        if pretrained_decoder_path is not None:
            self.load_decoder(pretrained_decoder_path)
        self.noise_tau = float(noise_tau)
        self.eps = float(eps)
        self.has_stats = stats_path is not None
        if stats_path is not None:
            mean, var = load_stats(stats_path, self.latent_shape)
        else:
            mean, var = torch.zeros(self.latent_shape), torch.ones(self.latent_shape)
        self.register_buffer("latent_mean", mean, persistent=False)
        self.register_buffer("latent_var", var, persistent=False)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_dim, self.grid, self.grid)

    def train(self, mode: bool = True) -> RAE:
        super().train(mode)
        self.encoder.train(False)  # frozen: always eval
        return self

    def load_decoder(self, path: str | os.PathLike) -> None:
        """Load decoder weights (a state dict, or a dict holding one under 'model'/'state_dict'/'ema')."""
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"cannot read RAE decoder '{path}': {str(e).splitlines()[0][:160]}"
            ) from None
        for key in ("model", "state_dict", "ema"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
        sd = dict(sd)
        sd.setdefault("decoder_pos_embed", self.decoder.decoder_pos_embed)
        try:
            self.decoder.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            msg = " ".join(str(e).split())[:300]
            raise CheckpointError(f"RAE decoder '{path}' does not match the decoder config: {msg}") from None

    def _normalize(self, z: Tensor) -> Tensor:
        if not self.has_stats:
            return z
        return (z - self.latent_mean) / torch.sqrt(self.latent_var + self.eps)

    def _denormalize(self, z: Tensor) -> Tensor:
        if not self.has_stats:
            return z
        return z * torch.sqrt(self.latent_var + self.eps) + self.latent_mean

    def _tokens(self, images: Tensor, check: bool) -> Tensor:
        """Images in [0, 1] -> the frozen encoder's patch tokens (B, N, C), float32."""
        if check:
            check_images(images, "RAE encode")
        x = images.float()
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        with torch.no_grad():
            z = self.encoder(x * 2 - 1).patches.float()  # (B, N, C); nanogen's encoders take [-1, 1]
        if z.shape[1:] != (self.num_tokens, self.latent_dim):
            raise ValueError(
                f"RAE encoder gave tokens {tuple(z.shape[1:])}, expected {(self.num_tokens, self.latent_dim)}"
            )
        return z

    def _to_grid(self, z: Tensor) -> Tensor:
        """(B, N, C) tokens, row-major -> (B, C, g, g)."""
        return z.transpose(1, 2).reshape(z.shape[0], self.latent_dim, self.grid, self.grid)

    def encode_raw(self, images: Tensor, *, check: bool = True) -> Tensor:
        """Images in [0, 1] (B, 3, H, W) -> the encoder's latents (B, C, g, g) with **no** noise and **no**
        normalisation, in any mode: what the §6.4 statistics are computed over."""
        return self._to_grid(self._tokens(images, check))

    def encode(self, images: Tensor, *, check: bool = True) -> Tensor:
        """Images in [0, 1] (B, 3, H, W) -> latents (B, C, g, g); noise ``sigma * n``, ``sigma ~ U(0, tau)``
        per sample, only in train mode. (The reference guesses the range: max <= 1 means [0, 1]; nanogen
        requires [0, 1] and says so when the batch is outside it.) ``encode_raw`` + noise + normalisation."""
        z = self._tokens(images, check)
        if self.training and self.noise_tau > 0:
            sigma = torch.rand(z.shape[0], 1, 1, device=z.device, dtype=z.dtype) * self.noise_tau
            z = z + sigma * torch.randn_like(z)  # on the tokens, before the reshape, as the reference does
        return self._normalize(self._to_grid(z))

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, g, g) -> images (B, 3, p*g, p*g) in [0, 1] nominal range (not clamped); p = ``patch_size``."""
        z = self._denormalize(latents.float())
        tokens = z.flatten(2).transpose(1, 2)  # (B, g*g, C), row-major
        return self.decoder(tokens)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))


def build_rae(
    encoder_name: str,
    decoder_config_path: str | os.PathLike,
    resolution: int = 256,
    noise_tau: float = 0.8,
    stats_path: str | os.PathLike | None = None,
    pretrained_decoder_path: str | os.PathLike | None = None,
    encoder_source: str | None = None,
    eps: float = 1e-5,
    decoder_patch_size: int = DECODER_PATCH_SIZE,
) -> RAE:
    """An RAE from an encoder name (``build_encoder``) and a decoder config JSON."""
    from nanogen.encoders.base import build_encoder

    encoder = build_encoder(encoder_name, encoder_source, resolution)
    return RAE(
        encoder, decoder_config_path, resolution, noise_tau, stats_path, eps, pretrained_decoder_path, decoder_patch_size
    )


# ----------------------------------------------------------------------------------------------------------
# from a config (stage_1: {target: rae, params: {...}})


@dataclass
class RAEParams:
    """``stage_1.params`` of the RAE latent space, with the reference's names (§6.2)."""

    encoder_name: str = "dinov2-vit-b"
    resolution: int = 256
    decoder_config_path: str = "configs/decoder/ViTXL/config.json"
    decoder_patch_size: int = 16  # the decoder's patch = the latent grid's downsample factor (nano: 4)
    pretrained_decoder_path: str | None = None
    noise_tau: float = 0.8  # train-time noise augmentation (stage-1 configs 0.8; stage-2 configs 0)
    normalization_stat_path: str | None = None
    eps: float = 1e-5

    def check(self) -> None:
        """Config-time checks (no weights touched): a known encoder name, a resolution that is a multiple of
        ``decoder_patch_size``."""
        from nanogen.encoders.base import default_source

        try:
            default_source(self.encoder_name)  # unknown names: one line listing the valid ones
        except UserError as e:
            raise type(e)(f"stage_1.params.encoder_name: {e}") from None
        if self.decoder_patch_size < 1:
            raise ConfigError(f"stage_1.params.decoder_patch_size: must be >= 1 (the reference's RAEs use 16), got {self.decoder_patch_size}")
        if self.resolution % self.decoder_patch_size:
            raise ConfigError(
                f"stage_1.params.resolution: must be a multiple of decoder_patch_size {self.decoder_patch_size}, "
                f"got {self.resolution}"
            )


def _builtin_path(path: str) -> str:
    """``configs/...`` paths also resolve inside an installed package (where configs/ ships as _configs/)."""
    p = Path(path).expanduser()
    if p.exists() or not path.startswith("configs/"):
        return str(p)
    from nanogen.config.loader import builtin_configs_dir

    cand = builtin_configs_dir() / path.removeprefix("configs/")
    return str(cand if cand.exists() else p)


def from_params(params: RAEParams, weights: dict[str, str] | None = None) -> RAE:
    return build_rae(
        params.encoder_name, _builtin_path(params.decoder_config_path), params.resolution, params.noise_tau,
        params.normalization_stat_path, params.pretrained_decoder_path, (weights or {}).get(params.encoder_name),
        params.eps, params.decoder_patch_size,
    )  # fmt: skip
