"""Diffusers VAE tokenizers (spec §6.1, §6.6, §2.5): tiny random models saved to disk and loaded like real ones."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from nanogen.errors import ConfigError, NotAvailableError
from nanogen.latents.vae import (
    VAE_TYPES,
    VAELatents,
    bn_normalize,
    env_key,
    patchify2x2,
    resolve_shift_scale,
    unpatchify2x2,
)

diffusers = pytest.importorskip("diffusers")

KL_TINY = dict(
    block_out_channels=(8, 8),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
)
MEAN4 = [0.3, -0.2, 0.1, 0.0]
STD4 = [2.0, 0.5, 1.5, 1.0]


def _save(model, path):
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def kl_factors(tmp_path_factory):
    """AutoencoderKL with scalar scaling_factor / shift_factor in its config (FLUX.1-like)."""
    torch.manual_seed(0)
    m = diffusers.AutoencoderKL(**KL_TINY, scaling_factor=0.75, shift_factor=0.125)
    return _save(m, tmp_path_factory.mktemp("kl_factors"))


@pytest.fixture(scope="module")
def kl_perchannel(tmp_path_factory):
    """AutoencoderKL with per-channel latents_mean / latents_std, saved in a pipeline-style 'vae' subfolder."""
    torch.manual_seed(1)
    m = diffusers.AutoencoderKL(
        **KL_TINY, scaling_factor=0.75, shift_factor=0.125, latents_mean=MEAN4, latents_std=STD4
    )
    root = tmp_path_factory.mktemp("kl_pc")
    _save(m, root / "vae")
    return root


def _images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g)  # the tokenizer interface: [0, 1]


def _ref_input(images, res):
    """The reference's preprocessing, written out: [0,1] -> bilinear resize -> [-1,1]."""
    x01 = F.interpolate(images, size=(res, res), mode="bilinear", align_corners=False)
    return 2 * x01 - 1


# --- the table ---------------------------------------------------------------------------------------------------


def test_table_matches_spec():
    expected = {  # §6.6 / §2.5: channels, downsample
        "sdvae-ema": (4, 8),
        "sdvae-mse": (4, 8),
        "e2e-sdvae-mse": (4, 8),
        "sdxl-vae": (4, 8),
        "flux": (16, 8),
        "e2e-flux": (16, 8),
        "sd3.5": (16, 8),
        "e2e-sd3.5": (16, 8),
        "e2e-vavae": (32, 16),
        "qwen-vae": (16, 8),
        "e2e-qwen-vae": (16, 8),
        "flux2": (128, 16),
    }
    assert set(VAE_TYPES) == set(expected)
    for name, (c, d) in expected.items():
        assert (VAE_TYPES[name].channels, VAE_TYPES[name].downsample) == (c, d), name
    assert VAE_TYPES["sdvae-ema"].hub_id == "stabilityai/sd-vae-ft-ema"
    assert VAE_TYPES["sdxl-vae"].hub_id == "madebyollin/sdxl-vae-fp16-fix"
    assert (VAE_TYPES["flux"].hub_id, VAE_TYPES["flux"].subfolder) == ("black-forest-labs/FLUX.1-dev", "vae")
    assert (VAE_TYPES["qwen-vae"].cls_name, VAE_TYPES["qwen-vae"].subfolder) == (
        "AutoencoderKLQwenImage",
        "vae",
    )
    assert VAE_TYPES["e2e-qwen-vae"].hub_id == "REPA-E/e2e-qwenimage-vae"
    assert VAE_TYPES["flux2"].cls_name == "AutoencoderKLFlux2"
    for n in ("sdvae-ema", "sdvae-mse"):
        assert (VAE_TYPES[n].shift, VAE_TYPES[n].scale) == (0.0, 0.18215)
    assert (VAE_TYPES["sdxl-vae"].shift, VAE_TYPES["sdxl-vae"].scale) == (0.0, 0.13025)
    for n in (
        "e2e-sdvae-mse",
        "flux",
        "e2e-flux",
        "sd3.5",
        "e2e-sd3.5",
        "e2e-vavae",
        "qwen-vae",
        "e2e-qwen-vae",
    ):
        assert (VAE_TYPES[n].shift, VAE_TYPES[n].scale) == (None, None), n
    # every class the table names exists in this diffusers
    for t in VAE_TYPES.values():
        assert hasattr(diffusers, t.cls_name), t.cls_name
    assert env_key("sd3.5") == "NANOGEN_VAE_SD3_5" and env_key("e2e-sdvae-mse") == "NANOGEN_VAE_E2E_SDVAE_MSE"


# --- shift / scale resolution -----------------------------------------------------------------------------------


def test_shift_scale_resolution_order():
    full = {"latents_mean": MEAN4, "latents_std": STD4, "shift_factor": 0.5, "scaling_factor": 0.25}
    # 1. per-channel stats beat the registry scalar and the config factors
    s, k = resolve_shift_scale(full, 0.0, 0.18215)
    assert torch.allclose(s, torch.tensor(MEAN4)) and torch.allclose(k, 1 / torch.tensor(STD4))
    # 2. registry scalar beats the config factors
    factors = {"shift_factor": 0.5, "scaling_factor": 0.25, "latents_mean": None, "latents_std": None}
    s, k = resolve_shift_scale(factors, 0.0, 0.18215)
    assert float(s) == 0.0 and float(k) == pytest.approx(0.18215)
    # 3. config factors
    s, k = resolve_shift_scale(factors, None, None)
    assert float(s) == 0.5 and float(k) == 0.25
    # 4. nothing: 0 / 1
    s, k = resolve_shift_scale({"shift_factor": None, "scaling_factor": None}, None, None)
    assert float(s) == 0.0 and float(k) == 1.0
    # each resolved on its own: per-channel shift only, scale from the registry; config shift only
    s, k = resolve_shift_scale({"latents_mean": MEAN4, "scaling_factor": 0.25}, None, 0.13025)
    assert s.shape == (4,) and float(k) == pytest.approx(0.13025)
    s, k = resolve_shift_scale({"shift_factor": 0.1159}, None, None)
    assert float(s) == pytest.approx(0.1159) and float(k) == 1.0


# --- AutoencoderKL end to end -----------------------------------------------------------------------------------


def test_kl_encode_matches_independent_computation(kl_factors):
    tok = VAELatents("flux", resolution=16, source=kl_factors)  # registry has no scalars: config factors
    ref = diffusers.AutoencoderKL.from_pretrained(str(kl_factors)).eval()
    assert tok.latent_shape == (4, 8, 8) and tok.channels == 4 and tok.downsample == 2
    imgs = _images(size=32)
    z = tok.encode(imgs)
    with torch.no_grad():
        raw = ref.encode(_ref_input(imgs, 16)).latent_dist.mode()
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, (raw - 0.125) * 0.75, rtol=1e-5, atol=1e-5)
    # no resize when already at resolution
    imgs16 = _images(size=16, seed=3)
    with torch.no_grad():
        raw16 = ref.encode(imgs16 * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(tok.encode(imgs16), (raw16 - 0.125) * 0.75, rtol=1e-5, atol=1e-5)


def test_kl_registry_scalar_overrides_config(kl_factors):
    tok = VAELatents("sdvae-ema", resolution=16, source=kl_factors)
    ref = diffusers.AutoencoderKL.from_pretrained(str(kl_factors)).eval()
    imgs = _images(size=16, seed=1)
    with torch.no_grad():
        raw = ref.encode(imgs * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(tok.encode(imgs), (raw - 0.0) * 0.18215, rtol=1e-5, atol=1e-6)


def test_kl_decode_inverts_normalisation(kl_factors):
    tok = VAELatents("flux", resolution=16, source=kl_factors)
    ref = diffusers.AutoencoderKL.from_pretrained(str(kl_factors)).eval()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 4, 8, 8, generator=g) * 20  # large, so the decoder overshoots and the clamp matters
    out = tok.decode(z)
    with torch.no_grad():
        x = ref.decode(z / 0.75 + 0.125).sample
    expected = ((x + 1) / 2).clamp(0, 1)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1 and (out == 0).any() and (out == 1).any()
    # round trip shapes
    assert tok.decode(tok.encode(_images(size=16))).shape == (2, 3, 16, 16)


def test_kl_per_channel_stats_and_subfolder(kl_perchannel, monkeypatch):
    monkeypatch.setenv(env_key("sd3.5"), str(kl_perchannel))  # the env var names a pipeline dir with vae/
    tok = VAELatents("sd3.5", resolution=16)
    ref = diffusers.AutoencoderKL.from_pretrained(str(kl_perchannel), subfolder="vae").eval()
    imgs = _images(size=16, seed=2)
    with torch.no_grad():
        raw = ref.encode(imgs * 2 - 1).latent_dist.mode()
    mean, std = torch.tensor(MEAN4).view(1, 4, 1, 1), torch.tensor(STD4).view(1, 4, 1, 1)
    z = tok.encode(imgs)
    torch.testing.assert_close(z, (raw - mean) / std, rtol=1e-5, atol=1e-5)
    # even the registry scalar of sdvae loses to per-channel stats
    tok_sd = VAELatents("sdvae-mse", resolution=16, source=kl_perchannel / "vae")
    torch.testing.assert_close(tok_sd.encode(imgs), z, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        x = ref.decode(z * std + mean).sample
    torch.testing.assert_close(tok.decode(z), ((x + 1) / 2).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_sample_mode_is_seeded_and_differs_from_mode(kl_factors):
    mode = VAELatents("flux", resolution=16, source=kl_factors)
    samp = VAELatents("flux", resolution=16, source=kl_factors, sample_mode="sample")
    imgs = _images(size=16)
    a = samp.encode(imgs, generator=torch.Generator().manual_seed(7))
    b = samp.encode(imgs, generator=torch.Generator().manual_seed(7))
    c = samp.encode(imgs, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, mode.encode(imgs))
    assert torch.equal(mode.encode(imgs), mode.encode(imgs))


def test_frozen(kl_factors):
    tok = VAELatents("flux", resolution=16, source=kl_factors)
    tok.train()
    assert not tok.training and not tok.vae.training
    assert not any(p.requires_grad for p in tok.parameters())
    assert tok.latent_dim == 4 and tok.patch_size == 2 and tok.image_size == 16


# --- Qwen-Image (5-D) -------------------------------------------------------------------------------------------


def test_qwen_video_vae_t1_axis(tmp_path):
    torch.manual_seed(2)
    m = diffusers.AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=MEAN4,
        latents_std=STD4,
    )
    _save(m, tmp_path / "vae")
    tok = VAELatents("qwen-vae", resolution=16, source=tmp_path)
    ref = diffusers.AutoencoderKLQwenImage.from_pretrained(str(tmp_path), subfolder="vae").eval()
    assert tok.latent_shape == (4, 8, 8)
    imgs = _images(size=32, seed=4)
    z = tok.encode(imgs)
    assert z.shape == (2, 4, 8, 8)
    mean, std = torch.tensor(MEAN4).view(1, 4, 1, 1), torch.tensor(STD4).view(1, 4, 1, 1)
    with torch.no_grad():
        raw = ref.encode(_ref_input(imgs, 16).unsqueeze(2)).latent_dist.mode()
    assert raw.shape == (2, 4, 1, 8, 8)
    torch.testing.assert_close(z, (raw[:, :, 0] - mean) / std, rtol=1e-5, atol=1e-5)
    out = tok.decode(z)
    with torch.no_grad():
        x = ref.decode((z * std + mean).unsqueeze(2)).sample[:, :, 0]
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, ((x + 1) / 2).clamp(0, 1), rtol=1e-5, atol=1e-5)


# --- FLUX.2 -----------------------------------------------------------------------------------------------------


def test_patchify_order_matches_loop():
    z = torch.randn(2, 3, 6, 4)
    p = patchify2x2(z)
    assert p.shape == (2, 12, 3, 2)
    expected = torch.empty_like(p)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                for i in range(3):
                    for j in range(2):
                        expected[:, c * 4 + 2 * dy + dx, i, j] = z[:, c, 2 * i + dy, 2 * j + dx]
    assert torch.equal(p, expected)
    assert torch.equal(unpatchify2x2(p), z)


def test_flux2_patchify_and_batchnorm(tmp_path):
    torch.manual_seed(3)
    m = diffusers.AutoencoderKLFlux2(**KL_TINY)
    g = torch.Generator().manual_seed(9)
    m.bn.running_mean.copy_(torch.randn(16, generator=g))
    m.bn.running_var.copy_(torch.rand(16, generator=g) * 3 + 0.1)
    _save(m, tmp_path)
    tok = VAELatents("flux2", resolution=16, source=tmp_path)
    assert tok.latent_shape == (16, 4, 4) and tok.channels == 16 and tok.downsample == 4
    ref = diffusers.AutoencoderKLFlux2.from_pretrained(str(tmp_path)).eval()
    mean, var = ref.bn.running_mean.clone(), ref.bn.running_var.clone()
    assert torch.allclose(mean, m.bn.running_mean)  # the stats survive save/load
    imgs = _images(size=16, seed=6)
    z = tok.encode(imgs)
    with torch.no_grad():
        raw = ref.encode(imgs * 2 - 1).latent_dist.mode()  # (2, 4, 8, 8)
    expected = torch.empty(2, 16, 4, 4)
    for c in range(4):
        for dy in range(2):
            for dx in range(2):
                k = c * 4 + 2 * dy + dx
                expected[:, k] = (raw[:, c, dy::2, dx::2] - mean[k]) / torch.sqrt(var[k] + 1e-5)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn_normalize(patchify2x2(raw), mean, var), expected, rtol=1e-5, atol=1e-5)
    out = tok.decode(z)
    with torch.no_grad():
        x = ref.decode(raw).sample  # decode inverts BN + patchify exactly
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, ((x + 1) / 2).clamp(0, 1), rtol=1e-4, atol=1e-4)


# --- errors -----------------------------------------------------------------------------------------------------


def test_unknown_type_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        VAELatents("sd-vae")
    msg = str(e.value)
    assert (
        "sd-vae" in msg
        and "sdvae-ema" in msg
        and "flux2" in msg
        and "e2e-qwen-vae" in msg
        and "\n" not in msg
    )


def test_offline_missing_model_names_hub_id(monkeypatch):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    monkeypatch.delenv(env_key("e2e-vavae"), raising=False)
    with pytest.raises(NotAvailableError) as e:
        VAELatents("e2e-vavae")
    msg = str(e.value)
    assert (
        "REPA-E/e2e-vavae-hf" in msg
        and "NANOGEN_VAE_E2E_VAVAE" in msg
        and "nanogen prepare --models e2e-vavae" in msg
        and "misc.weights.e2e-vavae" in msg
        and "\n" not in msg
    )


def test_missing_local_directory(tmp_path):
    with pytest.raises(NotAvailableError) as e:
        VAELatents("sdvae-ema", source=tmp_path)  # an empty directory
    assert "stabilityai/sd-vae-ft-ema" in str(e.value) and "\n" not in str(e.value)


def test_bad_images_and_options(kl_factors):
    tok = VAELatents("flux", resolution=16, source=kl_factors)
    imgs = _images(size=16)
    for bad in (imgs[0], imgs[:, :1], imgs.repeat(1, 2, 1, 1)):
        with pytest.raises(ConfigError, match="shape"):
            tok.encode(bad)
    with pytest.raises(ConfigError, match=r"0, 255"):
        tok.encode(imgs * 255)
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        tok.encode(imgs * 2 - 1)
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\]"):
        tok.encode(imgs * 3 - 1)
    with pytest.raises(ConfigError, match="uint8"):
        tok.encode((imgs * 255).to(torch.uint8))
    with pytest.raises(ConfigError, match="shape"):
        tok.decode(torch.zeros(1, 5, 8, 8))
    with pytest.raises(ConfigError, match="sample_mode"):
        VAELatents("flux", source=kl_factors, sample_mode="mean")


def test_a_nano_run_trains_and_samples_in_a_vae_latent_space(tmp_path):
    """stage_1: vae wired end to end: `nanogen train` encodes digits with a (tiny, saved) VAE, `sample` decodes."""
    from nanogen.cli import main

    torch.manual_seed(0)
    vae_dir = _save(diffusers.AutoencoderKL(**KL_TINY, scaling_factor=0.5), tmp_path / "vae")
    args = ["-c", "configs/stage2/training/nano/ddt-xs-pixel-xpred-t4c8.yaml", "stage_1.target=vae",
            "stage_1.params={vae_type: sdvae-ema, resolution: 32}", f"misc.weights={{sdvae-ema: {vae_dir}}}",
            "misc.latent_size=[4,16,16]", "stage_2.params.patch_size=[2,2]", "stage_2.params.hidden_size=[32,32]",
            "stage_2.params.depth=[1,1]", "stage_2.params.num_heads=[2,2]", "transport.prediction=velocity",
            "training.max_steps=2", "training.batch_size=4", "eval=null", "sampler.num_steps=2",
            f"run.results_dir={tmp_path}", "run.name=vae"]  # fmt: skip
    assert main(["train", *args]) == 0
    ck = tmp_path / "vae" / "checkpoints" / "step-0000002.pt"
    assert main(["sample", *args, "--ckpt", str(ck), "--num", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["train", *args, "misc.latent_size=[4,8,8]", "stage_2.params.patch_size=[1,1]", "run.name=bad"]) == 2
