"""Optimizer and learning-rate schedule (spec ``reference.md`` §1.5).

Schedule factor per optimizer step s (LambdaLR):
- warmup (s < W): (s + 1) / W if ``warmup_from_zero`` else 1.0 (the reference's stage-2 configs hold base_lr);
- after ``decay_end`` (s >= E): final / base;
- between: linear 1 - (1 - r) p or cosine r + (1 - r) (1 + cos(pi p)) / 2, with p = (s - W) / (E - W), r = final / base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanogen.config.schema import OptimizerConfig, SchedulerConfig
from nanogen.errors import NotAvailableError


def build_optimizer(
    net: nn.Module, cfg: OptimizerConfig, device: torch.device, fused: bool = True
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: fused kernels on CUDA, else foreach (FSDP2's sharded parameters)."""
    params = [p for p in net.parameters() if p.requires_grad]
    if cfg.type == "gmuon":
        raise NotAvailableError("training.optimizer.type: 'gmuon' is not available in this nanogen release yet; use 'adamw'")
    fused = fused and device.type == "cuda"
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps,
        fused=fused, foreach=None if fused else True,
    )


def lr_factor(step: int, cfg: SchedulerConfig, steps_per_epoch: int) -> float:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
    end = cfg.decay_end_steps if cfg.decay_end_steps is not None else int(cfg.decay_end_epoch * steps_per_epoch)
    r = cfg.final_lr / cfg.base_lr
    if step < warmup:
        return (step + 1) / warmup if cfg.warmup_from_zero else 1.0
    if step >= end or cfg.type == "constant":
        return r if step >= end else 1.0
    p = (step - warmup) / max(1, end - warmup)
    if cfg.type == "linear":
        return 1 - (1 - r) * p
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: SchedulerConfig | None, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    if cfg is None:
        return None
    for g in opt.param_groups:
        g["lr"] = cfg.base_lr
        g["initial_lr"] = cfg.base_lr
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, steps_per_epoch))
