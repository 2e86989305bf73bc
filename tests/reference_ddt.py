"""Independent float64 oracle of the reference DDT forward pass ("DiTwDDTHead" of DiffusionBench).

Written directly from the spec (reference.md sections 3.1, 3.2 and 4.6; reference-params.md "State-dict layout of the
reference DDT"). It works on a state dict in the REFERENCE key layout and deliberately does not import anything from
``nanogen``: tests load the same random state dict into nanogen's model and compare the two forward passes.

The code is kept plain on purpose (explicit formulas, float64, no fused kernels):
  * RoPE angles are computed here from the formula and applied as complex multiplications; the ``*_rope.freqs_*`` buffers
    of the state dict are never read by the forward.
  * Attention is an explicit softmax(q k^T / sqrt(d_h) + additive_key_mask) v.
  * Patch embedding and unpatchify are written with explicit index bookkeeping (einsum / loops).

Public API: ``RefCfg``, ``reference_shapes``, ``reference_state_dict``, ``reference_forward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RMS_EPS = 1e-6
ROPE_THETA = 10000.0
FOURIER_DIM = 256  # size of the fixed Gaussian-Fourier vector W (the features are [sin, cos] -> 512)


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class RefCfg:
    input_size: int
    in_channels: int
    patch: int  # the same patch size for both streams (p_s = p_x)
    hidden: tuple[int, int]  # (D_e, D_d)
    depth: tuple[int, int]  # (L_e, L_d)
    heads: tuple[int, int]  # (h_e, h_d)
    mlp_ratio: float = 4.0
    condition_type: str = "label"  # "label" | "text"
    num_classes: int = 10
    context_dim: int | None = None  # text only
    n_t: int = 4
    n_c: int = 8  # label: number of learnable class tokens; text: number of text tokens
    enable_reg: bool = False
    z_dim: int | None = None  # REG cls dim and/or REPA target dim
    is_meanflow: bool = False
    enable_repa: bool = False
    repa_layer_depth: int = (
        1  # 1-based; REPA projector keys: "repa_projector.weight/bias" (Linear D_e -> z_dim)
    )


def _grid(cfg: RefCfg) -> int:
    assert cfg.input_size % cfg.patch == 0, "input_size must be divisible by the patch size"
    return cfg.input_size // cfg.patch


def _num_patches(cfg: RefCfg) -> int:
    return _grid(cfg) ** 2


def _head_dims(cfg: RefCfg) -> tuple[int, int]:
    d_e, d_d = cfg.hidden
    h_e, h_d = cfg.heads
    assert d_e % h_e == 0 and d_d % h_d == 0
    return d_e // h_e, d_d // h_d


def _swiglu_hidden(cfg: RefCfg, dim: int) -> int:
    # spec 3.1: h = int(2/3 * mlp_ratio * D)   (1152 -> 3072, 1584 -> 4224, 2048 -> 5461)
    return int(2 / 3 * cfg.mlp_ratio * dim)


def _s0(cfg: RefCfg) -> int:
    return 1 if cfg.enable_reg else 0


def _enc_len(cfg: RefCfg) -> int:
    # [REG] + N patches + n_t time tokens + (MeanFlow: n_t t_abs tokens) + n_c condition tokens
    return _s0(cfg) + _num_patches(cfg) + cfg.n_t + (cfg.n_t if cfg.is_meanflow else 0) + cfg.n_c


def _dec_len(cfg: RefCfg) -> int:
    return _s0(cfg) + _num_patches(cfg)


# ---------------------------------------------------------------------------------------------------------------------
# State-dict layout (key -> shape), in the order of reference-params.md
# ---------------------------------------------------------------------------------------------------------------------


def reference_shapes(cfg: RefCfg) -> dict[str, tuple[int, ...]]:
    """Every key of the reference state dict for ``cfg`` with its shape (nothing is allocated)."""
    d_e, d_d = cfg.hidden
    l_e, l_d = cfg.depth
    hd_e, hd_d = _head_dims(cfg)
    c, p = cfg.in_channels, cfg.patch
    if cfg.condition_type not in ("label", "text"):
        raise ValueError(f"unknown condition_type {cfg.condition_type!r}")
    if (cfg.enable_reg or cfg.enable_repa) and cfg.z_dim is None:
        raise ValueError("REG / REPA need z_dim")

    s: dict[str, tuple[int, ...]] = {}
    s["s_embedder.proj.weight"] = (d_e, c, p, p)
    s["s_embedder.proj.bias"] = (d_e,)
    s["x_embedder.proj.weight"] = (d_d, c, p, p)
    s["x_embedder.proj.bias"] = (d_d,)
    if d_e != d_d:
        s["s_projector.weight"] = (d_d, d_e)
        s["s_projector.bias"] = (d_d,)
    t_names = ["t_embedder"] + (["t_abs_embedder"] if cfg.is_meanflow else [])
    for name in t_names:
        s[f"{name}.W"] = (FOURIER_DIM,)
        s[f"{name}.learnable_tokens"] = (cfg.n_t, d_e)
        s[f"{name}.mlp.0.weight"] = (d_e, 2 * FOURIER_DIM)
        s[f"{name}.mlp.0.bias"] = (d_e,)
        s[f"{name}.mlp.2.weight"] = (d_e, d_e)
        s[f"{name}.mlp.2.bias"] = (d_e,)
    if cfg.condition_type == "label":
        s["ctx_embedder.learnable_tokens"] = (cfg.n_c, d_e)
        s["ctx_embedder.embedding_table.weight"] = (cfg.num_classes + 1, d_e)
    else:
        if cfg.context_dim is None:
            raise ValueError("text conditioning needs context_dim")
        s["ctx_embedder.norm.weight"] = (cfg.context_dim,)
        s["ctx_embedder.proj.weight"] = (d_e, cfg.context_dim)
        s["ctx_embedder.proj.bias"] = (d_e,)
    for i in range(l_e + l_d):
        dec = i >= l_e
        dim, hd = (d_d, hd_d) if dec else (d_e, hd_e)
        hid = _swiglu_hidden(cfg, dim)
        b = f"blocks.{i}."
        s[b + "norm1.weight"] = (dim,)
        s[b + "norm2.weight"] = (dim,)
        for lin in ("q", "k", "v", "proj"):
            s[b + f"attn.{lin}.weight"] = (dim, dim)
            s[b + f"attn.{lin}.bias"] = (dim,)
        s[b + "attn.q_norm.weight"] = (hd,)
        s[b + "attn.k_norm.weight"] = (hd,)
        s[b + "mlp.w1.weight"] = (hid, dim)
        s[b + "mlp.w1.bias"] = (hid,)
        s[b + "mlp.w2.weight"] = (hid, dim)
        s[b + "mlp.w2.bias"] = (hid,)
        s[b + "mlp.w3.weight"] = (dim, hid)
        s[b + "mlp.w3.bias"] = (dim,)
        if dec:
            s[b + "adaln_modulation.1.weight"] = (6 * dim, dim)
            s[b + "adaln_modulation.1.bias"] = (6 * dim,)
    s["final_layer.norm.weight"] = (d_d,)
    s["final_layer.linear.weight"] = (p * p * c, d_d)
    s["final_layer.linear.bias"] = (p * p * c,)
    s["final_layer.adaln_modulation.1.weight"] = (2 * d_d, d_d)
    s["final_layer.adaln_modulation.1.bias"] = (2 * d_d,)
    if cfg.enable_reg:
        s["final_layer.cls_linear.weight"] = (cfg.z_dim, d_d)
        s["final_layer.cls_linear.bias"] = (cfg.z_dim,)
    s["enc_rope.freqs_cos"] = (_enc_len(cfg), hd_e)
    s["enc_rope.freqs_sin"] = (_enc_len(cfg), hd_e)
    s["dec_rope.freqs_cos"] = (_dec_len(cfg), hd_d)
    s["dec_rope.freqs_sin"] = (_dec_len(cfg), hd_d)
    if cfg.enable_reg:
        s["cls_in_proj_enc.weight"] = (d_e, cfg.z_dim)
        s["cls_in_proj_enc.bias"] = (d_e,)
        s["cls_in_norm_enc.weight"] = (d_e,)
        s["cls_in_proj_dec.weight"] = (d_d, cfg.z_dim)
        s["cls_in_proj_dec.bias"] = (d_d,)
        s["cls_in_norm_dec.weight"] = (d_d,)
    if cfg.enable_repa:
        # Not in any listing of reference-params.md (no shipped config enables REPA); name fixed by the test brief.
        s["repa_projector.weight"] = (cfg.z_dim, d_e)
        s["repa_projector.bias"] = (cfg.z_dim,)
    return s


def is_rope_buffer(key: str) -> bool:
    return key.startswith(("enc_rope.", "dec_rope."))


def reference_param_count(cfg: RefCfg) -> int:
    """Number of parameters (every key except the RoPE buffers), from shapes only."""
    return sum(math.prod(shape) for k, shape in reference_shapes(cfg).items() if not is_rope_buffer(k))


# ---------------------------------------------------------------------------------------------------------------------
# RoPE angles (computed from the spec formula; used by the oracle AND to fill the reference-style buffers)
# ---------------------------------------------------------------------------------------------------------------------


def _rope_angles(grid: int, head_dim: int, n_front: int, n_back: int) -> torch.Tensor:
    """Angle phi[l, i] (float64, shape [n_front + grid^2 + n_back, head_dim // 2]) of pair i (dims 2i, 2i+1) of token l.

    Vision token (row a, col b), row-major: pair i < Q rotates by a * w_i, pair Q + i by b * w_i, with
    P = head_dim / 2, Q = P / 2, w_k = theta^(-4k / head_dim). Non-vision tokens (front: REG; back: time / t_abs /
    condition tokens) get angle 0.
    """
    assert head_dim % 4 == 0, "2-D RoPE needs head_dim divisible by 4"
    n_pairs = head_dim // 2
    q = n_pairs // 2
    omegas = [math.pow(ROPE_THETA, -4.0 * k / head_dim) for k in range(q)]
    total = n_front + grid * grid + n_back
    phi = torch.zeros(total, n_pairs, dtype=torch.float64)
    for a in range(grid):
        for b_ in range(grid):
            tok = n_front + a * grid + b_
            for i in range(q):
                phi[tok, i] = a * omegas[i]
                phi[tok, q + i] = b_ * omegas[i]
    return phi


def _enc_angles(cfg: RefCfg) -> torch.Tensor:
    n_back = cfg.n_t + (cfg.n_t if cfg.is_meanflow else 0) + cfg.n_c
    return _rope_angles(_grid(cfg), _head_dims(cfg)[0], _s0(cfg), n_back)


def _dec_angles(cfg: RefCfg) -> torch.Tensor:
    return _rope_angles(_grid(cfg), _head_dims(cfg)[1], _s0(cfg), 0)


def _interleaved_tables(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference-style buffers: [L, head_dim] with cos(phi_i) at dims 2i and 2i+1 (sin likewise)."""
    cos = torch.repeat_interleave(torch.cos(phi), 2, dim=-1)
    sin = torch.repeat_interleave(torch.sin(phi), 2, dim=-1)
    return cos.float(), sin.float()


# ---------------------------------------------------------------------------------------------------------------------
# Random state dict
# ---------------------------------------------------------------------------------------------------------------------


def _is_rmsnorm_weight(key: str) -> bool:
    return key.endswith(
        (
            "norm1.weight",
            "norm2.weight",
            "q_norm.weight",
            "k_norm.weight",
            "final_layer.norm.weight",
            "ctx_embedder.norm.weight",
            "cls_in_norm_enc.weight",
            "cls_in_norm_dec.weight",
        )
    )


def reference_state_dict(cfg: RefCfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every key of the reference layout for ``cfg``, float32, randomly filled with a seeded generator.

    Linear/conv weights ~ N(0, std 1/sqrt(fan_in)); biases ~ N(0, std 0.1); RMSNorm weights ~ 1 + N(0, std 0.1);
    learnable tokens ~ N(0, std 1/sqrt(D)); t_embedder.W (and t_abs_embedder.W) ~ N(0, 1); label table ~ N(0, std 0.5).
    The layers the reference zero-initialises (decoder AdaLN linears, final AdaLN, final linear, cls_linear) are random
    too. The RoPE buffers hold reference-style interleaved cos/sin tables (the oracle forward never reads them).
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = reference_shapes(cfg)
    sd: dict[str, torch.Tensor] = {}
    enc_cos, enc_sin = _interleaved_tables(_enc_angles(cfg))
    dec_cos, dec_sin = _interleaved_tables(_dec_angles(cfg))
    rope = {
        "enc_rope.freqs_cos": enc_cos,
        "enc_rope.freqs_sin": enc_sin,
        "dec_rope.freqs_cos": dec_cos,
        "dec_rope.freqs_sin": dec_sin,
    }

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    for key, shape in shapes.items():
        if key in rope:
            assert tuple(rope[key].shape) == shape, (key, rope[key].shape, shape)
            sd[key] = rope[key].clone()
        elif key.endswith(".W"):
            sd[key] = randn(shape)
        elif key.endswith("learnable_tokens"):
            sd[key] = randn(shape) / math.sqrt(shape[-1])
        elif key == "ctx_embedder.embedding_table.weight":
            sd[key] = randn(shape) * 0.5
        elif _is_rmsnorm_weight(key):
            sd[key] = 1.0 + 0.1 * randn(shape)
        elif key.endswith(".bias"):
            sd[key] = 0.1 * randn(shape)
        elif key.endswith(".weight"):
            fan_in = math.prod(shape[1:])
            sd[key] = randn(shape) / math.sqrt(fan_in)
        else:  # pragma: no cover - every key of the layout is covered above
            raise KeyError(key)
    return sd


# ---------------------------------------------------------------------------------------------------------------------
# Plain float64 building blocks
# ---------------------------------------------------------------------------------------------------------------------


def _linear(P: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    w = P[name + ".weight"]  # (out, in)
    y = torch.einsum("...i,oi->...o", x, w)
    bias = P.get(name + ".bias")
    if bias is not None:
        y = y + bias
    return y


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    ms = (x * x).mean(dim=-1, keepdim=True)
    return x / torch.sqrt(ms + RMS_EPS) * weight


def _swiglu(P: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    a = _linear(P, prefix + "w1", x)
    g = _linear(P, prefix + "w2", x)
    return _linear(P, prefix + "w3", _silu(a) * g)


def _apply_rope(x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, d); phi: (L, d/2). Pair (x[2i], x[2i+1]) is read as the complex number x[2i] + j*x[2i+1] and
    multiplied by exp(j*phi_i):  (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    z = torch.complex(x[..., 0::2], x[..., 1::2])  # (B, H, L, d/2)
    rot = torch.polar(torch.ones_like(phi), phi)  # exp(j*phi), (L, d/2)
    zr = z * rot
    out = torch.empty_like(x)
    out[..., 0::2] = zr.real
    out[..., 1::2] = zr.imag
    return out


def _attention(
    P: dict[str, torch.Tensor],
    prefix: str,
    x: torch.Tensor,
    n_heads: int,
    phi: torch.Tensor,
    add_mask: torch.Tensor | None,
) -> torch.Tensor:
    """QK-norm attention. x: (B, L, D); add_mask: additive key mask (B, L) or None."""
    bsz, seq, dim = x.shape
    hd = dim // n_heads

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, hd); head h = dims [h*hd, (h+1)*hd)
        return t.reshape(bsz, seq, n_heads, hd).permute(0, 2, 1, 3)

    q = heads(_linear(P, prefix + "q", x))
    k = heads(_linear(P, prefix + "k", x))
    v = heads(_linear(P, prefix + "v", x))
    q = _rmsnorm(q, P[prefix + "q_norm.weight"])
    k = _rmsnorm(k, P[prefix + "k_norm.weight"])
    q = _apply_rope(q, phi)
    k = _apply_rope(k, phi)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(hd)
    if add_mask is not None:
        scores = scores + add_mask[:, None, None, :]
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    o = torch.einsum("bhqk,bhkd->bhqd", weights, v)
    o = o.permute(0, 2, 1, 3).reshape(bsz, seq, dim)
    return _linear(P, prefix + "proj", o)


def _fourier_mlp(P: dict[str, torch.Tensor], name: str, t: torch.Tensor) -> torch.Tensor:
    """Plain e(t) = mlp.2(silu(mlp.0([sin(2 pi t W), cos(2 pi t W)]))), t raw in [0, 1]. Returns (B, D)."""
    arg = 2.0 * math.pi * t[:, None] * P[name + ".W"][None, :]  # (B, 256)
    feats = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)  # sin first, then cos
    h = _silu(_linear(P, name + ".mlp.0", feats))
    return _linear(P, name + ".mlp.2", h)


def _time_tokens(P: dict[str, torch.Tensor], name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e = _fourier_mlp(P, name, t)  # (B, D)
    tokens = P[name + ".learnable_tokens"][None, :, :] + e[:, None, :]  # (B, n_t, D)
    return tokens, e[:, None, :]


def _patch_embed(P: dict[str, torch.Tensor], name: str, x: torch.Tensor, p: int) -> torch.Tensor:
    """Conv2d(kernel = stride = p) as an explicit sum over each p x p window, tokens in row-major order."""
    bsz, c, hgt, wid = x.shape
    gh, gw = hgt // p, wid // p
    # windows[b, a, bb, c, i, j] = x[b, c, a*p + i, bb*p + j]
    windows = x.reshape(bsz, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
    w = P[name + ".proj.weight"]  # (D, C, p, p)
    out = torch.einsum("bxycij,dcij->bxyd", windows, w) + P[name + ".proj.bias"]
    return out.reshape(bsz, gh * gw, -1)


def _unpatchify(tokens: torch.Tensor, c: int, p: int, grid: int) -> torch.Tensor:
    """tokens (B, grid*grid, p*p*C), each vector laid out as (p_row, p_col, C) -> image (B, C, grid*p, grid*p)."""
    bsz = tokens.shape[0]
    img = tokens.new_zeros(bsz, c, grid * p, grid * p)
    for a in range(grid):
        for b_ in range(grid):
            vec = tokens[:, a * grid + b_, :].reshape(bsz, p, p, c)  # [b, p_row, p_col, C]
            img[:, :, a * p : (a + 1) * p, b_ * p : (b_ + 1) * p] = vec.permute(0, 3, 1, 2)
    return img


# ---------------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------------


def reference_forward(
    sd: dict[str, torch.Tensor],
    cfg: RefCfg,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    cond_mask: torch.Tensor | None = None,
    cls_t: torch.Tensor | None = None,
    t_abs: torch.Tensor | None = None,
    return_repa: bool = False,
):
    """float64 forward of the reference DDT on a reference-layout state dict.

    x (B, C, H, W); t (B,) in [0, 1]; cond: labels (B,) int64 or text states (B, n_c, context_dim);
    cond_mask: (B, n_c) bool (True = real token) or None; cls_t (B, z_dim) for REG; t_abs (B,) for MeanFlow.
    Returns x_out (B, C, H, W) float64, or (x_out, cls_pred) with REG; with return_repa z_pred (B, s0+N, z_dim) is
    appended (always a tuple then).
    """
    dev = x.device
    P = {k: v.to(device=dev, dtype=torch.float64) for k, v in sd.items() if not is_rope_buffer(k)}
    d_e, d_d = cfg.hidden
    l_e, l_d = cfg.depth
    h_e, h_d = cfg.heads
    p, c_in = cfg.patch, cfg.in_channels
    grid = _grid(cfg)
    n = grid * grid
    s0 = _s0(cfg)
    x = x.to(torch.float64)
    t = t.to(device=dev, dtype=torch.float64)
    bsz = x.shape[0]
    assert x.shape[1:] == (c_in, cfg.input_size, cfg.input_size), x.shape
    if return_repa and not cfg.enable_repa:
        raise ValueError("return_repa needs cfg.enable_repa")

    # --- 1. encoder sequence: [REG] + patches + time tokens + (MF: t_abs tokens) + condition tokens -----------------
    parts = []
    if cfg.enable_reg:
        if cls_t is None:
            raise ValueError("REG model needs cls_t")
        cls64 = cls_t.to(device=dev, dtype=torch.float64)
        reg_e = _rmsnorm(_linear(P, "cls_in_proj_enc", cls64), P["cls_in_norm_enc.weight"])
        parts.append(reg_e[:, None, :])
    parts.append(_patch_embed(P, "s_embedder", x, p))
    t_tokens, e_base = _time_tokens(P, "t_embedder", t)
    parts.append(t_tokens)
    if cfg.is_meanflow:
        if t_abs is None:
            raise ValueError("MeanFlow model needs t_abs")
        t_abs_tokens, _ = _time_tokens(P, "t_abs_embedder", t_abs.to(device=dev, dtype=torch.float64))
        parts.append(t_abs_tokens)
    if cfg.condition_type == "label":
        y = cond.to(device=dev, dtype=torch.long)
        table = P["ctx_embedder.embedding_table.weight"]
        c_tokens = P["ctx_embedder.learnable_tokens"][None, :, :] + table[y][:, None, :]
    else:
        h_txt = cond.to(device=dev, dtype=torch.float64)
        assert h_txt.shape[1] == cfg.n_c, (h_txt.shape, cfg.n_c)
        c_tokens = _linear(P, "ctx_embedder.proj", _rmsnorm(h_txt, P["ctx_embedder.norm.weight"]))
    parts.append(c_tokens)
    s = torch.cat(parts, dim=1)
    seq = s.shape[1]
    assert seq == _enc_len(cfg), (seq, _enc_len(cfg))

    # --- 2. additive key mask: ones everywhere, the condition positions (the last n_c) take cond_mask --------------
    keep = torch.ones(bsz, seq, dtype=torch.float64, device=dev)
    if cond_mask is not None:
        assert cond_mask.shape == (bsz, cfg.n_c), cond_mask.shape
        keep[:, seq - cfg.n_c :] = cond_mask.to(device=dev, dtype=torch.float64)
    add_mask = (1.0 - keep) * torch.finfo(torch.float64).min

    # --- 3./4. encoder blocks (pre-norm, no AdaLN), REPA tap --------------------------------------------------------
    phi_e = _enc_angles(cfg).to(dev)
    z_pred = None
    for i in range(l_e):
        b = f"blocks.{i}."
        s = s + _attention(P, b + "attn.", _rmsnorm(s, P[b + "norm1.weight"]), h_e, phi_e, add_mask)
        s = s + _swiglu(P, b + "mlp.", _rmsnorm(s, P[b + "norm2.weight"]))
        if cfg.enable_repa and i + 1 == cfg.repa_layer_depth:
            z_pred = _linear(P, "repa_projector", s[:, : s0 + n])

    # --- 5. bridge: per-token condition from the encoder's [REG] + patch tokens -----------------------------------
    bridge = _silu(e_base + s[:, : s0 + n])
    c = _linear(P, "s_projector", bridge) if d_e != d_d else bridge  # (B, s0+N, D_d)
    c_act = _silu(c)

    # --- 6. decoder input: fresh patch embedding of the noisy x at D_d, [REG] prepended ----------------------------
    h = _patch_embed(P, "x_embedder", x, p)
    if cfg.enable_reg:
        reg_d = _rmsnorm(_linear(P, "cls_in_proj_dec", cls64), P["cls_in_norm_dec.weight"])
        h = torch.cat([reg_d[:, None, :], h], dim=1)

    # --- 7. decoder blocks: AdaLN-Zero with per-token modulation, no mask -----------------------------------------
    phi_d = _dec_angles(cfg).to(dev)
    for i in range(l_e, l_e + l_d):
        b = f"blocks.{i}."
        mod = _linear(P, b + "adaln_modulation.1", c_act)  # (B, s0+N, 6 D_d)
        sh1, sc1, g1, sh2, sc2, g2 = (mod[..., k * d_d : (k + 1) * d_d] for k in range(6))
        a_in = _rmsnorm(h, P[b + "norm1.weight"]) * (1.0 + sc1) + sh1
        h = h + g1 * _attention(P, b + "attn.", a_in, h_d, phi_d, None)
        m_in = _rmsnorm(h, P[b + "norm2.weight"]) * (1.0 + sc2) + sh2
        h = h + g2 * _swiglu(P, b + "mlp.", m_in)

    # --- 8. final layer -------------------------------------------------------------------------------------------
    mod = _linear(P, "final_layer.adaln_modulation.1", c_act)  # (B, s0+N, 2 D_d)
    sh, sc = mod[..., :d_d], mod[..., d_d:]
    h = _rmsnorm(h, P["final_layer.norm.weight"]) * (1.0 + sc) + sh
    out_tokens = _linear(P, "final_layer.linear", h[:, s0:])  # (B, N, p*p*C)
    x_out = _unpatchify(out_tokens, c_in, p, grid)

    # --- 9. outputs -----------------------------------------------------------------------------------------------
    outs = [x_out]
    if cfg.enable_reg:
        outs.append(_linear(P, "final_layer.cls_linear", h[:, 0]))
    if return_repa:
        assert z_pred is not None, "repa_layer_depth must be within 1..L_e"
        outs.append(z_pred)
    return outs[0] if len(outs) == 1 else tuple(outs)


# ---------------------------------------------------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------------------------------------------------

_PARAMS_MD = "/work/shared/spec/reference-params.md"

# (cfg, heading fragment in reference-params.md, parameter count from its table)
_FULL_CONFIGS = {
    "sdvae-mse label": (
        RefCfg(32, 4, 2, (1152, 2048), (28, 2), (16, 16), condition_type="label", num_classes=1000),
        "### imagenet sdvae-mse",
        611_304_996,
    ),
    "t2i sdvae-mse text": (
        RefCfg(32, 4, 2, (1152, 2048), (28, 2), (16, 16), condition_type="text", context_dim=1024, n_c=256),
        "### t2i sdvae-mse",
        611_324_452,
    ),
    "rae-dinov2 REG": (
        RefCfg(16, 768, 1, (1152, 2048), (28, 2), (16, 16), num_classes=1000, enable_reg=True, z_dim=768),
        "### imagenet rae-dinov2 + REG",
        619_289_876,
    ),
    "MeanFlow": (
        RefCfg(32, 4, 2, (1152, 2048), (28, 2), (16, 16), num_classes=1000, is_meanflow=True),
        "### imagenet MeanFlow",
        613_229_092,
    ),
}


def _parse_params_md(path: str, heading: str) -> dict[str, tuple[int, ...]]:
    import re

    with open(path) as fh:
        lines = fh.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    out: dict[str, tuple[int, ...]] = {}
    pat = re.compile(r"^- `([^`]+)` \[([0-9, ]+)\](?:\s+\(i = (\d+)\.\.(\d+)\))?\s*$")
    for line in lines[start + 1 :]:
        if line.startswith("### "):
            break
        m = pat.match(line)
        if not m:
            continue
        key, shape = m.group(1), tuple(int(v) for v in m.group(2).split(","))
        if m.group(3) is not None:
            for i in range(int(m.group(3)), int(m.group(4)) + 1):
                out[key.replace("{i}", str(i))] = shape
        else:
            out[key] = shape
    return out


def _self_check() -> None:
    import os

    torch.manual_seed(0)
    small = dict(input_size=8, in_channels=3, patch=2, depth=(2, 2), heads=(2, 2))
    cases = {
        "label": RefCfg(hidden=(32, 48), **small),
        "text+mask": RefCfg(hidden=(32, 48), condition_type="text", context_dim=24, n_c=5, **small),
        "REG": RefCfg(hidden=(32, 48), enable_reg=True, z_dim=12, **small),
        "MeanFlow": RefCfg(hidden=(32, 48), is_meanflow=True, **small),
        "D_e==D_d (no s_projector)": RefCfg(hidden=(32, 32), **small),
        "REG+REPA": RefCfg(
            hidden=(32, 48), enable_reg=True, z_dim=12, enable_repa=True, repa_layer_depth=1, **small
        ),
    }
    bsz = 3
    for name, cfg in cases.items():
        sd = reference_state_dict(cfg, seed=1)
        shapes = reference_shapes(cfg)
        assert list(sd) == list(shapes) and all(tuple(sd[k].shape) == shapes[k] for k in sd)
        assert ("s_projector.weight" in sd) == (cfg.hidden[0] != cfg.hidden[1])
        x = torch.randn(bsz, cfg.in_channels, cfg.input_size, cfg.input_size)
        t = torch.rand(bsz)
        if cfg.condition_type == "label":
            cond = torch.tensor([0, 3, cfg.num_classes])[:bsz]
            mask = None
        else:
            cond = torch.randn(bsz, cfg.n_c, cfg.context_dim)
            mask = torch.ones(bsz, cfg.n_c, dtype=torch.bool)
            mask[0, 2:] = False
            mask[1, :] = False
        cls_t = torch.randn(bsz, cfg.z_dim) if cfg.enable_reg else None
        t_abs = torch.rand(bsz) if cfg.is_meanflow else None
        out = reference_forward(sd, cfg, x, t, cond, mask, cls_t, t_abs, return_repa=cfg.enable_repa)
        outs = out if isinstance(out, tuple) else (out,)
        assert all(torch.isfinite(o).all() for o in outs)
        print(
            f"{name:28s}", [tuple(o.shape) for o in outs], "|x_out|mean", f"{outs[0].abs().mean().item():.4f}"
        )
        if name == "text+mask":
            # masked text tokens must not influence the output: change them and compare
            cond2 = cond.clone()
            cond2[0, 2:] = torch.randn_like(cond2[0, 2:])
            cond2[1] = torch.randn_like(cond2[1])
            out2 = reference_forward(sd, cfg, x, t, cond2, mask)
            assert torch.allclose(out, out2, atol=1e-12), "masked tokens leaked"
            print(f"{'':28s} masked condition tokens have no effect: OK")

    # RoPE: the interleaved buffers agree with the oracle's own angles, and rotations preserve norms.
    cfg = cases["REG"]
    sd = reference_state_dict(cfg)
    phi = _enc_angles(cfg)
    assert torch.allclose(sd["enc_rope.freqs_cos"][:, 0::2].double(), torch.cos(phi), atol=1e-6)
    assert torch.allclose(sd["enc_rope.freqs_sin"][:, 1::2].double(), torch.sin(phi), atol=1e-6)
    assert (phi[0] == 0).all() and (phi[_s0(cfg) + _num_patches(cfg) :] == 0).all()

    # Full-size layouts vs reference-params.md, by shapes only (nothing allocated).
    for name, (cfg, heading, n_params) in _FULL_CONFIGS.items():
        shapes = reference_shapes(cfg)
        count = reference_param_count(cfg)
        assert count == n_params, (name, count, n_params)
        if os.path.exists(_PARAMS_MD):
            listed = _parse_params_md(_PARAMS_MD, heading)
            missing, extra = sorted(set(listed) - set(shapes)), sorted(set(shapes) - set(listed))
            bad = sorted(k for k in set(listed) & set(shapes) if listed[k] != shapes[k])
            assert not (missing or extra or bad), (name, missing[:5], extra[:5], bad[:5])
            note = f"{len(listed)} keys match reference-params.md"
        else:
            note = "reference-params.md not found; key listing not compared"
        print(f"full layout {name:20s} params {count:,} OK; {note}")
    print("self-check passed")


if __name__ == "__main__":
    _self_check()
