"""LightningDiT (spec reference.md §3.4): shapes, init, parameter count, conditioning paths."""

import pytest
import torch

from nanogen.errors import ConfigError
from nanogen.models.layers import swiglu_hidden
from nanogen.models.lightning_dit import CondArch, LightningDiT, LightningDiTConfig


def closed_form_params(c: LightningDiTConfig) -> int:
    D, p, C = c.hidden_size, c.patch_size, c.in_channels
    h = swiglu_hidden(D, c.mlp_ratio)
    hd = D // c.num_heads
    block = 2 * D + 4 * (D * D + D) + 2 * hd + (2 * (D * h + h) + h * D + D)
    embed = C * p * p * D + D
    time = 256 + (512 * D + D) + (D * D + D) + c.cond_arch.num_t_tokens * D
    ctx = c.cond_arch.num_c_tokens * D + (c.num_classes + 1) * D if c.condition_type == "label" else (
        c.context_dim + c.context_dim * D + D
    )
    final = D + D * p * p * C + p * p * C
    return embed + time + ctx + c.depth * block + final


@pytest.mark.parametrize(
    "cfg",
    [
        LightningDiTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10),
        LightningDiTConfig(input_size=16, in_channels=768, patch_size=1, hidden_size=1152, depth=28, num_heads=16),
        LightningDiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=1, num_heads=4,
                           condition_type="text", context_dim=24, cond_arch=CondArch(4, 5)),
    ],
)
def test_param_count_closed_form(cfg):
    with torch.device("meta"):
        net = LightningDiT(cfg)
    assert sum(p.numel() for p in net.parameters()) == closed_form_params(cfg)


def test_xl_rae_size_is_about_451m():
    """reference.md §3.4: ~451M params for the 768-channel RAE setting."""
    with torch.device("meta"):
        net = LightningDiT(LightningDiTConfig())
    assert 440e6 < sum(p.numel() for p in net.parameters()) < 460e6


def test_forward_shapes_zero_init_and_gradients():
    torch.manual_seed(0)
    net = LightningDiT(LightningDiTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10))
    x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    out = net(x, t, y)
    assert out.shape == x.shape and torch.all(out == 0)  # zero-initialised final layer
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.1)
    out = net(x, t, y)
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if p.requires_grad)
    assert net.t_embedder.W.grad is None


def test_condition_changes_output_and_text_mask():
    torch.manual_seed(0)
    cfg = LightningDiTConfig(input_size=8, in_channels=3, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                             condition_type="text", context_dim=6, cond_arch=CondArch(2, 5))
    net = LightningDiT(cfg)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    h = torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, False, False, False]] * 2)
    a = net(x, t, h, mask)
    h2 = h.clone()
    h2[:, 2:] = torch.randn(2, 3, 6)  # padded positions must not matter
    torch.testing.assert_close(a, net(x, t, h2, mask))
    assert not torch.allclose(a, net(x, t, h2, None))


def test_bad_sizes_raise_config_errors():
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        LightningDiT(LightningDiTConfig(hidden_size=30, num_heads=4))
    with pytest.raises(ConfigError, match="context_dim"):
        LightningDiT(LightningDiTConfig(condition_type="text"))
