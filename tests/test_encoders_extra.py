"""DINOv3, Perception Encoder (pe / spatialpe / langpe, on timm) and ConvNeXt V2 representation encoders (spec
reference.md §6.5): the real loading code (``build_encoder(name, source=<dir>)``) on tiny random models saved in
the published checkpoints' layouts, checked against an independent recomputation (preprocessing by hand, the
library model's parts called directly); names, widths and the one-line errors, eupe / tipsv2 included."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import save_for_hf
from transformers import ConvNextV2Config, ConvNextV2ForImageClassification, DINOv3ViTConfig, DINOv3ViTModel

from nanogen.encoders import build_encoder, encoder_width
from nanogen.encoders.base import IMAGENET_MEAN, IMAGENET_STD, default_source, env_key
from nanogen.errors import ConfigError, NotAvailableError

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
PE_L = "vit_pe_core_large_patch14_336"


def _plain_ln(h, eps):
    return (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)


def _randomise_norm(norm):  # a non-trivial final norm, so "affine or not" is observable
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()


def _images(size, n=2):
    return torch.rand(n, 3, size, size) * 2 - 1


@pytest.fixture(scope="module")
def tiny_dinov3(tmp_path_factory):
    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=16, image_size=64, num_register_tokens=4, layer_norm_eps=1e-5)  # fmt: skip
    model = DINOv3ViTModel(cfg)
    _randomise_norm(model.norm)
    path = tmp_path_factory.mktemp("dinov3")
    model.save_pretrained(path)
    return path, model.eval()


def _tiny_pe(tmp_path_factory, arch, seed, **extra):
    """A tiny timm PE model at a 56 px (4 x 4) native grid, saved as timm's hub layout (config.json with its
    model_args + model.safetensors), as timm/vit_pe_*.fb are published."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, embed_dim=32, depth=2, num_heads=2, img_size=56,
                              ref_feat_shape=(4, 4), **extra)  # fmt: skip
    if not isinstance(model.norm, torch.nn.Identity):
        _randomise_norm(model.norm)
    path = tmp_path_factory.mktemp(arch)
    save_for_hf(model, path, safe_serialization=True)
    return path, model.eval()


@pytest.fixture(scope="module")
def tiny_pe(tmp_path_factory):  # PE-Core-L: CLS token, ln_post, attention-pool head + projection
    return _tiny_pe(tmp_path_factory, PE_L, 1, attn_pool_num_heads=2)


@pytest.fixture(scope="module")
def tiny_langpe_g(tmp_path_factory):  # PE-Lang-G: no CLS token, no ln_post
    return _tiny_pe(tmp_path_factory, "vit_pe_lang_gigantic_patch14_448", 2)


@pytest.fixture(scope="module")
def tiny_spatialpe(tmp_path_factory):  # PE-Spatial-L: CLS token, no ln_post
    return _tiny_pe(tmp_path_factory, "vit_pe_spatial_large_patch14_448", 3)


@pytest.fixture(scope="module")
def tiny_convnextv2(tmp_path_factory):
    """A ConvNextV2ForImageClassification, as facebook/convnextv2-*-22k-224 are published."""
    torch.manual_seed(4)
    cfg = ConvNextV2Config(hidden_sizes=[8, 12, 16, 24], depths=[1, 1, 1, 1], num_labels=3)
    model = ConvNextV2ForImageClassification(cfg)
    path = tmp_path_factory.mktemp("convnextv2")
    model.save_pretrained(path)
    return path, model.eval().convnextv2


# --- DINOv3 ---------------------------------------------------------------------------------------------------


def _dinov3_blocks(model, x):
    """The DINOv3 ViT by hand: CLS + registers + patches, RoPE for the input's grid, the blocks, no final norm."""
    h = model.embeddings(x)
    rope = model.rope_embeddings(x)
    for layer in model.model.layer:
        h = layer(h, position_embeddings=rope)
    return h


@pytest.mark.parametrize(("size", "resolution"), [(96, 64), (256, 256)])  # 256: RoPE on the 16 x 16 grid
def test_dinov3_features_match_a_plain_recomputation(tiny_dinov3, size, resolution):
    path, model = tiny_dinov3
    enc = build_encoder("dinov3-vit-b16", str(path), resolution=resolution)
    assert enc.embed_dim == 32 and not any(p.requires_grad for p in enc.parameters()) and not enc.training
    images = _images(size)
    feats = enc(images)
    n = (resolution // 16) ** 2
    assert feats.cls.shape == (2, 32) and feats.patches.shape == (2, n, 32)
    # independent: [-1,1] -> [0,1] -> Resize(R, R) bilinear + antialias -> ImageNet norm -> blocks -> plain LN
    x = (images + 1) / 2
    if size != resolution:
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
    with torch.no_grad():
        h = _dinov3_blocks(model, (x - MEAN) / STD)
        affine = model.norm(h)
    assert h.shape[1] == 1 + 4 + n
    h = _plain_ln(h, 1e-5)
    torch.testing.assert_close(feats.cls, h[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats.patches, h[:, 5:], rtol=1e-4, atol=1e-4)  # CLS + 4 registers dropped
    assert not torch.allclose(feats.patches, affine[:, 5:], atol=1e-2)  # the affine norm is NOT applied


def test_dinov3_resize_uses_antialias(tiny_dinov3):
    path, model = tiny_dinov3
    images = _images(128)
    feats = build_encoder("dinov3-vit-b16", str(path), resolution=32)(images)
    x = F.interpolate((images + 1) / 2, size=(32, 32), mode="bilinear", align_corners=False)  # no antialias
    with torch.no_grad():
        h = _plain_ln(_dinov3_blocks(model, (x - MEAN) / STD), 1e-5)
    assert not torch.allclose(feats.patches, h[:, 5:], atol=1e-3)


# --- Perception Encoder ---------------------------------------------------------------------------------------


def _pe_blocks(model, x, rope=None):
    """A timm PE model by hand at its own grid: patches, CLS, absolute positions, ln_pre, the blocks (no ln_post)."""
    h = model.patch_embed(x)
    if model.cls_token is not None:
        h = torch.cat([model.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
    h = model.norm_pre(h + model.pos_embed)
    rope = model.rope.get_embed() if rope is None else rope
    for block in model.blocks:
        h = block(h, rope=rope)
    return h


def _bilinear(images, size):
    return F.interpolate((images + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)


def test_pe_at_the_native_grid_matches_the_saved_model(tiny_pe):
    path, model = tiny_pe
    assert default_source("pe-vit-l") == "timm/vit_pe_core_large_patch14_336.fb"
    enc = build_encoder("pe-vit-l", str(path), resolution=64)  # 14 * 64 / 16 = 56 px: the checkpoint's 4 x 4
    assert enc.embed_dim == 32 and enc.input_size == 56 and not any(p.requires_grad for p in enc.parameters())
    images = _images(80)
    feats = enc(images)
    assert feats.cls.shape == (2, 32) and feats.patches.shape == (2, 16, 32)
    x = (_bilinear(images, 56) - 0.5) / 0.5
    with torch.no_grad():
        h = _pe_blocks(model, x)
        with_ln_post = model.forward_features(x)  # timm's own forward: the blocks, then ln_post
    torch.testing.assert_close(feats.patches, h[:, 1:], rtol=1e-4, atol=1e-4)  # raw tokens, CLS stripped
    torch.testing.assert_close(feats.cls, h[:, 0], rtol=1e-4, atol=1e-4)
    normed = build_encoder("pe-vit-lnorm", str(path), resolution=64)(images)  # the spec's `norm` suffix
    torch.testing.assert_close(normed.patches, with_ln_post[:, 1:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(normed.patches, feats.patches, atol=1e-2)
    assert not torch.allclose(feats.patches, _plain_ln(h, 1e-5)[:, 1:], atol=1e-2)  # no norm of any kind


def _pe_rope_by_formula(grid, head_dim, offset):
    """PE's 2-D RoPE angles: integer patch indices (+1 with a CLS token) times 1 / 10000^(2i/d), d = head_dim/2,
    each frequency repeated twice (interleaved), x half then y half; returned as timm's [sin | cos] table."""
    d = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    f = torch.outer(torch.arange(grid).float() + offset, freqs).repeat_interleave(2, -1)
    ang = torch.cat([f[None, :].expand(grid, grid, -1), f[:, None].expand(grid, grid, -1)], -1).flatten(0, 1)
    return torch.cat([ang.sin(), ang.cos()], -1)


@pytest.mark.parametrize(
    "resolution", [128, 256]
)  # 112 px (8 x 8) and 224 px (16 x 16) from a 4 x 4 checkpoint
def test_pe_at_another_grid_resamples_positions_the_pe_way(tiny_pe, resolution):
    path, model = tiny_pe
    enc = build_encoder("pe-vit-l", str(path), resolution=resolution)
    size, grid = 14 * resolution // 16, resolution // 16
    assert enc.input_size == size
    images = _images(96)
    feats = enc(images)
    assert feats.patches.shape == (2, grid * grid, 32)
    # independent: the saved table resampled bilinearly by hand, RoPE from PE's formula at the new grid
    table = model.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode="bilinear", align_corners=False)
    pos = torch.cat([model.pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, grid * grid, 32)], 1)
    rope = _pe_rope_by_formula(grid, 16, offset=1)
    x = (_bilinear(images, size) - 0.5) / 0.5
    with torch.no_grad():
        h = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (the saved model's own size check skipped)
        h = torch.cat([model.cls_token.expand(2, -1, -1), h], 1)
        h = model.norm_pre(h + pos)
        for block in model.blocks:
            h = block(h, rope=rope)
    torch.testing.assert_close(feats.patches, h[:, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(enc.model.rope.get_embed(), rope, rtol=1e-5, atol=1e-5)
    # timm's own resizing (RoPE indices rescaled to the 4 x 4 pre-training grid) would give other features
    timm_rope = timm.create_model(
        PE_L, embed_dim=32, depth=2, num_heads=2, img_size=size, ref_feat_shape=(4, 4)
    )
    assert not torch.allclose(timm_rope.rope.get_embed(), rope, atol=1e-2)


def test_pe_models_without_cls_or_ln_post(tiny_langpe_g, tiny_spatialpe):
    path, model = tiny_langpe_g  # PE-Lang-G: no CLS token
    enc = build_encoder("langpe-vit-g", str(path), resolution=64)
    images = _images(64)
    feats = enc(images)
    assert feats.cls is None and feats.patches.shape == (2, 16, 32) and model.num_prefix_tokens == 0
    with torch.no_grad():
        h = _pe_blocks(model, (_bilinear(images, 56) - 0.5) / 0.5)
    torch.testing.assert_close(feats.patches, h, rtol=1e-4, atol=1e-4)
    path, model = (
        tiny_spatialpe  # PE-Spatial-L: CLS stripped; no ln_post in the checkpoint, so `norm` is a no-op
    )
    assert isinstance(model.norm, torch.nn.Identity)
    plain = build_encoder("spatialpe-vit-l", str(path), resolution=64)(images)
    normed = build_encoder("spatialpe-vit-lnorm", str(path), resolution=64)(images)
    with torch.no_grad():
        h = _pe_blocks(model, (_bilinear(images, 56) - 0.5) / 0.5)
    torch.testing.assert_close(plain.patches, h[:, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(normed.patches, plain.patches)


def _to_meta_pe_keys(sd):
    """timm's PE state dict -> Meta's original CLIP checkpoint layout (``visual.`` prefix, open_clip names)."""
    out = {"text_projection": torch.zeros(3, 3)}  # text tower keys are ignored
    for k, v in sd.items():
        if k.startswith(("attn_pool.", "head.")):
            continue
        if k == "cls_token":
            k, v = "class_embedding", v.reshape(-1)
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        for new, old in [("blocks.", "transformer.resblocks."), ("patch_embed.proj", "conv1"),
                         ("norm_pre", "ln_pre"), ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"),
                         ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:  # fmt: skip
            k = k.replace(new, old)
        out["visual." + ("ln_post." + k[5:] if k.startswith("norm.") else k)] = v
    return out


def test_pe_reads_meta_original_checkpoints(tiny_pe, tmp_path):
    """A directory with Meta's original ``PE-*.pt`` (and timm's config.json for the tiny sizes) loads the same."""
    path, model = tiny_pe
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save(_to_meta_pe_keys(model.state_dict()), tmp_path / "PE-Core-L14-336.pt")
    images = _images(64)
    for name in ["pe-vit-l", "pe-vit-lnorm"]:
        ours = build_encoder(name, str(tmp_path), resolution=128)(images)
        timms = build_encoder(name, str(path), resolution=128)(images)
        torch.testing.assert_close(ours.patches, timms.patches, rtol=0, atol=0)
        torch.testing.assert_close(ours.cls, timms.cls, rtol=0, atol=0)


def test_pe_weights_of_another_architecture_are_refused(tiny_pe):
    with pytest.raises(
        ConfigError, match=f"holds a timm '{PE_L}' model, but encoder 'pe-vit-b' is 'vit_pe_core_base"
    ):
        build_encoder("pe-vit-b", str(tiny_pe[0]))


# --- ConvNeXt V2 ----------------------------------------------------------------------------------------------


def test_convnextv2_patches_are_the_last_stage_map(tiny_convnextv2):
    path, model = tiny_convnextv2
    assert default_source("convnextv2-cnn-base") == "facebook/convnextv2-base-22k-224"
    enc = build_encoder("convnextv2-cnn-base", str(path), resolution=256)
    assert enc.embed_dim == 24 and not any(p.requires_grad for p in enc.parameters())
    images = _images(256)
    feats = enc(images)
    assert feats.cls is None and feats.patches.shape == (2, 49, 24)  # 224 / 32 = 7 x 7, whatever R
    x = (_bilinear(images, 224) - MEAN) / STD
    with torch.no_grad():
        h = model.embeddings(x)
        for stage in model.encoder.stages:
            h = stage(h)
    assert h.shape == (2, 24, 7, 7)
    torch.testing.assert_close(feats.patches[:, 3 * 7 + 5], h[:, :, 3, 5], rtol=1e-4, atol=1e-4)  # row-major
    torch.testing.assert_close(feats.patches, h.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)


# --- shared: frozen weights, gradients to the input -----------------------------------------------------------


@pytest.mark.parametrize("family", ["dinov3", "pe", "convnextv2"])
def test_gradients_reach_the_input_not_the_weights(family, tiny_dinov3, tiny_pe, tiny_convnextv2):
    name, path = {"dinov3": ("dinov3-vit-b16", tiny_dinov3[0]), "pe": ("pe-vit-lnorm", tiny_pe[0]),
                  "convnextv2": ("convnextv2-cnn-tiny", tiny_convnextv2[0])}[family]  # fmt: skip
    enc = build_encoder(name, str(path), resolution=64)
    enc.train()  # frozen encoders stay in eval mode
    assert not enc.training and not enc.model.training
    img = _images(64, n=1).requires_grad_()
    enc(img).patches.square().mean().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())


# --- names, widths, errors ------------------------------------------------------------------------------------


def test_hub_ids_and_widths():
    dinov3 = {"s16": ("vits16", 384), "s16plus": ("vits16plus", 384), "b16": ("vitb16", 768),
              "l16": ("vitl16", 1024), "h16plus": ("vith16plus", 1280), "7b16": ("vit7b16", 4096)}  # fmt: skip
    for cfg, (hub, width) in dinov3.items():
        assert default_source(f"dinov3-vit-{cfg}") == f"facebook/dinov3-{hub}-pretrain-lvd1689m"
        assert encoder_width(f"dinov3-vit-{cfg}") == width
    widths = {"pe-vit-t": 192, "pe-vit-s": 384, "pe-vit-b": 768, "pe-vit-l": 1024, "pe-vit-g": 1536,
              "pe-vit-lnorm": 1024, "spatialpe-vit-b": 768, "spatialpe-vit-l": 1024, "spatialpe-vit-g": 1536,
              "langpe-vit-l": 1024, "langpe-vit-gnorm": 1536, "convnextv2-cnn-nano": 640,
              "convnextv2-cnn-tiny": 768, "convnextv2-cnn-base": 1024, "convnextv2-cnn-large": 1536,
              "eupe-vit-t16": 192, "eupe-vit-s16": 384, "eupe-vit-b16": 768, "tipsv2-vit-b14": 768,
              "tipsv2-vit-l14": 1024, "tipsv2-vit-so14": 1152, "tipsv2-vit-g14": 1536}  # fmt: skip
    assert {n: encoder_width(n) for n in widths} == widths
    assert default_source("spatialpe-vit-g") == "timm/vit_pe_spatial_gigantic_patch14_448.fb"
    assert default_source("langpe-vit-lnorm") == "timm/vit_pe_lang_large_patch14_448.fb"
    assert default_source("pe-vit-t") == "timm/vit_pe_core_tiny_patch16_384.fb"
    for arch in [
        default_source(n).split("/")[1].split(".")[0]
        for n in widths
        if n.split("-")[0] in ("pe", "spatialpe", "langpe")
    ]:
        assert timm.is_model(arch), arch  # every table entry names an architecture the installed timm has


@pytest.mark.parametrize("name", ["eupe-vit-b16", "eupe-vit-t16", "tipsv2-vit-b14", "tipsv2-vit-so14"])
def test_eupe_and_tipsv2_are_named_but_not_buildable(name):
    with pytest.raises(
        NotAvailableError, match=f"'{name}' cannot be built by nanogen: needs the upstream"
    ) as e:
        build_encoder(name, "/nonexistent")
    assert "\n" not in str(e.value) and "not packaged" in str(e.value)


@pytest.mark.parametrize(
    "name", ["spatialpe-vit-t", "langpe-vit-b", "pe-vit-h", "pe-vit-norm", "dinov3-vit-b14", "convnextv2-cnn-huge",
             "convnextv2-cnn-b", "eupe-vit-l16", "tipsv2-vit-h14"],
)  # fmt: skip
def test_unknown_configs_raise_and_list_the_new_names(name):
    with pytest.raises(ConfigError, match=f"unknown representation encoder '{name}'") as e:
        build_encoder(name)
    for listed in ["dinov3-vit-b16", "dinov3-vit-7b16", "pe-vit-l", "spatialpe-vit-l", "langpe-vit-g",
                   "pe-vit-lnorm", "convnextv2-cnn-base"]:  # fmt: skip
        assert listed in str(e.value)


@pytest.mark.parametrize("name", ["dinov3-vit-b16", "pe-vit-l", "spatialpe-vit-lnorm", "convnextv2-cnn-base"])
def test_a_missing_local_dir_is_one_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        NotAvailableError, match=f"cannot load representation encoder '{name}'.*{env_key(name)}"
    ) as e:
        build_encoder(name, str(tmp_path / "missing"))
    assert "\n" not in str(e.value)


def test_env_var_source(tiny_pe, monkeypatch):
    monkeypatch.setenv(env_key("pe-vit-l"), str(tiny_pe[0]))
    assert env_key("pe-vit-l") == "NANOGEN_ENCODER_PE_VIT_L"
    assert build_encoder("pe-vit-l", resolution=64).embed_dim == 32
