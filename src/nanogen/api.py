"""The Python API for stage-2 networks: build one from a config, load released or nanogen checkpoints.

    import nanogen
    net = nanogen.load_stage2("configs/stage2/sampling/imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-vpred-t4c8.yaml")
    net = nanogen.load_stage2("my.yaml", "pretrained_models/imagenet/ckpts/<name>-v0.pt", weights="model")
    net = nanogen.build_stage2("my.yaml", ["stage_2.params.depth=[2,1]"])          # random init, no weights

A checkpoint may be a DiffusionBench release (``{"model", "ema", ...}`` with its RoPE buffers), a nanogen
training checkpoint, a file written by ``nanogen convert-checkpoint``, a raw state dict or a ``.safetensors``
file. Loading is strict: missing, unexpected or mis-shaped keys are named in one ``CheckpointError``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nanogen.config import Stage2Config, load_config


def _config(config: str | Path | Stage2Config, overrides: list[str] | None) -> Stage2Config:
    if isinstance(config, Stage2Config):
        if overrides:
            raise ValueError(
                "overrides apply to a config path; edit the Stage2Config object directly instead"
            )
        return config
    return load_config(config, overrides)


def build_stage2(
    config: str | Path | Stage2Config, overrides: list[str] | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """The stage-2 network of a config, randomly initialised (use ``device="meta"`` to inspect sizes for free)."""
    from nanogen.build import build_network

    cfg = _config(config, overrides)
    with torch.device(device):
        return build_network(cfg)


def load_stage2(
    config: str | Path | Stage2Config,
    ckpt: str | Path | None = None,
    *,
    weights: str = "ema",
    overrides: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The stage-2 network of a config with a checkpoint's weights (default: ``stage_2.ckpt`` of the config), in
    eval mode. ``weights``: "ema" (falls back to "model" if the file has no EMA) or "model"."""
    from nanogen.build import load_network

    cfg = _config(config, overrides)
    return load_network(cfg, None if ckpt is None else str(ckpt), torch.device(device), prefer=weights)
