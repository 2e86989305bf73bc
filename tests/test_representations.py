"""FD_r representation spaces (spec evaluation.md §2.1, §7.4 items 15 and 16): the catalogue, fdr / fdr6, the
timm extractors' preprocessing and pooling on stub models, the weights-file path through real (tiny) timm
networks, and the one-line error when the weights are not available. No network, no pretrained weights."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from nanogen.errors import UserError
from nanogen.eval import representations as reps
from nanogen.eval.representations import (
    FDR_HUB_IDS,
    REPRESENTATIONS,
    STATS_REPO,
    RepresentationExtractor,
    build_extractor,
    fdr,
    fdr6,
)

# spec evaluation.md §2.1: key -> (model id, input size, pooling, dim, valFD, reference stats file)
TABLE = {
    "inception": ("inception-v3-compat", 299, "pool3", 2048, 1.68, "guided_diffusion_stats.npz"),
    "convnext": ("convnextv2_base.fcmae_ft_in22k_in1k", 224, "spatial_mean", 1024, 56.87,
                 "convnext_in256_t224_stats.npz"),
    "dinov2_cls": ("vit_large_patch14_dinov2.lvd142m", 256, "cls", 1024, 14.19,
                   "vit_large_patch14_dinov2_lvd142m_in256_t256_stats.npz"),
    "mae_cls": ("vit_large_patch16_224.mae", 224, "cls", 1024, 0.04,
                "vit_large_patch16_224_mae_in256_t224_stats.npz"),
    "siglip_cls": ("vit_so400m_patch16_siglip_256.v2_webli", 224, "map", 1152, 0.60,
                   "vit_so400m_patch16_siglip_256_v2_webli_in256_t224_stats.npz"),
    "clip_cls": ("vit_large_patch14_clip_224.openai", 256, "cls", 1024, 5.60,
                 "vit_large_patch14_clip_224_openai_in256_t256_stats.npz"),
}  # fmt: skip
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_the_catalogue_is_the_spec_table():
    assert list(REPRESENTATIONS) == list(TABLE)
    for key, row in TABLE.items():
        r = REPRESENTATIONS[key]
        assert (r.model_id, r.input_size, r.pooling, r.dim, r.norm_const, r.stats_file) == row
    assert STATS_REPO == "nanovisionx/nanogen-evals-stats"
    timm_ids = [row[0] for key, row in TABLE.items() if key != "inception"]
    assert tuple(f"timm/{i}" for i in timm_ids) == FDR_HUB_IDS


@pytest.mark.parametrize(
    "key, stats", [("convnext", IMAGENET), ("dinov2_cls", IMAGENET), ("mae_cls", IMAGENET),
                   ("siglip_cls", HALF), ("clip_cls", CLIP)],
)  # fmt: skip
def test_timm_knows_each_model_with_the_normalisation_the_spec_names(key, stats):
    cfg = timm.models.get_pretrained_cfg(REPRESENTATIONS[key].model_id)  # a table lookup: nothing is built
    assert cfg.hf_hub_id == f"timm/{REPRESENTATIONS[key].model_id}"
    assert (cfg.mean, cfg.std) == stats


def test_fdr_divides_by_the_val_fd():
    assert fdr(14.19, "dinov2_cls") == 1.0
    assert fdr(1.0, "mae_cls") == pytest.approx(25.0)
    assert fdr(3.36, "inception") == pytest.approx(2.0)
    with pytest.raises(UserError, match="unknown FD_r representation 'dino'; use one of inception, convnext"):
        fdr(1.0, "dino")


def test_fdr6_is_the_mean_of_six_finite_values_else_nan():
    values = dict(zip(TABLE, [1.0, 2.0, 3.0, 4.0, 5.0, 9.0], strict=True))
    assert fdr6(values) == 4.0
    assert math.isnan(fdr6({**values, "clip_cls": math.inf}))
    assert math.isnan(fdr6({**values, "mae_cls": math.nan}))
    with pytest.raises(ValueError, match="exactly the keys"):
        fdr6({k: v for k, v in values.items() if k != "siglip_cls"})


# ---- preprocessing and pooling on a stub network


class Stub(nn.Module):
    """Records the network input; returns known features: (B, N, D) tokens, or (B, C, h, w) maps."""

    pretrained_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.5, 0.25, 0.125), "input_size": (3, 99, 99)}

    def __init__(self, spatial: bool = False):
        super().__init__()
        self.spatial = spatial
        self.seen: torch.Tensor | None = None
        self.autocast: bool | None = None
        self.attn_pool = lambda t: 2 * t[:, 1:].sum(1)  # stands in for SigLIP's MAP head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        self.autocast = torch.is_autocast_enabled(x.device.type)
        shape = (len(x), 4, 3, 5) if self.spatial else (len(x), 5, 4)
        return torch.arange(math.prod(shape), dtype=torch.float32).view(shape)


def stub_extractor(key: str, size: int = 16, device: str = "cpu") -> RepresentationExtractor:
    rep = replace(REPRESENTATIONS[key], input_size=size)
    return RepresentationExtractor(rep, Stub(spatial=rep.pooling == "spatial_mean"), device)


def images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_mean_and_std_are_scaled_to_0_255():
    ex = stub_extractor("mae_cls")
    x = torch.full((1, 3, 16, 16), 200, dtype=torch.uint8)
    ex(x)
    cfg = Stub.pretrained_cfg
    expected = [(200 - m * 255) / (s * 255) for m, s in zip(cfg["mean"], cfg["std"], strict=True)]
    assert ex.model.seen[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(ex.model.seen, ex.model.seen[:, :, :1, :1].expand_as(ex.model.seen))


def test_no_resize_when_the_size_already_matches():
    ex, x = stub_extractor("dinov2_cls", 16), images(16)
    ex(x)
    mean = torch.tensor(Stub.pretrained_cfg["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(Stub.pretrained_cfg["std"]).view(1, 3, 1, 1) * 255
    assert torch.equal(ex.model.seen, (x.float() - mean) / std)  # untouched pixels: no resampling blur


def test_other_sizes_are_resized_bicubic_with_antialias_like_pil():
    ex, x = stub_extractor("convnext", 16), images(48)
    ex(x)
    pixels = ex.model.seen * ex.std + ex.mean
    assert pixels.shape == (2, 3, 16, 16)
    plain = F.interpolate(x.float(), size=(16, 16), mode="bicubic", align_corners=False)
    assert (pixels - plain).abs().max() > 20  # without antialias a 3x downsample aliases
    # PIL's bicubic (a = -0.5, support widened by the scale) on the float channel, an independent resampler
    channel = Image.fromarray(x[1, 2].numpy().astype(np.float32), mode="F").resize((16, 16), Image.BICUBIC)
    assert np.abs(pixels[1, 2].numpy() - np.asarray(channel)).max() < 1e-2


@pytest.mark.parametrize(
    "key, expected",
    [
        ("mae_cls", lambda t: t[:, 0]),  # CLS token
        ("siglip_cls", lambda t: 2 * t[:, 1:].sum(1)),  # the model's attn_pool
        ("convnext", lambda t: t.mean(dim=(2, 3))),  # spatial mean of the (B, C, h, w) map
    ],
)
def test_pooling_follows_the_catalogue(key, expected):
    ex = stub_extractor(key)
    out = ex(images(16, n=3))
    shape = (3, 4, 3, 5) if key == "convnext" else (3, 5, 4)
    tokens = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
    assert out.dtype == torch.float64 and torch.equal(out, expected(tokens).double())
    assert ex.model.autocast is False  # no autocast on CPU


def test_only_uint8_images_are_accepted():
    with pytest.raises(TypeError, match="uint8"):
        stub_extractor("mae_cls")(torch.zeros(1, 3, 16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key, bf16", [("dinov2_cls", True), ("siglip_cls", True), ("convnext", False)])
def test_bf16_autocast_on_cuda_for_the_vits_only(key, bf16):
    ex = stub_extractor(key, device="cuda")
    assert ex(images(16)).dtype == torch.float64
    assert ex.model.seen.dtype == torch.float32 and ex.model.autocast is bf16


# ---- loading: weights files through real timm, and the offline error


TINY = {  # a small timm network of each kind, shaped like the real one where it matters (patch 14, MAP head)
    "dinov2_cls": ("vit_tiny_patch16_224", dict(patch_size=14, img_size=28, depth=2)),
    # SigLIP has no class token: the MAP head sees every token, as in timm's own pool()
    "siglip_cls": ("vit_tiny_patch16_224", dict(img_size=32, depth=2, global_pool="map", class_token=False)),
    "convnext": ("convnextv2_atto", {}),
}


@pytest.fixture
def tiny_timm(monkeypatch):
    """timm.create_model, but building the TINY stand-in (with every keyword build_extractor passes)."""
    real_create, calls = timm.create_model, []

    def create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        key = next(k for k, r in REPRESENTATIONS.items() if r.model_id == name)
        arch, shape = TINY[key]
        return real_create(arch, pretrained=pretrained, **shape, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    return real_create, calls


@pytest.mark.parametrize("key", list(TINY))
def test_a_local_weights_file_is_loaded_and_features_match_timm(key, tiny_timm, tmp_path):
    real_create, calls = tiny_timm
    arch, shape = TINY[key]
    dynamic = {"dynamic_img_size": True, "dynamic_img_pad": True} if key != "convnext" else {}
    source = real_create(arch, **shape, **dynamic).eval()
    save_file(source.state_dict(), tmp_path / "w.safetensors")

    ex = build_extractor(key, weights=tmp_path / "w.safetensors")
    name, pretrained, kwargs = calls[0]
    assert name == REPRESENTATIONS[key].model_id and pretrained
    assert kwargs.pop("pretrained_cfg_overlay") == {"file": str(tmp_path / "w.safetensors")}
    assert kwargs == dynamic
    for (k, a), b in zip(ex.model.state_dict().items(), source.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    x = images(40, n=2)
    size = REPRESENTATIONS[key].input_size  # 256 for DINOv2: 19 x 19 patches of 14 after padding to 266
    net_in = F.interpolate(x.float() / 255, size=(size, size), mode="bicubic", antialias=True)
    mean, std = (torch.tensor(source.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        feats = source.forward_features((net_in - mean) / std)
        pre_logits = source.forward_head(feats, pre_logits=True)
    out = ex(x)
    assert out.dtype == torch.float64 and out.shape == (2, source.num_features)
    if key == "convnext":  # the spatial mean before the head's norm, not timm's pre-logits (after it)
        assert torch.allclose(out.float(), feats.mean(dim=(2, 3)), atol=1e-4)
        assert not torch.allclose(out.float(), pre_logits, atol=1e-2)
    else:  # CLS token / MAP head: exactly timm's own pre-logits for these pools
        assert torch.allclose(out.float(), pre_logits, atol=1e-4)


def test_a_weights_file_of_another_model_is_one_line(tiny_timm, tmp_path):
    real_create, _ = tiny_timm
    state = real_create("convnextv2_atto").state_dict()
    state.pop("stem.0.weight")
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="does not hold timm 'convnextv2_base.fcmae_ft_in22k_in1k'") as e:
        build_extractor("convnext", weights=tmp_path / "w.safetensors")
    assert "\n" not in str(e.value) and "stem.0.weight" in str(e.value)
    with pytest.raises(UserError, match="no weights file"):
        build_extractor("convnext", weights=tmp_path / "missing.safetensors")


def test_missing_weights_offline_are_one_line_naming_the_fix(monkeypatch):
    def offline(name, **kwargs):  # what timm raises via huggingface_hub with HF_HUB_OFFLINE=1 and no cache
        raise LocalEntryNotFoundError(
            "An error happened while trying to locate the file on the Hub and we cannot find the requested\n"
            "files in the local cache."
        )

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError) as e:
        build_extractor("dinov2_cls")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("'dinov2_cls'", "vit_large_patch14_dinov2.lvd142m", "'nanogen prepare --models fdr'"):
        assert part in msg, msg
    assert "HF_HUB_OFFLINE=0" in msg


def test_inception_is_the_inception_wrapper(monkeypatch):
    import nanogen.eval.inception as inception

    monkeypatch.setattr(inception, "InceptionFeatures", lambda device: ("inception", device))
    assert build_extractor("inception", "cpu") == ("inception", "cpu")
    with pytest.raises(UserError, match="'inception' has fixed weights"):
        build_extractor("inception", weights="x.pt")
    with pytest.raises(UserError, match="unknown FD_r representation"):
        build_extractor("fid")
    assert reps.representation("clip_cls").is_vit and not reps.representation("convnext").is_vit
