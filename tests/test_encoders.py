"""Frozen representation encoders (spec reference.md §6.5): the real loading code on a tiny random DINOv2
with registers saved to a temporary directory; preprocessing, non-affine final norm, token layout, errors."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from nanogen.encoders import build_encoder, encoder_width
from nanogen.encoders.base import IMAGENET_MEAN, IMAGENET_STD, env_key
from nanogen.errors import ConfigError, NotAvailableError


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=14, image_size=56, num_register_tokens=4)  # fmt: skip
    model = Dinov2WithRegistersModel(cfg)
    with torch.no_grad():  # a non-trivial final norm, so "non-affine" is observable
        model.layernorm.weight.uniform_(0.5, 1.5)
        model.layernorm.bias.normal_()
    path = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(path)
    return path, model.eval()


def test_dinov2_features_match_a_plain_recomputation(tiny_dinov2):
    path, model = tiny_dinov2
    enc = build_encoder("dinov2-vit-b", str(path), resolution=64)  # 224 * 64 / 256 = 56 px -> 4 x 4 tokens
    assert enc.embed_dim == 32 and not any(p.requires_grad for p in enc.parameters())
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = enc(images)
    assert feats.cls.shape == (2, 32) and feats.patches.shape == (2, 16, 32)
    # independent: [-1,1] -> [0,1] -> bicubic 56 -> ImageNet norm -> model -> last block -> plain LayerNorm
    x = F.interpolate((images + 1) / 2, size=(56, 56), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        h = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        affine = model(pixel_values=x).last_hidden_state
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(feats.cls, h[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats.patches, h[:, 5:], rtol=1e-4, atol=1e-4)  # CLS + 4 registers dropped
    assert not torch.allclose(feats.patches, affine[:, 5:], atol=1e-2)  # the affine norm is NOT applied


def test_gradients_reach_the_input_image(tiny_dinov2):
    enc = build_encoder("dinov2-vit-b", str(tiny_dinov2[0]), resolution=64)
    img = (torch.rand(1, 3, 64, 64) * 2 - 1).requires_grad_()
    enc(img).patches.square().mean().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_env_var_source_and_offline_error(tiny_dinov2, monkeypatch, tmp_path):
    monkeypatch.setenv(env_key("dinov2-vit-s"), str(tiny_dinov2[0]))
    assert build_encoder("dinov2-vit-s", resolution=64).embed_dim == 32
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotAvailableError, match="cannot load representation encoder 'dinov2-vit-b'.*NANOGEN_ENCODER_DINOV2_VIT_B"):
        build_encoder("dinov2-vit-b", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="unknown representation encoder 'convnextv2-vit-b'; valid: .*convnextv2-cnn-base"):
        build_encoder("convnextv2-vit-b")
    with pytest.raises(ConfigError, match="type-arch-config"):
        build_encoder("dinov2")
    assert encoder_width("dinov2-vit-b") == 768 and encoder_width("dinov2-vit-g") == 1536
