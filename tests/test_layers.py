"""Layers against closed forms (spec reference.md §3.1)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanogen.models.layers import (
    Attention,
    LabelTokens,
    PatchEmbed,
    RMSNorm,
    Rope2D,
    SwiGLU,
    TimeTokens,
    apply_rope,
    rope_2d_angles,
    rope_tables,
    swiglu_hidden,
    unpatchify,
)


def test_rmsnorm_formula():
    n = RMSNorm(16)
    n.weight.data = torch.linspace(0.5, 2, 16)
    x = torch.randn(3, 5, 16)
    ref = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref)


@pytest.mark.parametrize("dim, hidden", [(1152, 3072), (1584, 4224), (2048, 5461)])
def test_swiglu_width_rule(dim, hidden):
    assert swiglu_hidden(dim, 4.0) == hidden  # the numbers of reference.md §3.1


def test_swiglu_formula():
    m = SwiGLU(8, 3.0)
    x = torch.randn(2, 8)
    ref = m.w3(torch.nn.functional.silu(m.w1(x)) * m.w2(x))
    torch.testing.assert_close(m(x), ref)
    assert m.w1.bias is not None and m.w3.bias is not None


def test_rope_angles_layout():
    ang = rope_2d_angles(grid=3, head_dim=8, n_before=1, n_after=2)
    assert ang.shape == (1 + 9 + 2, 4)
    assert torch.all(ang[0] == 0) and torch.all(ang[-2:] == 0)  # REG and condition tokens: unrotated
    # token (row a, col b) = index 1 + 3a + b; pair 0 uses row * w0, pair Q=2 uses col * w0, w_k = 1e4^(-4k/8)
    a, b = 2, 1
    row = ang[1 + 3 * a + b]
    torch.testing.assert_close(row, torch.tensor([a, a * 1e4**-0.5, b, b * 1e4**-0.5], dtype=torch.float64))


@settings(max_examples=20, deadline=None)
@given(shift=st.integers(0, 3), seed=st.integers(0, 1000))
def test_rope_is_relative_along_rows(shift, seed):
    """<R(p) q, R(p') k> depends only on p - p': shifting both tokens by the same offset keeps the score."""
    g = 5
    rope = Rope2D(g, 16)
    torch.manual_seed(seed)
    q, k = torch.randn(16), torch.randn(16)
    x = torch.zeros(1, 1, g * g, 16)
    def score(i, j):
        xq, xk = x.clone(), x.clone()
        xq[0, 0, i], xk[0, 0, j] = q, k
        return (rope(xq)[0, 0, i] * rope(xk)[0, 0, j]).sum()
    base = score(0 * g + 1, 1 * g + 0)
    moved = score((0 + shift) * g + 1, (1 + shift) * g + 0) if 1 + shift < g else base
    torch.testing.assert_close(base, moved, atol=1e-4, rtol=1e-4)


def test_rope_preserves_norm_and_pairs():
    x = torch.randn(2, 3, 7, 8)
    ang = torch.rand(7, 4) * 10
    y = apply_rope(x, *rope_tables(ang))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # interleaved pairs (2i, 2i+1) rotate as complex numbers
    xc = torch.view_as_complex(x.reshape(2, 3, 7, 4, 2).contiguous())
    yc = xc * torch.polar(torch.ones_like(ang), ang)
    torch.testing.assert_close(y, torch.view_as_real(yc).reshape(2, 3, 7, 8))


def test_attention_mask_all_true_equals_no_mask_and_masking_hides_keys():
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(2, 6, 16)
    ones = torch.ones(2, 6, dtype=torch.bool)
    torch.testing.assert_close(attn(x), attn(x, mask=ones))
    mask = ones.clone()
    mask[:, -2:] = False
    y1 = attn(x, mask=mask)
    x2 = x.clone()
    x2[:, -2:] = torch.randn(2, 2, 16)  # change only masked keys: unmasked queries see nothing new
    y2 = attn(x2, mask=mask)
    torch.testing.assert_close(y1[:, :4], y2[:, :4])


def test_time_tokens():
    tt = TimeTokens(32, 4)
    assert not tt.W.requires_grad and tt.W.shape == (256,)
    tok, e = tt(torch.tensor([0.0, 0.5, 1.0]))
    assert tok.shape == (3, 4, 32) and e.shape == (3, 1, 32)
    torch.testing.assert_close(tok - tt.learnable_tokens[None], e.expand(-1, 4, -1))
    feats = torch.cat([torch.sin(2 * math.pi * 0.5 * tt.W), torch.cos(2 * math.pi * 0.5 * tt.W)])
    torch.testing.assert_close(e[1, 0], tt.mlp(feats))


def test_label_tokens_null_row():
    lt = LabelTokens(8, 3, num_classes=10)
    assert lt.embedding_table.weight.shape == (11, 8)  # + null label
    out = lt(torch.tensor([10, 2]))
    torch.testing.assert_close(out[0] - lt.learnable_tokens, lt.embedding_table.weight[10].expand(3, -1))


def test_patchify_unpatchify_inverse():
    p, C = 4, 3
    img = torch.randn(2, C, 16, 16)
    # patch vectors laid out as (p_row, p_col, C), row-major over the grid
    tokens = img.view(2, C, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * C)
    torch.testing.assert_close(unpatchify(tokens, p, C), img)
    pe = PatchEmbed(p, C, 8)
    assert pe(img).shape == (2, 16, 8) and torch.all(pe.proj.bias == 0)
