"""Build the parts of a run from a resolved config: tokenizer, network, conditioner, objective, data.

Every builder works offline on CPU at tiny sizes; pretrained weights are loaded by separate calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanogen import registry
from nanogen.conditioning import LabelConditioner
from nanogen.config import Stage1Config, Stage2Config, shift_dim
from nanogen.config.loader import build
from nanogen.errors import NotAvailableError, UserError
from nanogen.eval.generate import SamplerSettings
from nanogen.objectives.flow import FlowObjective, LogitNormal, shift_factor


def build_tokenizer(cfg: Stage2Config) -> nn.Module:
    """The frozen stage-1 latent space (pixel, VAE, RAE); pretrained weights by hub id or ``misc.weights``."""
    name, entry = registry.lookup(registry.TOKENIZERS, cfg.stage_1.target, "stage_1.target")
    C, H, W = cfg.misc.latent_size
    if name == "pixel":
        return entry.load()(None, image_size=H, channels=C)
    params = build(entry.config_cls(), cfg.stage_1.params, source="config", prefix="stage_1.params")
    tok = entry.load()(params, cfg.misc.weights)
    if tuple(tok.latent_shape) != (C, H, W):
        raise UserError(
            f"misc.latent_size: {cfg.misc.latent_size} but the {name} latent space gives {list(tok.latent_shape)} "
            f"at this resolution; make them agree"
        )
    return tok


def build_network(cfg: Stage2Config) -> nn.Module:
    _, entry = registry.lookup(registry.MODELS, cfg.stage_2.target, "stage_2.target")
    params = build(entry.config_cls(), cfg.stage_2.params, source="config", prefix="stage_2.params")
    return entry.load()(params)


def build_conditioner(cfg: Stage2Config, device: torch.device | str = "cpu"):
    """Labels -> ``LabelConditioner``; text -> the frozen text encoder (§3.6) behind a ``TextConditioner``, in
    bf16 when training is, with the config's embedding cache. Its width must be the network's context_dim."""
    if cfg.conditioning.type == "label":
        return LabelConditioner(cfg.misc.num_classes)
    from nanogen.encoders.text import EmbeddingCache, TextConditioner, TextEncoder

    te = cfg.conditioning.text_encoder
    assert te is not None  # resolve() requires it for text conditioning
    dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
    encoder = TextEncoder(te.model_name, te.max_length, device, dtype, cfg.misc.weights)
    if encoder.width != cfg.conditioning.context_dim:
        raise UserError(
            f"conditioning.text_encoder: '{te.model_name}' has width {encoder.width} but the network is built for "
            f"context_dim {cfg.conditioning.context_dim}; use the text encoder the model was trained with, or set "
            f"conditioning.context_dim={encoder.width} for a new model"
        )
    cache_dir = te.cache_dir
    if cache_dir == "auto":
        from nanogen.eval.evaluate import cache_dir as nanogen_cache

        cache_dir = str(nanogen_cache() / "text")
    cache = EmbeddingCache(encoder.identity(), cache_dir)
    return TextConditioner(encoder, cache, out_dtype=torch.float32)


def train_shift(cfg: Stage2Config) -> float:
    return shift_factor(shift_dim(cfg), cfg.misc.time_dist_shift_base)


def eval_shift(cfg: Stage2Config) -> float:
    return shift_factor(shift_dim(cfg), cfg.misc.time_dist_shift_base_eval or cfg.misc.time_dist_shift_base)


def sampler_settings(cfg: Stage2Config) -> SamplerSettings:
    g = cfg.guidance
    return SamplerSettings(
        num_steps=cfg.sampler.num_steps,
        shift=eval_shift(cfg),
        cfg_scale=1.0 if g.disabled else g.cfg.scale,
        cfg_interval=(g.cfg.t_min, g.cfg.t_max),
        solver=cfg.sampler.solver,
    )


def load_network(cfg: Stage2Config, path: str | None, device: torch.device, prefer: str = "ema") -> nn.Module:
    """The stage-2 network with a checkpoint's weights (its EMA entry if it has one), in eval mode.

    Reads nanogen checkpoints and the reference's released ones alike (``nanogen.checkpoint``)."""
    from nanogen import checkpoint as ckpt

    if prefer not in ("ema", "model"):
        raise UserError(f"weights must be 'ema' or 'model', got '{prefer}'")
    path = path or cfg.stage_2.ckpt
    if not path:
        raise UserError("no checkpoint: pass --ckpt PATH or set stage_2.ckpt in the config")
    net = build_network(cfg)
    sd, which = ckpt.weights_from(ckpt.read(path), prefer)
    ckpt.load_weights(net, sd, f"checkpoint '{path}' ({which})")
    return net.to(device).eval()


@dataclass
class Frozen:
    """Frozen networks a training objective reads (never trained, never checkpointed): the REPA / REG target
    encoder and the perceptual-loss networks."""

    encoder: nn.Module | None = None
    perceptual: nn.Module | None = None


def load_frozen(cfg: Stage2Config) -> Frozen:
    """Load the frozen networks the config's objective needs for training (by hub id, or a local path from
    ``misc.weights.<name>`` / the ``NANOGEN_ENCODER_<NAME>`` env var)."""
    from nanogen.encoders import build_encoder

    frozen = Frozen()
    if cfg.repa.use_repa or cfg.repa.use_reg:
        name = cfg.repa.target_encoder
        frozen.encoder = build_encoder(name, cfg.misc.weights.get(name), cfg.repa.target_encoder_resolution)
    if cfg.perceptual_loss.encoders:
        frozen.perceptual = build_perceptual_loss(cfg)
    return frozen


def build_perceptual_loss(cfg: Stage2Config) -> nn.Module:
    """PixelGen's LPIPS + encoder patch-feature losses (§4.7). Frozen weights come from ``misc.weights``:
    ``lpips`` (a directory with vgg16-397923af.pth and vgg.pth, or the LPIPS lin file) and ``lpips-vgg`` (the
    torchvision VGG16 file), else the ``NANOGEN_LPIPS_*`` env vars / local caches; encoders by name."""
    from nanogen.encoders import build_encoder
    from nanogen.models.lpips import load_lpips
    from nanogen.objectives.perceptual import build_perceptual

    w = cfg.misc.weights
    loss = build_perceptual(
        cfg.perceptual_loss.encoders,
        cfg.perceptual_loss.percep_loss_weights,
        cfg.transport.percep_loss_t_thresh,
        encoder_factory=lambda name: build_encoder(name, w.get(name), cfg.training.image_size),
        lpips_factory=lambda: load_lpips(w.get("lpips-vgg", w.get("lpips")), w.get("lpips")),
        skip_gated=False,  # the literal masked full-batch form: no host sync per step, compile-friendly
    )
    assert loss is not None  # only called when perceptual_loss.encoders is set
    return loss


def build_objective(cfg: Stage2Config, net: nn.Module, frozen: Frozen | None = None) -> nn.Module:
    """The objective wrapping ``net``. Without ``frozen`` it can sample but not compute REPA / REG /
    perceptual losses (sampling and evaluation never need the frozen networks)."""
    frozen = frozen or Frozen()
    common = dict(
        prediction=cfg.transport.prediction,
        time_dist=LogitNormal.parse(cfg.transport.time_dist_type),
        shift=train_shift(cfg),
        cfg_dropout_prob=cfg.conditioning.cfg_dropout_prob,
    )
    mf = cfg.transport.meanflow
    if mf is not None:
        from nanogen.objectives.meanflow import MeanFlowObjective

        if cfg.perceptual_loss.encoders:
            raise NotAvailableError("perceptual_loss: perceptual losses with MeanFlow are not available yet")
        return MeanFlowObjective(
            net, **common, fm_ratio=mf.fm_ratio, norm_p=mf.norm_p, norm_eps=mf.norm_eps, cfg_omega=mf.cfg_omega,
            cfg_kappa=mf.cfg_kappa, cfg_t_start=mf.cfg_t_start, cfg_t_end=mf.cfg_t_end,
            seed=42,  # the reference's fixed branch seed, identical on all ranks
        )  # fmt: skip
    return FlowObjective(
        net, **common, t_eps=cfg.transport.t_eps,
        reg_coeff=cfg.repa.reg_coeff if cfg.repa.use_reg else 0.0,
        repa_coeff=cfg.repa.repa_coeff if cfg.repa.use_repa else 0.0,
        encoder=frozen.encoder, perceptual=frozen.perceptual,
    )  # fmt: skip


def load_train_images(cfg: Stage2Config | Stage1Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], labels) of the in-memory built-in digits, or of ``nano-mix`` (stage 1 only; scenes have
    label -1). Stage 2 streams every other dataset through ``data.build_train_loader``; stage 1, compute-stats and
    extract-latents read only these."""
    split = cfg.dataset.split if isinstance(cfg.dataset.split, str) else cfg.dataset.split[0]
    if cfg.dataset.type == "builtin" and cfg.dataset.target == "mnist":
        from nanogen.data.nano import load_nano

        ds = load_nano(split, cfg.training.image_size)
        return ds.images, ds.labels
    if cfg.dataset.type == "builtin" and cfg.dataset.target == "nano-mix":  # both nano tiers' images, stage 1 only
        from nanogen.data import check_kind
        from nanogen.data.nano_mix import load_nano_mix

        if isinstance(cfg, Stage2Config):
            check_kind(cfg)  # refuses it in one line
        ds = load_nano_mix(split, cfg.training.image_size, cfg.dataset.seed)
        return ds.images, ds.labels
    if cfg.dataset.type == "builtin":
        raise UserError(
            f"dataset.target: unknown built-in dataset '{cfg.dataset.target}' here; stage 1, compute-stats and "
            f"extract-latents read 'mnist' and 'nano-mix'"
        )
    raise NotAvailableError(
        f"dataset: '{cfg.dataset.target}' ({cfg.dataset.type}) data for stage-1 training, compute-stats and "
        f"extract-latents is not available in this nanogen release yet (stage-2 `nanogen train` reads it); these "
        f"tools run on the built-in digits: dataset={{type: builtin, target: mnist}}"
    )


def needs_images(cfg: Stage2Config) -> bool:
    """Whether the objective reads the pixel images besides the latents (REPA / REG encoder, perceptual losses)."""
    return bool(cfg.repa.use_repa or cfg.repa.use_reg or cfg.perceptual_loss.encoders)


def check_runnable(cfg: Stage2Config) -> None:
    """Fail before any work if some part of the config is not buildable (so no training time is lost)."""
    from nanogen.encoders.base import default_source
    from nanogen.eval.evaluate import check_metrics

    registry.lookup(registry.TOKENIZERS, cfg.stage_1.target, "stage_1.target")  # planned tokenizers: "not available yet"
    build_objective(cfg, nn.Identity())
    if cfg.repa.use_repa or cfg.repa.use_reg:
        default_source(cfg.repa.target_encoder)  # a known encoder name (loading happens in train)
    if cfg.perceptual_loss.encoders:
        from nanogen.objectives.perceptual import parse_perceptual

        for name, _ in parse_perceptual(cfg.perceptual_loss.encoders, cfg.perceptual_loss.percep_loss_weights):
            if name != "lpips":
                default_source(name)
    if cfg.dataset.latents_dir and cfg.conditioning.type == "text":
        raise NotAvailableError(
            "dataset.latents_dir: latent shards store class labels, not captions; text-conditioned runs encode "
            "their images each step in this release (drop dataset.latents_dir)"
        )
    if cfg.dataset.latents_dir:  # pre-extracted latents: they must match this config's tokenizer and data
        from nanogen.data.latent_shards import check_meta, read_meta

        check_meta(read_meta(cfg.dataset.latents_dir), cfg, cfg.dataset.latents_dir)
    if not cfg.dataset.latents_dir or needs_images(cfg):
        from nanogen.data import check_data

        check_data(cfg)
    if cfg.eval is not None:
        check_metrics(cfg)
