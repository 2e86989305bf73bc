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
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.models.in_context import CondArch, InContextStem, check_common
from nanogen.models.layers import Attention, RMSNorm, Rope2D, SwiGLU, unpatchify
from nanogen.models.lightning_dit import Block as EncoderBlock


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
                raise ConfigError(f"stage_2.params.{name}: expected two positive numbers [encoder, decoder], got {v}")
        p_s, p_x = self.patch_size
        for p in (p_s, p_x):
            if self.input_size % p:
                raise ConfigError(f"stage_2.params: input_size {self.input_size} is not divisible by patch_size {p}")
        if self.input_size // p_s != self.input_size // p_x:
            raise ConfigError(
                f"stage_2.params.patch_size: the decoder is modulated token by token by the encoder, so both streams "
                f"need the same grid; input_size {self.input_size} with patch_size {self.patch_size} gives "
                f"{self.input_size // p_s} vs {self.input_size // p_x}"
            )
        for which, D, h in zip(("encoder", "decoder"), self.hidden_size, self.num_heads):
            check_common(D, h, f"stage_2.params ({which})")
        if not 1 <= self.repa_layer_depth <= self.depth[0] and self.enable_repa:
            raise ConfigError(
                f"stage_2.params.repa_layer_depth: {self.repa_layer_depth} is outside the encoder's 1..{self.depth[0]} blocks"
            )
        if (self.enable_repa or self.enable_reg) and not self.z_dim:
            raise ConfigError("stage_2.params.z_dim: REPA / REG need z_dim (the representation encoder's width, e.g. 768)")
        if self.condition_type == "text" and not self.context_dim:
            raise ConfigError("stage_2.params: text conditioning needs context_dim (the text encoder width)")

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size[0]


# ----------------------------------------------------------------------------------------------------------
# named sizes ([encoder, decoder] width, depth, heads). DDT-XL is every DiffusionBench model at 256 px
# (``ddt-en28d1152hd72-dn2d2048hd128``: head dims 72 and 128); the 512-px T2I models widen the encoder to 1584.

SIZES: dict[str, dict[str, list[int]]] = {
    "DDT-XS": {"hidden_size": [128, 192], "depth": [4, 1], "num_heads": [4, 4]},  # the nano tier
    "DDT-S": {"hidden_size": [384, 512], "depth": [12, 2], "num_heads": [6, 8]},
    "DDT-B": {"hidden_size": [768, 1024], "depth": [12, 2], "num_heads": [12, 16]},
    "DDT-XL": {"hidden_size": [1152, 2048], "depth": [28, 2], "num_heads": [16, 16]},
}
