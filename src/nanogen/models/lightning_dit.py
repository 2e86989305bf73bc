"""LightningDiT: the single-stream in-context DiT (spec ``reference.md`` §3.4).

    noisy latent x ──PatchEmbed──► N patch tokens ─┐
    t ──Gaussian-Fourier MLP──► n_t time tokens ───┼─► [patches | time | condition] ─► depth x Block ─► RMSNorm
    class / text ──► n_c condition tokens ─────────┘                                    ─► Linear ─► unpatchify

Every block is pre-norm with no AdaLN and no gating: s <- s + Attn(RMSNorm(s)); s <- s + SwiGLU(RMSNorm(s)).
Conditioning is purely in context: time and class (or text) tokens attend jointly with the patches. 2-D RoPE
rotates the patch tokens only. The final layer is RMSNorm + Linear on the patch tokens, with no modulation.

The network knows nothing about noise schedules: it maps (x, t, condition) to one output of x's shape,
whose meaning (velocity or clean x) is decided by the objective that wraps it (``objectives/flow.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from nanogen.models.in_context import CondArch, InContextStem, check_common
from nanogen.models.layers import (
    Attention,
    LabelTokens,
    PatchEmbed,
    RMSNorm,
    Rope2D,
    SwiGLU,
    TextTokens,
    TimeTokens,
    unpatchify,
)


@dataclass
class LightningDiTConfig:
    input_size: int = 16  # latent height = width
    in_channels: int = 768  # latent channels
    patch_size: int = 1
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    condition_type: Literal["label", "text"] = "label"
    num_classes: int = 1000  # label conditioning; index num_classes is the null label
    context_dim: int | None = None  # text conditioning: width of the text encoder's states
    cond_arch: CondArch = field(default_factory=CondArch)

    def check(self) -> None:
        from nanogen.errors import ConfigError

        if self.input_size % self.patch_size:
            raise ConfigError(
                f"stage_2.params: input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"stage_2.params: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(
                f"stage_2.params: head dim {self.hidden_size // self.num_heads} (hidden_size/num_heads) must be "
                f"divisible by 4 for 2-D RoPE"
            )
        if self.condition_type == "text" and not self.context_dim:
            raise ConfigError("stage_2.params: text conditioning needs context_dim (the text encoder width)")


# ----------------------------------------------------------------------------------------------------------
# block


class Block(nn.Module):
    """Pre-norm transformer block without AdaLN: conditioning arrives as tokens, not modulation."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio)

    def forward(self, s: Tensor, rope: Rope2D, mask: Tensor | None) -> Tensor:
        s = s + self.attn(self.norm1(s), rope, mask)
        return s + self.mlp(self.norm2(s))


class FinalLayer(nn.Module):
    """RMSNorm + Linear to p*p*C values per patch token; zero-initialised so training starts from output 0."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(self.norm(h))


# ----------------------------------------------------------------------------------------------------------
# model


class LightningDiT(nn.Module):
    def __init__(self, cfg: LightningDiTConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.input_size // p
        self.num_patches = self.grid**2
        self.s_embedder = PatchEmbed(p, cfg.in_channels, D)
        self.t_embedder = TimeTokens(D, cfg.cond_arch.num_t_tokens)
        if cfg.condition_type == "label":
            self.ctx_embedder: nn.Module = LabelTokens(D, cfg.cond_arch.num_c_tokens, cfg.num_classes)
        else:
            self.ctx_embedder = TextTokens(D, cfg.context_dim)  # type: ignore[arg-type]
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, p * p * cfg.in_channels)
        n_after = cfg.cond_arch.num_t_tokens + cfg.cond_arch.num_c_tokens
        self.rope = Rope2D(self.grid, D // cfg.num_heads, n_before=0, n_after=n_after)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, cond_mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) noisy input; t: (B,) in [0, 1] (1 = noise); cond: labels (B,) or text states
        (B, L, context_dim); cond_mask: (B, L) bool text mask (True = real token), None when unpadded."""
        s = self.s_embedder(x)  # (B, N, D)
        t_tok, _ = self.t_embedder(t)  # (B, n_t, D)
        c_tok = self.ctx_embedder(cond)  # (B, n_c, D)
        mask = None
        if cond_mask is not None:  # key mask over [patches | time | condition]; patches and time always visible
            keep = torch.ones(s.shape[0], s.shape[1] + t_tok.shape[1], dtype=torch.bool, device=s.device)
            mask = torch.cat([keep, cond_mask.to(torch.bool)], dim=1)
        s = torch.cat([s, t_tok.to(s.dtype), c_tok.to(s.dtype)], dim=1)
        for block in self.blocks:
            s = block(s, self.rope, mask)
        out = self.final_layer(s[:, : self.num_patches])
        return unpatchify(out, self.cfg.patch_size, self.cfg.in_channels)


# ----------------------------------------------------------------------------------------------------------
# named sizes (width, depth, heads); the reference's default is the XL width at depth 28


SIZES: dict[str, dict[str, int]] = {
    "LightningDiT-XS": {"hidden_size": 128, "depth": 4, "num_heads": 4},  # the nano / demo tier
    "LightningDiT-S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "LightningDiT-B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "LightningDiT-L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "LightningDiT-XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}
