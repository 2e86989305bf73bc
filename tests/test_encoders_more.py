"""SigLIP2, MAE and WebSSL representation encoders (spec reference.md §6.5): the real loading code
(``build_encoder(name, source=<dir>)``) on tiny random models saved in the published checkpoints' layouts,
checked against an independent recomputation (preprocessing by hand, the Hugging Face model called directly)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Dinov2Config,
    Dinov2Model,
    SiglipConfig,
    SiglipModel,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from nanogen.encoders import build_encoder, encoder_width
from nanogen.encoders.base import IMAGENET_MEAN, IMAGENET_STD, default_source, env_key
from nanogen.errors import ConfigError, NotAvailableError

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _plain_ln(h, eps):
    return (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)


def _bicubic(images, size):
    return F.interpolate((images + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)


def _randomise_norm(norm):  # a non-trivial final norm, so "affine or not" is observable
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    """A whole SigLIP model (text + vision), as google/siglip2-*-patch16-256 are published."""
    torch.manual_seed(0)
    vision = dict(TINY, image_size=32, patch_size=8)
    text = dict(
        TINY, vocab_size=64, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    _randomise_norm(model.vision_model.post_layernorm)
    path = tmp_path_factory.mktemp("siglip2")
    model.save_pretrained(path)
    return path, model.eval().vision_model


@pytest.fixture(scope="module")
def tiny_mae(tmp_path_factory):
    """A ViTMAEForPreTraining (encoder + decoder, mask ratio 0.75), as facebook/vit-mae-* are published."""
    torch.manual_seed(1)
    cfg = ViTMAEConfig(**TINY, image_size=32, patch_size=8, mask_ratio=0.75, decoder_hidden_size=16,
                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32)  # fmt: skip
    model = ViTMAEForPreTraining(cfg)
    _randomise_norm(model.vit.layernorm)
    path = tmp_path_factory.mktemp("mae")
    model.save_pretrained(path)
    return path, model.eval().vit


@pytest.fixture(scope="module")
def tiny_webssl(tmp_path_factory):
    torch.manual_seed(2)
    model = Dinov2Model(Dinov2Config(**TINY, patch_size=14, image_size=56))
    _randomise_norm(model.layernorm)
    path = tmp_path_factory.mktemp("webssl")
    model.save_pretrained(path)
    return path, model.eval()


# --- SigLIP2 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [32, 48])  # 48: the position embedding is resampled to a 6 x 6 grid
def test_siglip2_default_keeps_the_learned_post_ln_affine(tiny_siglip, resolution):
    path, vision = tiny_siglip
    enc = build_encoder("siglip2-vit-b", str(path), resolution=resolution)
    assert enc.embed_dim == 32 and not any(p.requires_grad for p in enc.parameters()) and not enc.training
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    feats = enc(images)
    n = (resolution // 8) ** 2
    assert feats.cls is None and feats.patches.shape == (2, n, 32)
    # independent: [-1,1] -> [0,1] -> bicubic R -> (x - 0.5) / 0.5 -> the saved model's own vision tower
    x = (_bicubic(images, resolution) - 0.5) / 0.5
    with torch.no_grad():
        out = vision(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=resolution != 32)
    torch.testing.assert_close(feats.patches, out.last_hidden_state, rtol=1e-4, atol=1e-4)  # the QUIRK
    # and that output really is the affine post-LN of the last block (what the quirk is about)
    ln = vision.post_layernorm
    affine = _plain_ln(out.hidden_states[-1], ln.eps) * ln.weight + ln.bias
    torch.testing.assert_close(feats.patches, affine, rtol=1e-4, atol=1e-4)


def test_siglip2_strip_affine_switch_gives_a_plain_layer_norm(tiny_siglip):
    path, vision = tiny_siglip
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    quirk = build_encoder("siglip2-vit-b", str(path), resolution=32)(images).patches
    enc = build_encoder("siglip2-vit-b", str(path), resolution=32, strip_affine=True)
    feats = enc(images)
    with torch.no_grad():
        x = ((images + 1) / 2 - 0.5) / 0.5  # already at R = 32: no resize
        h = vision(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(feats.patches, _plain_ln(h, vision.post_layernorm.eps), rtol=1e-4, atol=1e-4)
    assert feats.cls is None
    assert not torch.allclose(feats.patches, quirk, atol=1e-2)  # the switch changes the features


def test_siglip2_gradients_reach_the_input(tiny_siglip):
    enc = build_encoder("siglip2-vit-b", str(tiny_siglip[0]), resolution=32)
    img = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_()
    enc(img).patches.square().mean().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


# --- MAE ------------------------------------------------------------------------------------------------------


def _mae_by_hand(vit, x):
    """The ViT-MAE encoder with no masking, tokens in raster order: patch embed + (resampled) position embed,
    CLS prepended, the blocks, no final norm."""
    emb = vit.embeddings
    pos = emb.interpolate_pos_encoding(emb.patch_embeddings(x), x.shape[-2], x.shape[-1])
    tokens = emb.patch_embeddings(x) + pos[:, 1:]
    cls = (emb.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
    h = torch.cat([cls, tokens], dim=1)
    for layer in vit.layers:
        h = layer(h)
    return h


def test_mae_features_match_an_unmasked_raster_order_recomputation(tiny_mae):
    path, vit = tiny_mae
    enc = build_encoder("mae-vit-b", str(path), resolution=48)  # 48 / 8 = 6 x 6 tokens, no masking
    assert enc.embed_dim == 32 and not any(p.requires_grad for p in enc.parameters())
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = enc(images)
    assert feats.cls is None and feats.patches.shape == (2, 36, 32)  # all tokens kept, CLS dropped
    x = (_bicubic(images, 48) - MEAN) / STD
    with torch.no_grad():
        h = _mae_by_hand(vit, x)
        affine = vit.layernorm(h)
    torch.testing.assert_close(feats.patches, _plain_ln(h, vit.layernorm.eps)[:, 1:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(
        feats.patches, affine[:, 1:], atol=1e-2
    )  # the final LN's affine is truly removed


def test_mae_token_order_follows_the_noise_so_identity_noise_is_needed(tiny_mae):
    """ViTMAE orders the kept tokens by argsort(noise): a permuted noise permutes the tokens, so the encoder's
    identity noise is what keeps the raster order (the test above pins that order)."""
    path, vit = tiny_mae
    enc = build_encoder("mae-vit-b", str(path), resolution=32)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    feats = enc(images)
    x = (_bicubic(images, 32) - MEAN) / STD
    perm = torch.randperm(16)
    noise = torch.empty(1, 16)
    noise[0, perm] = torch.arange(16.0)  # argsort(noise) == perm
    assert vit.config.mask_ratio == 0.75 and feats.patches.shape == (
        1,
        16,
        32,
    )  # the encoder keeps every token
    vit.config.mask_ratio = 0.0  # (this test's own copy of the model: no masking either)
    try:
        with torch.no_grad():
            out = vit(pixel_values=x, noise=noise, output_hidden_states=True)
    finally:
        vit.config.mask_ratio = 0.75
    h = _plain_ln(out.hidden_states[-1], vit.layernorm.eps)[:, 1:]
    torch.testing.assert_close(h, feats.patches[:, perm], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(h, feats.patches, atol=1e-3)


# --- WebSSL ---------------------------------------------------------------------------------------------------


def test_webssl_features_match_a_plain_recomputation(tiny_webssl):
    path, model = tiny_webssl
    name = "webssl-vit-dino300m_full2b_224"
    assert default_source(name) == "facebook/webssl-dino300m-full2b-224"
    enc = build_encoder(name, str(path), resolution=64)  # 224 * 64 / 256 = 56 px -> 4 x 4 tokens
    assert enc.embed_dim == 32 and not any(p.requires_grad for p in enc.parameters())
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = enc(images)
    assert feats.cls.shape == (2, 32) and feats.patches.shape == (2, 16, 32)
    x = (_bicubic(images, 56) - MEAN) / STD
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state  # the model's own output (its affine final LayerNorm)
    torch.testing.assert_close(feats.cls, out[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats.patches, out[:, 1:], rtol=1e-4, atol=1e-4)  # CLS dropped, no registers


# --- names, widths, errors ------------------------------------------------------------------------------------


def test_hub_ids_and_widths():
    assert default_source("siglip2-vit-b") == "google/siglip2-base-patch16-256"
    assert default_source("siglip2-vit-so400m") == "google/siglip2-so400m-patch16-256"
    assert default_source("siglip2-vit-g") == "google/siglip2-giant-opt-patch16-256"
    assert default_source("mae-vit-h") == "facebook/vit-mae-huge"
    assert default_source("webssl-vit-dino7b_full8b_518") == "facebook/webssl-dino7b-full8b-518"
    widths = {"siglip2-vit-b": 768, "siglip2-vit-l": 1024, "siglip2-vit-so400m": 1152, "siglip2-vit-g": 1536,
              "mae-vit-b": 768, "mae-vit-l": 1024, "mae-vit-h": 1280, "dinov2-vit-b": 768}  # fmt: skip
    assert {n: encoder_width(n) for n in widths} == widths
    assert encoder_width("webssl-vit-dino300m_full2b_224") is None


@pytest.mark.parametrize(
    "name", ["siglip2-vit-h", "mae-vit-s", "mae-vit-g", "webssl-vit-mae300m_full2b_224", "webssl-vit-b"]
)
def test_unknown_configs_raise(name):
    with pytest.raises(ConfigError, match=f"unknown representation encoder '{name}'.*siglip2-vit-so400m"):
        build_encoder(name)


def test_strip_affine_is_siglip2_only_and_offline_errors_name_the_env_var(tiny_mae, tmp_path):
    with pytest.raises(ConfigError, match="strip_affine"):
        build_encoder("mae-vit-b", str(tiny_mae[0]), strip_affine=True)
    for name in ["siglip2-vit-l", "mae-vit-l", "webssl-vit-dino1b_full2b_224"]:
        with pytest.raises(
            NotAvailableError, match=f"cannot load representation encoder '{name}'.*{env_key(name)}"
        ):
            build_encoder(name, str(tmp_path / "missing"))


def test_env_var_source(tiny_siglip, monkeypatch):
    monkeypatch.setenv(env_key("siglip2-vit-so400m"), str(tiny_siglip[0]))
    assert env_key("siglip2-vit-so400m") == "NANOGEN_ENCODER_SIGLIP2_VIT_SO400M"
    assert build_encoder("siglip2-vit-so400m", resolution=32).embed_dim == 32
