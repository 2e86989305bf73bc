"""Stage-1 reconstruction metrics (spec evaluation.md §4, reference.md §6.8): PSNR, SSIM, LPIPS, rFID, meter.

The hard-coded SSIM values below were produced once, outside this project, by torchmetrics 1.9.0
(``structural_similarity_index_measure(recon, ref, data_range=1.0, reduction="none")``) and scikit-image 0.26.0
(``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
channel_axis=0)``), both installed with ``pip install --target /tmp/...`` into a scratch directory and run on the
float64 images built by ``_pair()``. Neither library is a dependency of the project or of these tests.
"""

import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from nanogen.eval.reconstruction import (
    ReconstructionMeter,
    gaussian_window,
    lpips_per_image,
    psnr_per_image,
    psnr_pooled,
    quantize_recon,
    ssim_map,
    ssim_per_image,
)


def _assert_close(a, b, rtol=0.0, atol=0.0):
    """Elementwise |a - b| <= atol + rtol·|b| (torch.testing.assert_close costs ~5 s of lazy imports)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a, b)
    assert bool(((a - b).abs() <= atol + rtol * b.abs()).all()), (a, b)


# torchmetrics 1.9.0 and scikit-image 0.26.0 on _pair() (see the module docstring)
TORCHMETRICS_SSIM = [0.9942921753848701, 0.8812706283839491, 0.5072008266406786]
SKIMAGE_SSIM = [0.9944473095921152, 0.8832308940996558, 0.4873161803722779]


def _pair(seed=0, shape=(3, 3, 20, 27)):
    """Three non-square float64 images (a sine pattern plus noise) and reconstructions at noise 0.02/0.1/0.3."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[2], 0 : shape[3]]
    base = 0.5 + 0.4 * np.sin(xx / 3.0 + yy / 5.0)
    ref = np.clip(base[None, None] + rng.normal(0, 0.15, shape), 0, 1)
    noise = np.array([0.02, 0.1, 0.3]).reshape(-1, 1, 1, 1)[: shape[0]]
    recon = np.clip(ref + noise * rng.normal(0, 1, shape), 0, 1)
    return recon, ref


# ------------------------------------------------------------------------------------------------ PSNR


def test_psnr_hand_values_and_cap():
    ref = torch.full((3, 3, 8, 8), 0.4, dtype=torch.float64)
    recon = ref.clone()
    recon[0] += 0.1  # MSE 0.01 -> 20 dB
    recon[1, :, :4] += 0.2  # half the pixels off by 0.2: MSE 0.02 -> 10*log10(50)
    # recon[2] identical: MSE clamped at 1e-10 -> 100 dB
    got = psnr_per_image(recon, ref)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([20.0, 10 * math.log10(50), 100.0], abs=1e-9)


def test_psnr_0_255_form_is_identical():
    recon, ref = (torch.from_numpy(a) for a in _pair())
    r8, t8 = (recon * 255).round(), (ref * 255).round()
    a = psnr_per_image(r8 / 255, t8 / 255)
    b = psnr_per_image(r8, t8, data_range=255.0)
    mse255 = ((r8 - t8) ** 2).flatten(1).mean(1)
    c = 10 * torch.log10(255.0**2 / mse255)
    _assert_close(a, b, rtol=0, atol=1e-10)
    _assert_close(a, c, rtol=0, atol=1e-10)


def test_mean_of_per_image_psnr_is_reported_not_pooled():
    ref = torch.full((4, 3, 8, 8), 0.5, dtype=torch.float64)
    errors = torch.tensor([0.01, 0.03, 0.1, 0.3], dtype=torch.float64)
    recon = ref + errors.view(4, 1, 1, 1)
    per_image = [20 * math.log10(1 / e) for e in errors.tolist()]  # 40, 30.46, 20, 10.46
    mean_per_image = sum(per_image) / 4  # 25.23 dB
    pooled = 10 * math.log10(1 / float((errors**2).mean()))  # 15.98 dB
    assert psnr_per_image(recon, ref).mean().item() == pytest.approx(mean_per_image, abs=1e-9)
    assert psnr_pooled(recon, ref) == pytest.approx(pooled, abs=1e-9)
    assert mean_per_image - pooled > 9

    meter = ReconstructionMeter(ssim=False, quantize="round")
    meter.update(ref, recon)  # all values are exact uint8 levels after rounding
    q = quantize_recon(recon, "round").double() / 255
    r = quantize_recon(ref, "round").double() / 255
    reported = meter.result()["psnr_mean_per_image"]
    assert reported == pytest.approx(psnr_per_image(q, r).mean().item(), abs=1e-9)
    assert abs(reported - psnr_pooled(q, r)) > 9


# ------------------------------------------------------------------------------------------------ SSIM


def _ssim_numpy_reference(x, y, data_range=1.0):
    """Independent float64 SSIM, torchmetrics convention: 11-tap Gaussian (sigma 1.5) applied separably with
    mirror padding (= torch 'reflect', no edge repeat), population variances, map mean over C, H, W."""
    d = np.arange(11) - 5.0
    w = np.exp(-0.5 * (d / 1.5) ** 2)
    w /= w.sum()

    def blur(a):
        a = scipy.ndimage.correlate1d(a, w, axis=-2, mode="mirror")
        return scipy.ndimage.correlate1d(a, w, axis=-1, mode="mirror")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = np.maximum(blur(x * x) - mx * mx, 0)
    vy = np.maximum(blur(y * y) - my * my, 0)
    cxy = blur(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return m.reshape(m.shape[0], -1).mean(1)


def test_ssim_matches_torchmetrics_values():
    recon, ref = (torch.from_numpy(a) for a in _pair())
    got = ssim_per_image(recon, ref)
    assert got.tolist() == pytest.approx(TORCHMETRICS_SSIM, abs=1e-12)


def test_ssim_matches_independent_numpy_implementation():
    recon, ref = _pair(seed=3, shape=(2, 3, 17, 23))
    got = ssim_per_image(torch.from_numpy(recon), torch.from_numpy(ref)).numpy()
    np.testing.assert_allclose(got, _ssim_numpy_reference(recon, ref), rtol=0, atol=1e-12)


def test_ssim_map_interior_matches_skimage_and_border_is_included():
    recon, ref = (torch.from_numpy(a) for a in _pair())
    m = ssim_map(recon, ref)
    assert m.shape == recon.shape
    interior = m[..., 5:-5, 5:-5].flatten(1).mean(1)
    assert interior.tolist() == pytest.approx(SKIMAGE_SSIM, abs=1e-12)
    # our (torchmetrics) mean includes the border, so it is not skimage's cropped mean
    assert (ssim_per_image(recon, ref) - torch.tensor(SKIMAGE_SSIM, dtype=torch.float64)).abs().max() > 1e-3


def test_ssim_window_identity_and_range_invariance():
    g = gaussian_window(1.5)
    assert g.numel() == 11 and g.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert torch.equal(g, g.flip(0))
    recon, ref = (torch.from_numpy(a) for a in _pair(seed=1))
    _assert_close(ssim_per_image(ref, ref), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    _assert_close(
        ssim_per_image(recon * 255, ref * 255, data_range=255.0),
        ssim_per_image(recon, ref),
        rtol=0,
        atol=1e-12,
    )
    # symmetric, and chunking does not change anything
    _assert_close(ssim_per_image(recon, ref), ssim_per_image(ref, recon), rtol=0, atol=1e-14)
    _assert_close(ssim_per_image(recon, ref, chunk=1), ssim_per_image(recon, ref), rtol=0, atol=0)


def test_ssim_rejects_too_small_images():
    x = torch.rand(1, 3, 5, 40)
    with pytest.raises(ValueError, match="larger than"):
        ssim_per_image(x, x)


# ------------------------------------------------------------------------------------------------ LPIPS


class StubLPIPS(torch.nn.Module):
    """Mean absolute difference per image; records the input range it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x0, x1):
        self.seen.append((min(x0.min().item(), x1.min().item()), max(x0.max().item(), x1.max().item())))
        return (x0 - x1).abs().flatten(1).mean(1)


def _lpips_batch():
    ref = torch.zeros(4, 3, 16, 16)
    recon = torch.zeros(4, 3, 16, 16)
    recon[1] = 51 / 255  # exact uint8 levels, so the meter's quantisation keeps them
    recon[2] = 102 / 255
    recon[3] = 1.0
    return ref, recon


def test_lpips_per_image_maps_to_minus_one_one():
    lp = StubLPIPS()
    ref, recon = _lpips_batch()
    d = lpips_per_image(lp, recon, ref)
    assert lp.seen == [(-1.0, 1.0)]
    _assert_close(d, torch.tensor([0.0, 0.4, 0.8, 2.0], dtype=torch.float64), atol=1e-6)


def test_lpips_batch_mean_quirk():
    ref, recon = _lpips_batch()
    per = lpips_per_image(StubLPIPS(), recon, ref)
    quirk = lpips_per_image(StubLPIPS(), recon, ref, batch_mean_quirk=True)
    _assert_close(quirk, torch.full((4,), 0.8, dtype=torch.float64), atol=1e-6)
    assert not torch.allclose(per, quirk)
    # the data-set mean is the same under both conventions (batches of unequal size included)
    means = []
    for flag in (False, True):
        meter = ReconstructionMeter(lpips=StubLPIPS(), lpips_batch_mean_quirk=flag, ssim=False)
        first = meter.update(ref[:3], recon[:3])
        meter.update(ref[3:], recon[3:])
        means.append(meter.result()["lpips_vgg_mean_per_image"])
        assert torch.allclose(first["lpips_vgg"], per[:3], atol=1e-6) != flag
    assert means[0] == pytest.approx(means[1], abs=1e-12)
    assert means[0] == pytest.approx(per.mean().item(), abs=1e-6)  # meter sees uint8-quantised images


# ------------------------------------------------------------------------------------------------ quantisation


def test_quantize_truncate_vs_round():
    x = torch.tensor([-0.2, 0.0, 0.5, 0.999, 1.0, 1.3, 100 / 255 + 1e-6, 100 / 255 - 1e-6])
    assert quantize_recon(x, "truncate").tolist() == [0, 0, 127, 254, 255, 255, 100, 99]
    assert quantize_recon(x, "round").tolist() == [0, 0, 128, 255, 255, 255, 100, 100]
    assert quantize_recon(x).dtype == torch.uint8
    with pytest.raises(ValueError, match="quantize"):
        quantize_recon(x, "floor")


def test_quantize_known_off_by_one_counts():
    levels = torch.arange(256)
    # an fp16 image in [0, 1], upcast to float32 before quantising: truncation lands low on 131 of 256 levels
    x = (levels.double() / 255).half().float()
    assert int((quantize_recon(x, "truncate") != levels).sum()) == 131
    assert torch.equal(quantize_recon(x, "round"), levels.to(torch.uint8))
    # exact float32 levels survive either way
    x32 = levels.float() / 255
    assert torch.equal(quantize_recon(x32, "truncate"), levels.to(torch.uint8))


def test_meter_quantizes_recon_with_chosen_mode():
    ref = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    recon = torch.full((1, 3, 8, 8), 100 / 255 - 1e-6)  # truncates to 99, rounds to 100
    trunc, rnd = ReconstructionMeter(ssim=False), ReconstructionMeter(ssim=False, quantize="round")
    assert trunc.update(ref, recon)["psnr"].item() == pytest.approx(20 * math.log10(255), abs=1e-9)
    assert rnd.update(ref, recon)["psnr"].item() == 100.0


# ------------------------------------------------------------------------------------------------ meter


def stub_features(images: torch.Tensor) -> torch.Tensor:
    """Inception stand-in with its contract: uint8 (B, 3, H, W) -> (B, 6) float64 (channel means and stds;
    fewer dimensions than images, so the covariances are full rank and the FD is well conditioned)."""
    assert images.dtype == torch.uint8
    x = images.double().flatten(2) / 255
    return torch.cat([x.mean(2), x.std(2)], dim=1)


def _batches(sizes=(3, 5, 2), hw=(16, 20)):
    g = torch.Generator().manual_seed(0)
    out = []
    for b in sizes:
        ref = torch.randint(0, 256, (b, 3, *hw), dtype=torch.uint8, generator=g)
        recon = (ref.float() / 255 + 0.08 * torch.randn(b, 3, *hw, generator=g)).clamp(0, 1)
        out.append((ref, recon))
    return out


def test_meter_merge_equals_one_shot():
    def make():
        return ReconstructionMeter(feature_extractor=stub_features, lpips=StubLPIPS())

    batches = _batches()
    whole = make()
    for ref, recon in batches:
        whole.update(ref, recon)
    rank0, rank1 = make(), make()
    rank0.update(*batches[0])
    rank1.update(*batches[1])
    rank0.update(*batches[2])
    merged = rank0.merge(rank1)
    a, b = whole.result(), merged.result()
    assert set(a) == {
        "n_images",
        "psnr_mean_per_image",
        "ssim_tm_mean_per_image",
        "lpips_vgg_mean_per_image",
        "rfid_vs_ref_images",
    }
    assert a["n_images"] == 10
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), k
    assert a["rfid_vs_ref_images"] > 0
    # merging with an empty meter changes nothing
    assert make().merge(whole).result() == pytest.approx(a, rel=1e-12)
    with pytest.raises(ValueError, match="different settings"):
        whole.merge(ReconstructionMeter(feature_extractor=stub_features, lpips=StubLPIPS(), quantize="round"))


def test_meter_means_equal_functional_per_image_values():
    batches = _batches()
    meter = ReconstructionMeter()
    for ref, recon in batches:
        meter.update(ref, recon)
    ref = torch.cat([r for r, _ in batches]).double() / 255
    recon = torch.cat([quantize_recon(x, "truncate") for _, x in batches]).double() / 255
    res = meter.result()
    assert res["psnr_mean_per_image"] == pytest.approx(psnr_per_image(recon, ref).mean().item(), abs=1e-10)
    assert res["ssim_tm_mean_per_image"] == pytest.approx(ssim_per_image(recon, ref).mean().item(), abs=1e-12)
    assert "rfid_vs_ref_images" not in res and "lpips_vgg_mean_per_image" not in res


def test_rfid_of_identical_sets_is_zero():
    meter = ReconstructionMeter(feature_extractor=stub_features)
    for ref, _ in _batches():
        meter.update(ref, ref.float() / 255)  # exact float32 levels: truncation recovers ref
    res = meter.result()
    assert abs(res["rfid_vs_ref_images"]) < 1e-9
    assert res["psnr_mean_per_image"] == 100.0
    assert res["ssim_tm_mean_per_image"] == pytest.approx(1.0, abs=1e-12)
    # both sides are extracted from images: a shifted reconstruction moves rFID away from 0
    shifted = ReconstructionMeter(feature_extractor=stub_features)
    for ref, _ in _batches():
        shifted.update(ref, (ref.float() / 255 * 0.5))
    assert shifted.result()["rfid_vs_ref_images"] > 1e-3


def test_meter_input_errors():
    meter = ReconstructionMeter()
    with pytest.raises(ValueError, match="no images"):
        meter.result()
    with pytest.raises(ValueError, match="differ in shape"):
        meter.update(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 9))
    with pytest.raises(TypeError, match="uint8 or float"):
        meter.update(torch.zeros(1, 3, 8, 8, dtype=torch.int64), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="quantize"):
        ReconstructionMeter(quantize="nearest")


def test_ssim_and_psnr_against_live_scikit_image():
    """The same comparisons as the hard-coded values above, against scikit-image itself (a dev dependency):
    the SSIM map's interior equals skimage's full map with torchmetrics' settings, PSNR equals skimage's."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    recon, ref = _pair(seed=11, shape=(2, 3, 24, 19))
    ours = ssim_map(torch.from_numpy(recon), torch.from_numpy(ref)).numpy()
    for i in range(2):
        _, full = structural_similarity(
            recon[i], ref[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
            channel_axis=0, full=True,
        )  # fmt: skip
        np.testing.assert_allclose(ours[i][:, 5:-5, 5:-5], full[:, 5:-5, 5:-5], rtol=0, atol=1e-10)
    psnr = psnr_per_image(torch.from_numpy(recon), torch.from_numpy(ref)).numpy()
    expected = [peak_signal_noise_ratio(ref[i], recon[i], data_range=1.0) for i in range(2)]
    np.testing.assert_allclose(psnr, expected, rtol=1e-12)
