"""Stage-1 evaluation: reconstruction metrics of a tokenizer over a data set (spec ``reference.md`` §6.8,
``evaluation.md``).

Used by ``nanogen eval-stage1`` and by the online evaluation of ``nanogen train-stage1``. Images are sharded
contiguously over ranks; each rank streams its shard through a ``ReconstructionMeter`` and the sums (PSNR, SSIM,
LPIPS per image; Inception moments for rFID) are added across ranks exactly in float64.

Reported names carry their conventions: ``psnr_mean_per_image`` (the mean of per-image PSNRs, not the PSNR of the
pooled MSE), ``ssim_tm_mean_per_image`` (torchmetrics SSIM), ``lpips_vgg_mean_per_image`` and
``rfid_vs_ref_images`` (Inception features of reconstructions vs the same images, both from uint8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nanogen import parallel
from nanogen.config.schema import EvalDatasetConfig
from nanogen.errors import NotAvailableError, UserError
from nanogen.eval.fid import GaussianMoments
from nanogen.eval.reconstruction import ReconstructionMeter
from nanogen.log import progress

STAGE1_METRICS = ("psnr", "ssim", "lpips", "rfid")


def check_stage1_metrics(datasets: dict[str, EvalDatasetConfig]) -> None:
    """Every metric name is a stage-1 metric and every data set can be read (before any training)."""
    for name, ds in datasets.items():
        for m in ds.metrics:
            if m not in STAGE1_METRICS:
                raise UserError(
                    f"eval.datasets.{name}.metrics: '{m}' is not a reconstruction metric "
                    f"(available: {', '.join(STAGE1_METRICS)})"
                )
        _check_source(name, ds)


def _check_source(name: str, ds: EvalDatasetConfig) -> None:
    target = ds.target or name
    if ds.type == "builtin" and target in ("mnist", "nano-mix"):
        return
    if ds.type == "builtin":
        raise UserError(
            f"eval.datasets.{name}: unknown built-in data set '{target}'; the built-in ones are 'mnist' and 'nano-mix'"
        )
    raise NotAvailableError(
        f"eval.datasets.{name}: '{target}' ({ds.type}) data is not available in this nanogen release yet; the "
        f"built-in digits work (eval.datasets.mnist: {{type: builtin, split: heldout}})"
    )


def load_eval_images(name: str, ds: EvalDatasetConfig, image_size: int, limit: int | None = None) -> Tensor:
    """Images (N, 3, S, S) in [0, 1] of an evaluation data set, the first ``limit`` (default: ``num_samples``)."""
    _check_source(name, ds)
    if (ds.target or name) == "nano-mix":
        from nanogen.data.nano_mix import load_nano_mix

        images = (load_nano_mix(ds.split, image_size).images + 1) / 2  # digits and scenes alternate: any prefix has both
    else:
        from nanogen.data.nano import load_nano

        images = (load_nano(ds.split, image_size).images + 1) / 2
    n = min(len(images), limit if limit is not None else ds.num_samples)
    return images[:n]


def _all_reduce_meter(meter: ReconstructionMeter, device: torch.device) -> ReconstructionMeter:
    """Sum a meter's statistics over ranks (exact: float64 sums)."""
    if not torch.distributed.is_initialized():
        return meter
    sums = torch.tensor(
        [meter.n, meter.psnr_sum, meter.ssim_sum, meter.lpips_sum], dtype=torch.float64, device=device
    )
    parallel.all_reduce_sum(sums)
    meter.n, meter.psnr_sum, meter.ssim_sum, meter.lpips_sum = int(sums[0]), *(float(v) for v in sums[1:])
    for attr in ("recon_moments", "ref_moments"):
        mom: GaussianMoments | None = getattr(meter, attr)
        if mom is not None:
            setattr(meter, attr, mom.reduce(parallel.all_reduce_sum, device))
    return meter


@torch.no_grad()
def evaluate_reconstruction(
    reconstruct: Callable[[Tensor], Tensor],
    images01: Tensor,
    metrics: list[str],
    device: torch.device,
    batch_size: int = 64,
    lpips_quirk: bool = False,
    desc: str = "stage-1 eval",
) -> tuple[dict[str, float], Tensor]:
    """Metrics of ``reconstruct`` (images in [0, 1] -> reconstructions, not necessarily clamped) over
    ``images01``; also returns the first (up to 8) reconstructions, clamped, for a picture."""
    unknown = [m for m in metrics if m not in STAGE1_METRICS]
    if unknown:
        raise UserError(f"stage-1 metrics: unknown {unknown} (available: {', '.join(STAGE1_METRICS)})")
    extractor = lpips = None
    if "rfid" in metrics:
        from nanogen.eval.inception import InceptionFeatures

        extractor = InceptionFeatures(device)
    if "lpips" in metrics:
        from nanogen.models.lpips import load_lpips

        lpips = load_lpips(device=device)  # one clear line if the VGG / lin weights are not on this machine
    meter = ReconstructionMeter(extractor, lpips, lpips_batch_mean_quirk=lpips_quirk, ssim="ssim" in metrics)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if torch.distributed.is_initialized() else (0, 1)
    per = -(-len(images01) // world)
    shard = images01[rank * per : (rank + 1) * per]  # contiguous per-rank shards, as the reference
    preview = None
    with progress(len(shard), desc, unit="img", leave=False) as bar:
        for i in range(0, len(shard), batch_size):
            x = shard[i : i + batch_size].to(device)
            recon = reconstruct(x).float().clamp(0, 1)
            meter.update(x, recon)
            if preview is None:
                preview = recon[:8].cpu()
            bar.update(len(x))
    meter = _all_reduce_meter(meter, device)
    res = meter.result()
    if "psnr" not in metrics:
        res.pop("psnr_mean_per_image")
    return res, preview if preview is not None else torch.empty(0, 3, 1, 1)
