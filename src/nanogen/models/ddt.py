"""DDT: the Decoupled Diffusion Transformer with in-context conditioning (spec ``reference.md`` §3.2).

                 ┌──────────────────────── encoder (width D_e, L_e blocks, no AdaLN) ────────────────────────┐
    x ─PatchEmbed─► [REG cls] [N patch tokens] [n_t time] [n_t abs-time (MeanFlow)] [8 class | 256 text] ─► blocks
                                 │
                                 ▼  bridge: c = Linear(SiLU(e(t) + encoder patch (+REG) tokens))  (per-token condition)
    x ─PatchEmbed─► [REG cls] [N patch tokens] ─► L_d AdaLN-Zero blocks modulated by c ─► final AdaLN + Linear ─► unpatchify
                 └──────────────────────── decoder (width D_d, 2-D RoPE, no mask) ─────────────────────────────┘

The encoder sees the noisy input together with time and class/text tokens and attends jointly over them; the
decoder re-embeds the noisy input at its own width and is steered, token by token, by what the encoder made of
it. Optional paths: the REG token (a noised representation CLS token denoised jointly, §4.4), the REPA tap (a
linear projection of the encoder tokens after block ``repa_layer_depth``, §4.3) and MeanFlow's second time
embedder for the absolute time (§4.6).

The network knows nothing about noise or losses: ``forward`` maps (x, t, condition) to an output of x's shape
whose meaning (velocity or clean x) is decided by the objective that wraps it.

Parameter names follow the reference's state-dict layout (``reference-params.md``), so released checkpoints
load one to one; only the RoPE tables are rebuilt rather than loaded (see ``nanogen.checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.models.in_context import CondArch, InContextStem, check_common
from nanogen.models.layers import Attention, PatchEmbed, RMSNorm, Rope2D, SwiGLU, unpatchify
from nanogen.models.lightning_dit import Block as EncoderBlock
from nanogen.models.outputs import DiTOutput


@dataclass
class DDTConfig:
    """The reference's ``DiTwDDTHead`` params; pairs are [encoder, decoder]."""

    input_size: int = 16  # latent height = width
    in_channels: int = 768  # latent channels
    patch_size: int | list[int] = field(default_factory=lambda: [1, 1])  # [p_s (encoder), p_x (decoder)]
    hidden_size: int | list[int] = field(default_factory=lambda: [1152, 2048])  # [D_e, D_d]
    depth: int | list[int] = field(default_factory=lambda: [28, 2])  # [L_e, L_d]
    num_heads: int | list[int] = field(default_factory=lambda: [16, 16])  # [h_e, h_d]
    mlp_ratio: float = 4.0
    enable_repa: bool = False  # linear projector after encoder block repa_layer_depth (§4.3)
    repa_layer_depth: int = 8  # 1-based
    z_dim: int | None = None  # width of the representation target (768 for DINOv2-B); REPA / REG only
    enable_reg: bool = False  # REG: a noised CLS token as an extra first token (§4.4)
    num_classes: int = 1000  # label conditioning; index num_classes is the null label
    condition_type: Literal["label", "text"] = "label"
    context_dim: int | None = None  # text conditioning: width of the text encoder's states
    cond_arch: CondArch = field(default_factory=CondArch)
    is_meanflow: bool = False  # MeanFlow: a second time embedder for the absolute time (§4.6)

    def __post_init__(self) -> None:
        # one number means the same value for encoder and decoder
        for name in ("patch_size", "hidden_size", "depth", "num_heads"):
            v = getattr(self, name)
            setattr(self, name, [v, v] if isinstance(v, int) else list(v))

    def check(self) -> None:
        from nanogen.errors import ConfigError

        for name in ("patch_size", "hidden_size", "depth", "num_heads"):
            v = getattr(self, name)
            if len(v) != 2 or any(x < 1 for x in v):
                raise ConfigError(
                    f"stage_2.params.{name}: expected two positive numbers [encoder, decoder], got {v}"
                )
        p_s, p_x = self.patch_size
        for p in (p_s, p_x):
            if self.input_size % p:
                raise ConfigError(
                    f"stage_2.params: input_size {self.input_size} is not divisible by patch_size {p}"
                )
        if self.input_size // p_s != self.input_size // p_x:
            raise ConfigError(
                f"stage_2.params.patch_size: the decoder is modulated token by token by the encoder, so both streams "
                f"need the same grid; input_size {self.input_size} with patch_size {self.patch_size} gives "
                f"{self.input_size // p_s} vs {self.input_size // p_x}"
            )
        for which, D, h in zip(("encoder", "decoder"), self.hidden_size, self.num_heads, strict=True):
            check_common(D, h, f"stage_2.params ({which})")
        if not 1 <= self.repa_layer_depth <= self.depth[0] and self.enable_repa:
            raise ConfigError(
                f"stage_2.params.repa_layer_depth: {self.repa_layer_depth} is outside the encoder's 1..{self.depth[0]} blocks"
            )
        if (self.enable_repa or self.enable_reg) and not self.z_dim:
            raise ConfigError(
                "stage_2.params.z_dim: REPA / REG need z_dim (the representation encoder's width, e.g. 768)"
            )
        if self.condition_type == "text" and not self.context_dim:
            raise ConfigError("stage_2.params: text conditioning needs context_dim (the text encoder width)")

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size[0]


# ----------------------------------------------------------------------------------------------------------
# layers


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class AdaLN(nn.Sequential):
    """SiLU + Linear(D -> n*D), zero-initialised so every modulated branch starts as the identity (AdaLN-Zero).
    A Sequential so the weights are named ``adaln_modulation.1`` as in the reference."""

    def __init__(self, dim: int, n: int):
        super().__init__(nn.SiLU(), nn.Linear(dim, n * dim))
        nn.init.zeros_(self[1].weight)
        nn.init.zeros_(self[1].bias)


# ----------------------------------------------------------------------------------------------------------
# blocks


class DecoderBlock(nn.Module):
    """Pre-norm block with AdaLN-Zero, modulated per token by the encoder's output (§3.2 step 7)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaln_modulation = AdaLN(dim, 6)

    def forward(self, h: Tensor, c: Tensor, rope: Rope2D) -> Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaln_modulation(c).chunk(6, dim=-1)
        h = h + g1 * self.attn(modulate(self.norm1(h), sh1, sc1), rope)
        return h + g2 * self.mlp(modulate(self.norm2(h), sh2, sc2))


class FinalLayer(nn.Module):
    """Per-token AdaLN, then Linear to p*p*C values per patch (zero-init); REG: its own head on token 0."""

    def __init__(self, dim: int, out_dim: int, z_dim: int | None):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.adaln_modulation = AdaLN(dim, 2)
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if z_dim is not None:
            self.cls_linear = nn.Linear(dim, z_dim)
            nn.init.zeros_(self.cls_linear.weight)
            nn.init.zeros_(self.cls_linear.bias)

    def forward(self, h: Tensor, c: Tensor, s0: int) -> tuple[Tensor, Tensor | None]:
        shift, scale = self.adaln_modulation(c).chunk(2, dim=-1)
        h = modulate(self.norm(h), shift, scale)
        cls = self.cls_linear(h[:, 0]) if s0 else None
        return self.linear(h[:, s0:]), cls


# ----------------------------------------------------------------------------------------------------------
# model


class DDT(InContextStem):
    def __init__(self, cfg: DDTConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        (p_s, p_x), (D_e, D_d), (L_e, L_d), (h_e, h_d) = cfg.patch_size, cfg.hidden_size, cfg.depth, cfg.num_heads  # fmt: skip
        self.grid = cfg.grid
        self.num_patches = self.grid**2
        self.build_stem(
            dim=D_e, patch=p_s, in_channels=cfg.in_channels, cond_arch=cfg.cond_arch,
            condition_type=cfg.condition_type, num_classes=cfg.num_classes, context_dim=cfg.context_dim,
            enable_reg=cfg.enable_reg, z_dim=cfg.z_dim, is_meanflow=cfg.is_meanflow,
        )  # fmt: skip
        # One list, encoder blocks first (the reference's ``blocks.{i}`` numbering).
        self.blocks = nn.ModuleList(
            [EncoderBlock(D_e, h_e, cfg.mlp_ratio) for _ in range(L_e)]
            + [DecoderBlock(D_d, h_d, cfg.mlp_ratio) for _ in range(L_d)]
        )
        if cfg.enable_repa:
            self.repa_projector = nn.Linear(D_e, cfg.z_dim)  # type: ignore[arg-type]
        # The bridge: encoder tokens -> decoder width (identity when the widths agree).
        self.s_projector = nn.Linear(D_e, D_d) if D_e != D_d else nn.Identity()
        self.x_embedder = PatchEmbed(p_x, cfg.in_channels, D_d)
        if cfg.enable_reg:
            self.cls_in_proj_dec = nn.Linear(cfg.z_dim, D_d)  # type: ignore[arg-type]
            self.cls_in_norm_dec = RMSNorm(D_d)
        self.final_layer = FinalLayer(D_d, p_x * p_x * cfg.in_channels, cfg.z_dim if cfg.enable_reg else None)
        self.enc_rope = Rope2D(self.grid, D_e // h_e, n_before=self.n_before, n_after=self.n_after)
        self.dec_rope = Rope2D(self.grid, D_d // h_d, n_before=self.n_before)

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
        """x: (B, C, H, W) noisy input; t: (B,) in [0, 1] (1 = noise; MeanFlow: the interval t - r); cond: labels
        (B,) or text states (B, L, context_dim); cond_mask: (B, L) bool text mask (True = real token), None when
        nothing is padded; cls_t: (B, z_dim) noised REG token; t_abs: (B,) absolute time (MeanFlow).

        Returns the output tensor, or a ``DiTOutput`` when the model has a REG token or ``return_repa`` is set.
        """
        cfg = self.cfg
        L_e = cfg.depth[0]
        s0 = self.n_before
        n = s0 + self.num_patches  # REG token + patches: the tokens the decoder continues
        s, mask, e = self.embed(x, t, cond, cond_mask, cls_t, t_abs)
        s, z = self.run_blocks(s, self.blocks[:L_e], self.enc_rope, mask, return_repa)
        c = self.s_projector(F.silu(e.to(s.dtype) + s[:, :n]))  # per-token condition for the decoder
        h = self.x_embedder(x)
        if cfg.enable_reg:
            h = torch.cat([self.cls_in_norm_dec(self.cls_in_proj_dec(cls_t.to(h.dtype)))[:, None], h], dim=1)  # type: ignore[union-attr]
        for block in self.blocks[L_e:]:
            h = block(h, c, self.dec_rope)
        out, cls = self.final_layer(h, c, s0)
        return self.package(unpatchify(out, cfg.patch_size[1], cfg.in_channels), cls, z, return_repa)

# ----------------------------------------------------------------------------------------------------------
# named sizes ([encoder, decoder] width, depth, heads). DDT-XL is every DiffusionBench model at 256 px
# (``ddt-en28d1152hd72-dn2d2048hd128``: head dims 72 and 128); the 512-px T2I models widen the encoder to 1584.

SIZES: dict[str, dict[str, list[int]]] = {
    "DDT-XS": {"hidden_size": [128, 192], "depth": [4, 1], "num_heads": [4, 4]},  # the nano tier
    "DDT-S": {"hidden_size": [384, 512], "depth": [12, 2], "num_heads": [6, 8]},
    "DDT-B": {"hidden_size": [768, 1024], "depth": [12, 2], "num_heads": [12, 16]},
    "DDT-XL": {"hidden_size": [1152, 2048], "depth": [28, 2], "num_heads": [16, 16]},
}
