"""Stage-1 reconstruction metrics: PSNR, SSIM, LPIPS, rFID (spec ``evaluation.md`` §4, ``reference.md`` §6.8).

Conventions, each recorded in the metric's name:

- Quantisation. The reference turns reconstructions into uint8 once, with
  ``recon.clamp(0, 1).mul(255).to(uint8)`` (truncation), and scores those uint8 images against the uint8
  reference images; ``quantize_recon(mode="truncate")`` reproduces that and is the meter's default.
  ``mode="round"`` rounds to nearest (``images.to_uint8``), which the spec recommends for new numbers (§0.3).
  Float reference images in [0, 1] are always rounded (their source is uint8, so this recovers it exactly).
- PSNR (``psnr_mean_per_image``): per image, MSE over C·H·W, clamped at 1e-10 (a 100 dB cap at data range 1),
  ``20·log10(range/√MSE)``; the reported number is the *mean of per-image PSNR*, not the PSNR of the pooled
  MSE (``psnr_pooled``, kept only for comparison).
- SSIM (``ssim_tm_mean_per_image``): the torchmetrics ``structural_similarity_index_measure`` convention with
  its defaults (read from the spec and checked against torchmetrics 1.9.0): a separable Gaussian window of
  σ = 1.5 with ``int(3.5σ + 0.5)·2 + 1`` = 11 taps, K1 = 0.01, K2 = 0.03, data range 1; each image is
  reflect-padded by 5 px (``F.pad(mode="reflect")``, no edge repeat), filtered 'valid' so the map has the
  image's size, population (biased) local variances clamped at 0, and the map is averaged over C, H, W
  *including the border* (scikit-image crops the 5 px border, so its mean differs; its map agrees in the
  interior). Computed in float64.
- LPIPS (``lpips_vgg_mean_per_image`` by default): a passed-in LPIPS module on images mapped from [0, 1] to
  [-1, 1]. QUIRK (``reference.md`` §6.8): the reference broadcasts each batch's mean to every image of that
  batch. ``batch_mean_quirk=True`` reproduces that for the per-image values; the mean over the data set is
  the same either way (a batch mean broadcast to its n images sums to the batch's sum), so only per-image
  values (and statistics other than the mean) differ.
- rFID (``rfid_vs_ref_images``): Fréchet distance between the Inception features of the reconstructions and
  of the reference images, both extracted from uint8 images in the same run (torch-fidelity
  ``input1=recons, input2=originals``); not comparable to rFID against precomputed train statistics.

``ReconstructionMeter`` streams ``(ref, recon)`` batches, keeps sums and ``GaussianMoments`` (all mergeable
across ranks with ``merge``) and reports the means with ``result()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nanogen.eval.fid import GaussianMoments, fid_from_moments
from nanogen.eval.images import to_uint8

QUANTIZE_MODES = ("truncate", "round")
MSE_FLOOR = 1e-10  # the reference's clamp: PSNR is capped at 100 dB for data range 1

SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# ----------------------------------------------------------------------------------------------------------
# Quantisation


def quantize_recon(recon01: Tensor, mode: str = "truncate") -> Tensor:
    """Reconstructions in [0, 1] (any float dtype) -> uint8. ``truncate``: the reference's
    ``clamp(0, 1).mul(255).to(uint8)``; ``round``: round half to even after clamping (``to_uint8``)."""
    if mode == "truncate":
        return recon01.clamp(0, 1).mul(255).to(torch.uint8)
    if mode == "round":
        return to_uint8(recon01, (0.0, 1.0))
    raise ValueError(f"quantize mode must be one of {QUANTIZE_MODES}, got {mode!r}")


def _check_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{what}: the two image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    if a.ndim != 4:
        raise ValueError(f"{what}: expected (B, C, H, W) images, got shape {tuple(a.shape)}")


# ----------------------------------------------------------------------------------------------------------
# PSNR


def _mse_per_image(recon: Tensor, ref: Tensor) -> Tensor:
    d = recon.double() - ref.double()
    return d.pow(2).flatten(1).mean(1)


def psnr_per_image(recon01: Tensor, ref01: Tensor, data_range: float = 1.0) -> Tensor:
    """(B,) float64 PSNR in dB: MSE over C·H·W per image, clamped at 1e-10·range², ``20·log10(range/√MSE)``.

    With ``data_range=255`` on the same images scaled by 255 it gives the same values."""
    _check_pair(recon01, ref01, "PSNR")
    mse = _mse_per_image(recon01, ref01) / (data_range * data_range)
    return 20 * torch.log10(1 / mse.clamp(min=MSE_FLOOR).sqrt())


def psnr_pooled(recon01: Tensor, ref01: Tensor, data_range: float = 1.0) -> float:
    """PSNR of the MSE pooled over all images (torchmetrics ``PeakSignalNoiseRatio(dim=None)``). Not the
    reported metric; it differs from the mean of per-image PSNR when images have different errors."""
    _check_pair(recon01, ref01, "PSNR")
    mse = float(_mse_per_image(recon01, ref01).mean()) / (data_range * data_range)
    return 20 * math.log10(1 / math.sqrt(max(mse, MSE_FLOOR)))


# ----------------------------------------------------------------------------------------------------------
# SSIM (torchmetrics convention)


def gaussian_window(sigma: float = SSIM_SIGMA, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalised 1-D Gaussian of torchmetrics' SSIM: ``int(3.5σ + 0.5)·2 + 1`` taps centred on 0."""
    size = int(3.5 * sigma + 0.5) * 2 + 1
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (d / sigma) ** 2)
    return (g / g.sum()).to(dtype)


def ssim_map(
    recon01: Tensor,
    ref01: Tensor,
    data_range: float = 1.0,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> Tensor:
    """(B, C, H, W) float64 SSIM map, torchmetrics convention (module docstring), border included."""
    _check_pair(recon01, ref01, "SSIM")
    x, y = recon01.double(), ref01.double()
    B, C, H, W = x.shape
    g = gaussian_window(sigma).to(x.device)
    pad = (g.numel() - 1) // 2
    if min(H, W) <= pad:
        raise ValueError(f"SSIM with sigma={sigma} needs images larger than {pad}x{pad}, got {H}x{W}")
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    stack = torch.cat([x, y, x * x, y * y, x * y]).reshape(5 * B * C, 1, H + 2 * pad, W + 2 * pad)
    stack = F.conv2d(stack, g.view(1, 1, -1, 1))  # 'valid' over rows, then columns
    stack = F.conv2d(stack, g.view(1, 1, 1, -1))
    mu_x, mu_y, e_xx, e_yy, e_xy = stack.reshape(5, B, C, H, W)
    var_x = (e_xx - mu_x * mu_x).clamp(min=0)
    var_y = (e_yy - mu_y * mu_y).clamp(min=0)
    cov = e_xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )


def ssim_per_image(recon01: Tensor, ref01: Tensor, data_range: float = 1.0, chunk: int = 32) -> Tensor:
    """(B,) float64 SSIM (torchmetrics convention): the map's mean over C, H, W, border included.
    ``chunk`` images at a time bounds the float64 working memory."""
    _check_pair(recon01, ref01, "SSIM")
    out = [
        ssim_map(recon01[i : i + chunk], ref01[i : i + chunk], data_range).flatten(1).mean(1)
        for i in range(0, recon01.shape[0], chunk)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# LPIPS


def lpips_per_image(
    lpips: Callable[[Tensor, Tensor], Tensor],
    recon01: Tensor,
    ref01: Tensor,
    batch_mean_quirk: bool = False,
) -> Tensor:
    """(B,) LPIPS of images in [0, 1], fed to ``lpips(x0, x1)`` (-> (B,)) as ``2x - 1`` in [-1, 1].

    ``batch_mean_quirk=True``: every image gets its batch's mean (the reference's behaviour). The mean over
    the batch is unchanged; the per-image values are not."""
    _check_pair(recon01, ref01, "LPIPS")
    with torch.no_grad():
        d = lpips(recon01.float() * 2 - 1, ref01.float() * 2 - 1).reshape(-1)
    if d.shape[0] != recon01.shape[0]:
        raise ValueError(f"LPIPS module returned {d.shape[0]} values for a batch of {recon01.shape[0]}")
    d = d.detach().double().cpu()
    return d.mean().expand(d.shape[0]).clone() if batch_mean_quirk else d


# ----------------------------------------------------------------------------------------------------------
# Streaming meter


class ReconstructionMeter:
    """Streams ``(ref, recon)`` batches; ``result()`` gives the data-set metrics (names carry conventions).

    ``feature_extractor``: uint8 (B, 3, H, W) -> (B, d) features (``InceptionFeatures`` for rFID); None skips
    rFID. ``lpips``: an LPIPS module (``models.lpips.load_lpips()``); None skips LPIPS. ``quantize``: how float
    reconstructions become uint8 (``truncate`` = the reference). ``ssim``: False skips SSIM.
    """

    def __init__(
        self,
        feature_extractor: Callable[[Tensor], Tensor] | None = None,
        lpips: Callable[[Tensor, Tensor], Tensor] | None = None,
        quantize: str = "truncate",
        lpips_batch_mean_quirk: bool = False,
        lpips_name: str = "lpips_vgg",
        ssim: bool = True,
    ):
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
        self.feature_extractor = feature_extractor
        self.lpips = lpips
        self.quantize = quantize
        self.lpips_batch_mean_quirk = lpips_batch_mean_quirk
        self.lpips_name = lpips_name
        self.ssim = ssim
        self.n = 0
        self.psnr_sum = 0.0
        self.ssim_sum = 0.0
        self.lpips_sum = 0.0
        self.recon_moments: GaussianMoments | None = None
        self.ref_moments: GaussianMoments | None = None

    def _config(self) -> tuple:
        return (
            self.feature_extractor is not None,
            self.lpips is not None,
            self.quantize,
            self.lpips_batch_mean_quirk,
            self.lpips_name,
            self.ssim,
        )

    def _to_uint8(self, images: Tensor, is_recon: bool) -> Tensor:
        if images.dtype == torch.uint8:
            return images
        if not images.is_floating_point():
            raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
        return quantize_recon(images, self.quantize) if is_recon else to_uint8(images, (0.0, 1.0))

    def update(self, ref: Tensor, recon: Tensor) -> dict[str, Tensor]:
        """Add a batch. ``ref``, ``recon``: (B, 3, H, W), uint8 or float in [0, 1] (float ``recon`` is quantised
        with ``self.quantize``, float ``ref`` is rounded). Returns the batch's per-image values (float64)."""
        _check_pair(recon, ref, "ReconstructionMeter.update")
        ref_u8, recon_u8 = self._to_uint8(ref, False), self._to_uint8(recon, True)
        ref01, recon01 = ref_u8.double() / 255, recon_u8.double() / 255
        per_image = {"psnr": psnr_per_image(recon01, ref01).cpu()}
        if self.ssim:
            per_image["ssim_tm"] = ssim_per_image(recon01, ref01).cpu()
        if self.lpips is not None:
            per_image[self.lpips_name] = lpips_per_image(
                self.lpips, recon01, ref01, self.lpips_batch_mean_quirk
            )
        if self.feature_extractor is not None:
            f_recon, f_ref = self.feature_extractor(recon_u8), self.feature_extractor(ref_u8)
            if self.recon_moments is None or self.ref_moments is None:
                self.recon_moments = GaussianMoments.empty(f_recon.shape[1])
                self.ref_moments = GaussianMoments.empty(f_ref.shape[1])
            self.recon_moments.update(f_recon)
            self.ref_moments.update(f_ref)
        self.n += ref.shape[0]
        self.psnr_sum += float(per_image["psnr"].sum())
        if self.ssim:
            self.ssim_sum += float(per_image["ssim_tm"].sum())
        if self.lpips is not None:
            self.lpips_sum += float(per_image[self.lpips_name].sum())
        return per_image

    def merge(self, other: ReconstructionMeter) -> ReconstructionMeter:
        """A new meter holding both meters' data (e.g. two ranks' shards); configurations must match."""
        if self._config() != other._config():
            raise ValueError(
                f"cannot merge meters with different settings: {self._config()} vs {other._config()}"
            )
        out = ReconstructionMeter(
            self.feature_extractor,
            self.lpips,
            self.quantize,
            self.lpips_batch_mean_quirk,
            self.lpips_name,
            self.ssim,
        )
        out.n = self.n + other.n
        out.psnr_sum = self.psnr_sum + other.psnr_sum
        out.ssim_sum = self.ssim_sum + other.ssim_sum
        out.lpips_sum = self.lpips_sum + other.lpips_sum
        for name in ("recon_moments", "ref_moments"):
            a, b = getattr(self, name), getattr(other, name)
            setattr(out, name, a.merge(b) if a is not None and b is not None else a or b)
        return out

    def result(self) -> dict[str, float]:
        """``n_images``, ``psnr_mean_per_image``, ``ssim_tm_mean_per_image``, ``<lpips_name>_mean_per_image``
        and ``rfid_vs_ref_images`` (each only when enabled)."""
        if self.n == 0:
            raise ValueError("ReconstructionMeter.result(): no images were added")
        out = {"n_images": float(self.n), "psnr_mean_per_image": self.psnr_sum / self.n}
        if self.ssim:
            out["ssim_tm_mean_per_image"] = self.ssim_sum / self.n
        if self.lpips is not None:
            out[f"{self.lpips_name}_mean_per_image"] = self.lpips_sum / self.n
        if self.feature_extractor is not None:
            assert self.recon_moments is not None and self.ref_moments is not None
            out["rfid_vs_ref_images"] = fid_from_moments(self.recon_moments, self.ref_moments)
        return out

    def conventions(self) -> dict[str, str]:
        """A human-readable note of every convention in force, to log next to ``result()``."""
        return {
            "quantize": f"recon -> uint8 by {self.quantize}; float ref rounded",
            "psnr": "mean over images of 20*log10(1/sqrt(max(mse_CHW, 1e-10))) on uint8/255",
            "ssim": "torchmetrics: gaussian 11 taps sigma 1.5, k1 .01, k2 .03, reflect pad 5, border included",
            "lpips": f"{self.lpips_name} on [-1,1]; per-image values "
            + ("batch-mean broadcast (reference quirk)" if self.lpips_batch_mean_quirk else "per image"),
            "rfid": "FD of Inception features of recon vs reference images, both extracted from uint8",
        }
