"""DINO-ViT discriminator of the stage-1 GAN (reference §6.7, recipe ``S_8``).

Two parts:

* :class:`ViT` -- a plain, timm-free ViT (pre-norm blocks, cls token, learned absolute position embedding, LayerNorm
  eps 1e-6, GELU MLP ×4) whose parameter names follow the standard DINO key layout (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.weight/bias``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
  ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``norm``). :func:`vit_small_patch8` builds the
  S/8 sizes (depth 12, width 384, 6 heads, patch 8, 224 input -> 28×28 = 784 patch tokens + 1 cls token).
  :meth:`ViT.forward_features` returns the 5 feature maps used by the heads, each ``(B, tokens, width)`` with the cls
  token dropped: the outputs of blocks ``hooks`` (default {2, 5, 8, 11}, 0-based) and, as 5th map, the output of the
  last block passed through the final ``norm`` (with depth 12, block 11 *is* the last block, so the raw last-block
  output would duplicate map 4; the final-norm output is the model's "last block output" in its usable form).
* :class:`DinoDiscriminator` -- the frozen extractor + 5 trainable :class:`DiscHead` s. Input images in [-1, 1] are
  bilinearly resized to the extractor's ``img_size`` (``align_corners=False``, no antialias), mapped to [0, 1] and
  normalised with the ImageNet mean/std. The output logits are the per-token logits of all heads concatenated:
  ``(B, 5 · tokens)``. Gradients flow through the frozen extractor to the input (the generator step needs them);
  the extractor's parameters have ``requires_grad=False`` and it is kept in eval mode.

Head (per feature map, channels = extractor width)::

    SpectralConv1d(k=1) -> LocalBatchNorm -> LeakyReLU(0.2)
    -> x + f(x) scaled by 1/sqrt(2), f = [SpectralConv1d(k=ks, circular padding ks//2) -> LocalBatchNorm -> LeakyReLU(0.2)]
    -> SpectralConv1d(k=1) to 1 channel

"Local BatchNorm, virtual batch 1, eps 1e-6" (:class:`LocalBatchNorm1d`): a BatchNorm whose statistics are computed
over groups of ``virtual_bs`` samples (always batch statistics, in train and eval alike, no running averages). With
``virtual_bs = 1`` the mean / biased variance are taken per sample and per channel over the token axis only, then a
learned per-channel affine (init weight 1, bias 0) is applied. Spectral norm is torch's parametrization
(``torch.nn.utils.parametrizations.spectral_norm``, 1 power iteration per training-mode forward).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from nanogen.encoders.base import IMAGENET_MEAN, IMAGENET_STD  # re-exported: the discriminator's input norm

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DinoDiscriminator",
    "DiscHead",
    "LocalBatchNorm1d",
    "ViT",
    "build_dino_discriminator",
    "load_dino_vit",
    "vit_small_patch8",
    "zero_qkv_k_bias_",
]


# ---------------------------------------------------------------------------------------------------- plain ViT


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)  # output layout [q | k | v], each `dim` wide
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale 1/sqrt(head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Plain ViT with DINO parameter names. ``forward_features(x)`` -> list of 5 maps ``(B, tokens, width)``."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 8,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        hooks: Sequence[int] = (2, 5, 8, 11),
    ):
        super().__init__()
        if any(not 0 <= h < depth for h in hooks):
            raise ValueError(f"hooks {tuple(hooks)} out of range for depth {depth}")
        self.img_size, self.patch_size, self.embed_dim, self.depth = img_size, patch_size, embed_dim, depth
        self.hooks = tuple(int(h) for h in hooks)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if not any(p.is_meta for p in self.parameters()):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_maps(self) -> int:
        return len(self.hooks) + 1

    def tokens(self, x: Tensor) -> Tensor:
        """Patch tokens with the cls token prepended and the position embedding added: ``(B, 1 + N, D)``."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"ViT expects {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        t = self.patch_embed(x)
        cls = self.cls_token.expand(t.shape[0], -1, -1)
        return torch.cat([cls, t], dim=1) + self.pos_embed

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The hooked block outputs + final-norm output, cls token dropped, each ``(B, N, D)``."""
        t = self.tokens(x)
        feats = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in self.hooks:
                feats.append(t[:, 1:])
        feats.append(self.norm(t)[:, 1:])
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """The cls token of the final-norm output, ``(B, D)`` (DINO's embedding)."""
        t = self.tokens(x)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 0]


def vit_small_patch8(img_size: int = 224, **kw) -> ViT:
    """DINO ViT-S/8: depth 12, width 384, 6 heads, patch 8 (784 patch tokens + cls at 224)."""
    return ViT(img_size=img_size, patch_size=8, embed_dim=384, depth=12, num_heads=6, **kw)


@torch.no_grad()
def zero_qkv_k_bias_(vit: ViT) -> None:
    """Zero the K slice ``[D:2D]`` of every ``blocks.{i}.attn.qkv.bias`` (in place).

    A key bias adds ``q · b_k`` to every logit of a query row, which softmax ignores, so this does not change the
    forward output (up to float rounding) -- it removes a parameter the attention is invariant to (§6.7).
    """
    for blk in vit.blocks:
        d = blk.attn.proj.in_features
        blk.attn.qkv.bias[d : 2 * d].zero_()


def _clean_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    for wrapper in ("teacher", "student", "state_dict", "model"):  # DINO full checkpoints nest the weights
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if k.startswith("head.") or k == "head":  # projection head / classifier: unused
            continue
        out[k] = v
    return out


def load_dino_vit(vit: ViT, source: str | os.PathLike | Mapping[str, Tensor]) -> ViT:
    """Load DINO weights (standard DINO ViT key names, see module doc) strictly, then zero every qkv K-bias.

    ``source`` is a path to ``dino_vit_small_patch8_224.pth`` (a plain state dict; ``teacher``/``student`` wrappers
    and ``module.``/``backbone.`` prefixes are stripped, ``head.*`` keys dropped) or an already loaded mapping.
    """
    if isinstance(source, Mapping):
        sd = source
    else:
        sd = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
    missing, unexpected = vit.load_state_dict(_clean_state_dict(sd), strict=False)
    if missing or unexpected:
        raise KeyError(
            f"DINO ViT state dict mismatch: missing={sorted(missing)} unexpected={sorted(unexpected)}"
        )
    zero_qkv_k_bias_(vit)
    return vit


# ---------------------------------------------------------------------------------------------------- heads


class LocalBatchNorm1d(nn.Module):
    """BatchNorm over ``(B, C, L)`` with statistics per group of ``virtual_bs`` samples (always batch statistics).

    ``virtual_bs = 1``: mean and biased variance per sample and channel over the token axis ``L`` only.
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, virtual_bs: int = 1, affine: bool = True):
        super().__init__()
        self.num_features, self.eps, self.virtual_bs = num_features, eps, int(virtual_bs)
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, virtual_bs={self.virtual_bs}"

    def forward(self, x: Tensor) -> Tensor:
        b, c, n = x.shape
        if b % self.virtual_bs:
            raise ValueError(f"batch {b} is not a multiple of virtual_bs {self.virtual_bs}")
        g = x.view(b // self.virtual_bs, self.virtual_bs, c, n)
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), keepdim=True, unbiased=False)
        y = ((g - mean) * torch.rsqrt(var + self.eps)).view(b, c, n)
        if self.weight is not None:
            y = y * self.weight.view(1, c, 1) + self.bias.view(1, c, 1)
        return y


def _conv1d(cin: int, cout: int, k: int, spec: bool) -> nn.Conv1d:
    conv = nn.Conv1d(cin, cout, kernel_size=k, padding=k // 2, padding_mode="circular")
    return spectral_norm(conv) if spec else conv


class DiscHead(nn.Module):
    """One per-token discriminator head: ``(B, N, C)`` features -> ``(B, N)`` logits (see module doc)."""

    def __init__(
        self,
        channels: int,
        ks: int = 9,
        using_spec_norm: bool = True,
        norm_type: str = "bn",
        virtual_bs: int = 1,
    ):
        super().__init__()
        if norm_type != "bn":
            raise ValueError(f"norm_type {norm_type!r} is not supported (only 'bn')")
        if ks % 2 != 1:
            raise ValueError(f"ks must be odd to keep the token count, got {ks}")

        def block(k: int) -> nn.Sequential:
            return nn.Sequential(
                _conv1d(channels, channels, k, using_spec_norm),
                LocalBatchNorm1d(channels, eps=1e-6, virtual_bs=virtual_bs),
                nn.LeakyReLU(0.2),
            )

        self.block1 = block(1)
        self.res = block(ks)
        self.cls = _conv1d(channels, 1, 1, using_spec_norm)

    def forward(self, feats: Tensor) -> Tensor:
        x = self.block1(feats.transpose(1, 2))  # (B, C, N)
        x = (x + self.res(x)) / math.sqrt(2.0)
        return self.cls(x).squeeze(1)  # (B, N)


class DinoDiscriminator(nn.Module):
    """Frozen ViT feature extractor + trainable heads; ``forward(x in [-1, 1]) -> (B, num_maps · tokens)`` logits."""

    def __init__(
        self,
        extractor: ViT | None = None,
        ks: int = 9,
        using_spec_norm: bool = True,
        norm_type: str = "bn",
        virtual_bs: int = 1,
    ):
        super().__init__()
        self.extractor = extractor if extractor is not None else vit_small_patch8()
        self.extractor.requires_grad_(False)
        self.extractor.eval()
        self.heads = nn.ModuleList(
            DiscHead(self.extractor.embed_dim, ks, using_spec_norm, norm_type, virtual_bs)
            for _ in range(self.extractor.num_maps)
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.extractor.eval()  # frozen: never leaves eval mode
        return self

    def preprocess(self, x: Tensor) -> Tensor:
        """[-1, 1] images -> bilinear resize to the extractor size -> ImageNet-normalised."""
        size = self.extractor.img_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return ((x + 1.0) * 0.5 - self.mean) / self.std

    def features(self, x: Tensor) -> list[Tensor]:
        return self.extractor.forward_features(self.preprocess(x))

    def forward(self, x: Tensor) -> Tensor:
        feats = self.features(x)
        return torch.cat([head(f) for head, f in zip(self.heads, feats, strict=True)], dim=1)


# Recipes: the reference's DINO ViT-S/8 at 224 px, and a tiny one for CPU tests and the nano tier's smoke runs
# (random frozen features unless a checkpoint is given; not a substitute for the real discriminator).
RECIPES = {
    "S_8": dict(img_size=224, patch_size=8, embed_dim=384, depth=12, num_heads=6, hooks=(2, 5, 8, 11)),
    "tiny": dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, hooks=(0, 1, 2, 3)),
}


def build_dino_discriminator(
    cfg=None, load_weights: bool = True, extractor: ViT | None = None
) -> DinoDiscriminator:
    """Build from a ``GanArchConfig`` (``recipe`` ``S_8`` or ``tiny``; ``ks``, ``norm_type``, ``using_spec_norm``).

    With ``load_weights`` the ViT weights are read from ``cfg.dino_ckpt_path`` (K-bias zeroed on load); the
    ``tiny`` recipe may leave ``dino_ckpt_path`` empty (random frozen features).
    """
    from nanogen.errors import CheckpointError, ConfigError, NotAvailableError

    recipe = getattr(cfg, "recipe", "S_8")
    if recipe not in RECIPES:
        raise ConfigError(f"gan.arch.recipe: unknown discriminator recipe '{recipe}' (available: {', '.join(RECIPES)})")
    if extractor is None:
        extractor = ViT(**RECIPES[recipe])
        path = getattr(cfg, "dino_ckpt_path", None)
        if load_weights and (path or recipe == "S_8"):
            if not path or not os.path.isfile(os.path.expanduser(path)):
                raise NotAvailableError(
                    f"gan.arch.dino_ckpt_path: the DINO ViT-S/8 discriminator weights are not at '{path}'; download "
                    f"dino_deitsmall8_pretrain.pth (facebookresearch/dino) to that path, or set gan.loss.disc_weight=0 "
                    f"to train without the GAN term"
                )
            try:
                load_dino_vit(extractor, os.path.expanduser(path))
            except (KeyError, RuntimeError, OSError) as e:
                raise CheckpointError(
                    f"gan.arch.dino_ckpt_path: '{path}' is not a {recipe} DINO ViT checkpoint "
                    f"({' '.join(str(e).split())[:200]})"
                ) from None
    return DinoDiscriminator(
        extractor,
        ks=getattr(cfg, "ks", 9),
        using_spec_norm=getattr(cfg, "using_spec_norm", True),
        norm_type=getattr(cfg, "norm_type", "bn"),
    )
