"""Building blocks shared by the stage-2 networks (spec ``reference.md`` §3.1).

RMSNorm, SwiGLU (2/3 width rule), QK-norm attention over SDPA, 2-D RoPE on interleaved pairs,
Gaussian-Fourier time tokens, in-context class/text tokens, patchify/unpatchify. Parameter names follow the
reference's state-dict layout (``reference-params.md``) so released checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _upcast(x: Tensor) -> Tensor:
    """At least fp32 for the sensitive reductions (bf16/fp16 -> fp32), never a downcast (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (§3.1). No bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = _upcast(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU keeps the parameter count of a 4x GELU MLP: hidden = int(2/3 * ratio * dim) (1152 -> 3072)."""
    return int(2 / 3 * mlp_ratio * dim)


class SwiGLU(nn.Module):
    """out = w3(SiLU(w1 x) * w2 x); all three linears have biases (§3.1)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


# ----------------------------------------------------------------------------------------------------------
# 2-D rotary position embedding


def rope_2d_angles(grid: int, head_dim: int, n_before: int, n_after: int, theta: float = 10000.0) -> Tensor:
    """Per-token rotation angles, shape (n_before + grid**2 + n_after, head_dim // 2).

    Pairs are interleaved dims (2i, 2i+1). With P = head_dim/2 pairs and Q = P/2, pair i < Q rotates by
    row * w_i and pair Q + i by col * w_i, with w_k = theta^(-4k / head_dim) (§3.1). Tokens outside the
    vision grid (REG token before, time/condition tokens after) get angle 0, i.e. they are not rotated.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    q = head_dim // 4
    omega = theta ** (-4.0 * torch.arange(q, dtype=torch.float64) / head_dim)
    idx = torch.arange(grid * grid)
    row, col = (idx // grid).double(), (idx % grid).double()
    vision = torch.cat([row[:, None] * omega, col[:, None] * omega], dim=1)  # (N, P)
    pad = lambda n: torch.zeros(n, 2 * q, dtype=torch.float64)
    return torch.cat([pad(n_before), vision, pad(n_after)], dim=0)


def rope_tables(angles: Tensor) -> tuple[Tensor, Tensor]:
    """(L, d/2) angles -> full-width (L, d) tables: cos repeated per pair, sin as (-sin, +sin) per pair.

    The full width matches the reference's ``freqs_cos``/``freqs_sin`` layout ([L, head_dim]) and lets
    ``apply_rope`` work on contiguous tensors (strided even/odd views are several times slower on CPU).
    """
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = torch.stack([-angles.sin(), angles.sin()], dim=-1).flatten(-2)
    return cos.float(), sin.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), as x * cos + swap(x) * sin
    with swap(x0, x1) = (x1, x0) and the signed tables of ``rope_tables``. x: (B, H, L, d)."""
    xf = _upcast(x)
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * cos + swapped * sin).to(x.dtype)


class Rope2D(nn.Module):
    """cos/sin tables for one exact token layout (the grid size is part of the model, as in the reference)."""

    def __init__(self, grid: int, head_dim: int, n_before: int = 0, n_after: int = 0):
        super().__init__()
        cos, sin = rope_tables(rope_2d_angles(grid, head_dim, n_before, n_after))
        # Not persistent: the tables are a pure function of the layout, rebuilt at construction.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return apply_rope(x, self.cos, self.sin)


# ----------------------------------------------------------------------------------------------------------
# attention


class Attention(nn.Module):
    """Separate q/k/v linears (bias), per-head RMSNorm on q and k, RoPE, SDPA, output linear (§3.1).

    ``mask`` is an optional boolean key mask (B, L), True = attend. It is only materialised when a real
    mask exists (padded text), so unmasked inputs reach the fastest SDPA kernels (flash / memory-efficient).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: Rope2D | None = None, mask: Tensor | None = None) -> Tensor:
        B, L, D = x.shape
        heads = lambda t: t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        attn_mask = None if mask is None else mask[:, None, None, :]  # broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


# ----------------------------------------------------------------------------------------------------------
# in-context condition tokens


class TimeTokens(nn.Module):
    """Gaussian-Fourier time embedding as n tokens (§3.1).

    ``W`` ~ N(0, I_256) is fixed (a non-trainable Parameter, so it lives in the state dict). e(t) =
    MLP([sin(2 pi t W), cos(2 pi t W)]); tokens = learnable_tokens + e(t). t is used raw in [0, 1].
    Returns the tokens (B, n, D) and the plain embedding e(t) (B, 1, D) that the DDT bridge reuses.
    """

    def __init__(self, dim: int, n_tokens: int, freq_dim: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(freq_dim) * scale, requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.learnable_tokens = nn.Parameter(torch.randn(n_tokens, dim) / math.sqrt(dim))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        proj = 2 * math.pi * _upcast(t)[:, None] * self.W[None, :]
        e = self.mlp(torch.cat([proj.sin(), proj.cos()], dim=-1).to(self.mlp[0].weight.dtype))[:, None]
        return self.learnable_tokens[None] + e, e


class LabelTokens(nn.Module):
    """Class label as n learnable tokens plus a label embedding; index num_classes is the null label (§3.1)."""

    def __init__(self, dim: int, n_tokens: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.learnable_tokens = nn.Parameter(torch.randn(n_tokens, dim) / math.sqrt(dim))
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, y: Tensor) -> Tensor:
        return self.learnable_tokens[None] + self.embedding_table(y)[:, None]


class TextTokens(nn.Module):
    """Text encoder states -> tokens, one per text token: Linear(RMSNorm(h)) (§3.1). No pooling."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.norm = RMSNorm(context_dim)
        self.proj = nn.Linear(context_dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(self.norm(h))


# ----------------------------------------------------------------------------------------------------------
# patches


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = p, flattened row-major; xavier-uniform on the flattened kernel, bias 0."""

    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


def unpatchify(tokens: Tensor, patch: int, channels: int) -> Tensor:
    """(B, N, p*p*C) laid out as (p_row, p_col, C) -> (B, C, h*p, w*p); square grids only."""
    B, N, _ = tokens.shape
    g = math.isqrt(N)
    x = tokens.view(B, g, g, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, g * patch, g * patch)
