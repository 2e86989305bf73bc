"""Sample generation for evaluation and pictures.

Noise for sample i comes from its own generator seeded with (seed, i), and labels are class-balanced by
index, so the images (and the FID) do not depend on the number of processes, the batch size or anything
evaluated before (unlike the reference's global-RNG eval noise, spec ``reference.md`` §10).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nanogen import sampling
from nanogen.conditioning import Cond, LabelConditioner


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: everything ``generate`` needs from the config's sampler / guidance / misc blocks."""

    num_steps: int
    shift: float = 1.0  # sampling-time resolution shift (misc.time_dist_shift_base_eval)
    cfg_scale: float = 1.0  # 1 = no guidance
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    solver: str = "euler"


def per_sample_noise(
    indices: list[int], shape: tuple[int, ...], seed: int, device: torch.device, cls_dim: int | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """Starting noise of samples ``indices``, each from its own generator; with ``cls_dim`` (REG models) also
    the REG token's noise, drawn from the same per-sample generator right after the latent's."""
    out = torch.empty(len(indices), *shape)
    cls = torch.empty(len(indices), cls_dim or 0)
    for j, i in enumerate(indices):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out[j] = torch.randn(shape, generator=g)
        if cls_dim:
            cls[j] = torch.randn(cls_dim, generator=g)
    return (out.to(device), cls.to(device)) if cls_dim else out.to(device)


def reg_dim(objective: nn.Module) -> int | None:
    """The REG token width of an objective's network, or None without REG."""
    return objective.net.cfg.z_dim if getattr(objective, "reg", False) else None


def balanced_labels(indices: list[int], num_classes: int) -> Tensor:
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long)


@torch.no_grad()
def generate(
    objective: nn.Module,  # FlowObjective or MeanFlowObjective
    tokenizer: nn.Module,
    conditioner: LabelConditioner,  # or encoders.text.TextConditioner
    labels: Tensor | Sequence[str],  # class labels, or captions for text-conditioned models
    noise: Tensor | tuple[Tensor, Tensor],
    settings: SamplerSettings,
    *,
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[], None] | None = None,
) -> Tensor:
    """Images in [-1, 1] for the given labels (or captions) and starting noise (B, C, H, W) (REG: plus the
    token's noise)."""
    device = (noise[0] if isinstance(noise, tuple) else noise).device
    cond: Cond = conditioner(labels, device)
    null = conditioner.null(len(labels), device)
    s = settings
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        if hasattr(objective, "average_velocity"):  # MeanFlow: jumps along the average velocity, no guidance (§4.6)
            from nanogen.objectives.meanflow import bind, meanflow_sample

            z = meanflow_sample(bind(objective, cond), noise, s.num_steps, s.shift, on_step)
        else:
            v = sampling.classifier_free(objective.velocity, cond, null, s.cfg_scale, *s.cfg_interval)
            z = sampling.sample(v, noise, s.num_steps, s.shift, s.solver, on_step)
    if isinstance(z, tuple):  # REG: the token was only a companion of the image
        z = z[0]
    return tokenizer.decode(z.float()).clamp(0, 1) * 2 - 1  # tokenizers decode to [0, 1]; nanogen's images are [-1, 1]
