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

from torch import Tensor, nn

from nanogen.models.in_context import CondArch, InContextStem, check_common
from nanogen.models.layers import Attention, RMSNorm, Rope2D, SwiGLU, unpatchify
from nanogen.models.outputs import DiTOutput


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
    enable_repa: bool = False  # linear projector after block repa_layer_depth (§4.3)
    repa_layer_depth: int = 8  # 1-based
    z_dim: int | None = None  # representation width for REPA / REG
    enable_reg: bool = False  # REG: a noised CLS token as an extra first token (§4.4)
    is_meanflow: bool = False  # MeanFlow: a second time embedder for the absolute time (§4.6)

    def check(self) -> None:
        from nanogen.errors import ConfigError

        if self.input_size % self.patch_size:
            raise ConfigError(
                f"stage_2.params: input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        check_common(self.hidden_size, self.num_heads, "stage_2.params")
        if self.enable_repa and not 1 <= self.repa_layer_depth <= self.depth:
            raise ConfigError(
                f"stage_2.params.repa_layer_depth: {self.repa_layer_depth} is outside 1..{self.depth}"
            )
        if (self.enable_repa or self.enable_reg) and not self.z_dim:
            raise ConfigError(
                "stage_2.params.z_dim: REPA / REG need z_dim (the representation encoder's width, e.g. 768)"
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
    """RMSNorm + Linear to p*p*C values per patch token, no modulation; zero-initialised so training starts
    from output 0. REG: a second zero-initialised head reads the REG token."""

    def __init__(self, dim: int, out_dim: int, z_dim: int | None = None):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if z_dim is not None:
            self.cls_linear = nn.Linear(dim, z_dim)
            nn.init.zeros_(self.cls_linear.weight)
            nn.init.zeros_(self.cls_linear.bias)

    def forward(self, h: Tensor, s0: int = 0) -> tuple[Tensor, Tensor | None]:
        h = self.norm(h)
        return self.linear(h[:, s0:]), (self.cls_linear(h[:, 0]) if s0 else None)


# ----------------------------------------------------------------------------------------------------------
# model


class LightningDiT(InContextStem):
    def __init__(self, cfg: LightningDiTConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.input_size // p
        self.num_patches = self.grid**2
        self.build_stem(
            dim=D, patch=p, in_channels=cfg.in_channels, cond_arch=cfg.cond_arch,
            condition_type=cfg.condition_type, num_classes=cfg.num_classes, context_dim=cfg.context_dim,
            enable_reg=cfg.enable_reg, z_dim=cfg.z_dim, is_meanflow=cfg.is_meanflow,
        )  # fmt: skip
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        if cfg.enable_repa:
            self.repa_projector = nn.Linear(D, cfg.z_dim)  # type: ignore[arg-type]
        self.final_layer = FinalLayer(D, p * p * cfg.in_channels, cfg.z_dim if cfg.enable_reg else None)
        self.rope = Rope2D(self.grid, D // cfg.num_heads, n_before=self.n_before, n_after=self.n_after)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond: Tensor,
        cond_mask: Tensor | None = None,
        *,
        cls_t: Tensor | None = None,
        t_abs: Tensor | None = None,
        return_repa: bool = False,
    ) -> Tensor | DiTOutput:
        """Same signature and outputs as ``DDT.forward``: x (B, C, H, W); t (B,) in [0, 1] (1 = noise); cond labels
        (B,) or text states (B, L, context_dim); cond_mask (B, L) bool or None; cls_t (REG); t_abs (MeanFlow)."""
        s0 = self.n_before
        s, mask, _ = self.embed(x, t, cond, cond_mask, cls_t, t_abs)
        s, z = self.run_blocks(s, self.blocks, self.rope, mask, return_repa)
        out, cls = self.final_layer(s[:, : s0 + self.num_patches], s0)
        return self.package(unpatchify(out, self.cfg.patch_size, self.cfg.in_channels), cls, z, return_repa)

# ----------------------------------------------------------------------------------------------------------
# named sizes (width, depth, heads); the reference's default is the XL width at depth 28


SIZES: dict[str, dict[str, int]] = {
    "LightningDiT-XS": {"hidden_size": 128, "depth": 4, "num_heads": 4},  # the nano / demo tier
    "LightningDiT-S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "LightningDiT-B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "LightningDiT-L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "LightningDiT-XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}
