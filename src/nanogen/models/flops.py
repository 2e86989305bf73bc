"""Analytic forward FLOPs of the stage-2 networks (spec ``performance.md`` §2.1).

Counted per image as multiply-accumulates of every matmul and convolution (what ``torch.utils.flop_counter``
counts), then FLOPs = 2 * MACs. Norms, activations, RoPE, softmax and embedding lookups are not counted. The
spec's formula is the leading part; the small terms it drops (time MLPs, REG projections, REPA projector) are
included so the total equals ``FlopCounterMode`` exactly (tests check both at small sizes, and the spec's
332.2 / 579.1 / 2,809.2 GFLOPs at full size).

Symbols: N patch tokens, s0 = 1 with a REG token, S = s0 + N + n_t (x2 for MeanFlow) + n_c encoder tokens,
P = p^2 C patch dimension, h = int(2/3 mlp_ratio D) SwiGLU width.
"""

from __future__ import annotations

from nanogen.models.layers import swiglu_hidden

TIME_FREQ_DIM = 256  # Gaussian-Fourier features: sin and cos of 256 frequencies -> 512 inputs


def _stem_macs(
    D: int, n_t_embedders: int, condition_type: str, n_c: int, context_dim: int | None
) -> dict[str, int]:
    macs = {"time_mlp": n_t_embedders * (2 * TIME_FREQ_DIM * D + D * D)}
    if condition_type == "text":
        macs["text_projection"] = n_c * (context_dim or 0) * D
    return macs


def _block_macs(tokens: int, D: int, mlp_ratio: float, adaln: int = 0) -> tuple[int, int]:
    """(linear MACs, attention MACs) of one block over ``tokens`` tokens; ``adaln`` = AdaLN outputs per token / D."""
    h = swiglu_hidden(D, mlp_ratio)
    return tokens * (4 * D * D + 3 * D * h + adaln * D * D), 2 * tokens * tokens * D


def ddt_macs(cfg, *, return_repa: bool = False) -> dict[str, int]:
    """Per-image forward MACs of a ``DDTConfig``, by part."""
    (p_s, p_x), (D_e, D_d), (L_e, L_d) = cfg.patch_size, cfg.hidden_size, cfg.depth
    C, N = cfg.in_channels, cfg.grid**2
    s0 = 1 if cfg.enable_reg else 0
    n_t, n_c = cfg.cond_arch.num_t_tokens, cfg.cond_arch.num_c_tokens
    S = s0 + N + n_t * (2 if cfg.is_meanflow else 1) + n_c
    n = s0 + N  # tokens the decoder sees
    enc_lin, enc_att = _block_macs(S, D_e, cfg.mlp_ratio)
    dec_lin, dec_att = _block_macs(n, D_d, cfg.mlp_ratio, adaln=6)
    macs = {
        "encoder_linear": L_e * enc_lin,
        "encoder_attention": L_e * enc_att,
        "decoder_linear": L_d * dec_lin,
        "decoder_attention": L_d * dec_att,
        "patch_embed": N * (p_s * p_s * C * D_e + p_x * p_x * C * D_d),
        "bridge": n * D_e * D_d if D_e != D_d else 0,
        "final_layer": n * 2 * D_d * D_d + N * D_d * p_x * p_x * C,
        **_stem_macs(D_e, 2 if cfg.is_meanflow else 1, cfg.condition_type, n_c, cfg.context_dim),
    }
    if cfg.enable_reg:  # token in (encoder and decoder) and the cls head out
        macs["reg"] = cfg.z_dim * (D_e + 2 * D_d)
    if return_repa and cfg.enable_repa:
        macs["repa_projector"] = n * D_e * cfg.z_dim
    return macs


def lightning_dit_macs(cfg, *, return_repa: bool = False) -> dict[str, int]:
    """Per-image forward MACs of a ``LightningDiTConfig``, by part."""
    D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    N = (cfg.input_size // p) ** 2
    s0 = 1 if cfg.enable_reg else 0
    n_t, n_c = cfg.cond_arch.num_t_tokens, cfg.cond_arch.num_c_tokens
    S = s0 + N + n_t * (2 if cfg.is_meanflow else 1) + n_c
    lin, att = _block_macs(S, D, cfg.mlp_ratio)
    macs = {
        "blocks_linear": cfg.depth * lin,
        "blocks_attention": cfg.depth * att,
        "patch_embed": N * p * p * C * D,
        "final_layer": N * D * p * p * C,
        **_stem_macs(D, 2 if cfg.is_meanflow else 1, cfg.condition_type, n_c, cfg.context_dim),
    }
    if cfg.enable_reg:
        macs["reg"] = cfg.z_dim * 2 * D
    if return_repa and cfg.enable_repa:
        macs["repa_projector"] = (s0 + N) * D * cfg.z_dim
    return macs


def forward_macs(cfg, *, return_repa: bool = False) -> dict[str, int]:
    from nanogen.models.ddt import DDTConfig

    if isinstance(cfg, DDTConfig):
        return ddt_macs(cfg, return_repa=return_repa)
    return lightning_dit_macs(cfg, return_repa=return_repa)


def forward_flops(cfg, *, return_repa: bool = False) -> int:
    """Forward FLOPs per image (2 x MACs; the convention of FlopCounterMode and of MFU, ``performance.md`` §1)."""
    return 2 * sum(forward_macs(cfg, return_repa=return_repa).values())


def train_flops(cfg) -> int:
    """Model FLOPs of one training sample: forward + backward ~ 3 x forward (``performance.md`` §1)."""
    return 3 * forward_flops(cfg)
