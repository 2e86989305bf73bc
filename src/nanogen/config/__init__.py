"""The config tree: schema (``schema.py``), strict loading and composition (``loader.py``), and ``resolve``,
the single function that derives runtime fields (the reference's ``post_process`` + ``prepare_model_params``).

    cfg = load_config("configs/nano/demo.yaml", ["training.max_steps=200"])
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from nanogen.config.loader import build, builtin_configs_dir, compose, dump_yaml, find_config, to_dict
from nanogen.config.schema import Stage1Config, Stage2Config
from nanogen.errors import ConfigError

__all__ = [
    "Stage1Config",
    "Stage2Config",
    "build",
    "builtin_configs_dir",
    "compose",
    "dump_yaml",
    "find_config",
    "load_config",
    "load_stage1_config",
    "resolve",
    "to_dict",
]

# Widths (z_dim) of §6.5 encoders that nanogen's registry does not know yet (none at present); the registry's
# encoders report theirs, built or not (nanogen.encoders.encoder_width: dinov2/3, siglip2, mae, pe, spatialpe,
# langpe, convnextv2, and the unbuildable eupe, tipsv2).
PLANNED_ENCODER_WIDTHS: dict[str, int] = {}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Stage2Config:
    cfg = compose(path, overrides, Stage2Config)
    return resolve(cfg, Path(path).stem if path is not None else None)


def resolve(cfg: Stage2Config, default_name: str | None = None) -> Stage2Config:
    """Derive runtime fields and check cross-field rules. Idempotent: resolving a resolved config is a no-op."""
    from nanogen import registry

    # --- conditioning (reference post_process) ---
    if cfg.transport.meanflow is not None:
        cfg.guidance.disabled = True
    if cfg.dataset.condition_type is not None and cfg.conditioning.type != cfg.dataset.condition_type:
        cfg.conditioning.type = cfg.dataset.condition_type
    if cfg.conditioning.type == "text":
        if cfg.conditioning.text_encoder is None:
            raise ConfigError(
                "conditioning.text_encoder: text conditioning needs a text encoder block, "
                "e.g. conditioning.text_encoder={model_name: Qwen/Qwen3-0.6B, max_length: 256}"
            )
        if cfg.conditioning.text_encoder.max_length < 1:
            raise ConfigError(f"conditioning.text_encoder.max_length: must be >= 1, got {cfg.conditioning.text_encoder.max_length}")
        cfg.conditioning.arch.num_c_tokens = cfg.conditioning.text_encoder.max_length
        if cfg.conditioning.context_dim is None:
            from nanogen.encoders.text import text_encoder_width

            width = text_encoder_width(cfg.conditioning.text_encoder.model_name, cfg.misc.weights)
            if width is None:
                raise ConfigError(
                    f"conditioning.context_dim: unknown width for text encoder "
                    f"'{cfg.conditioning.text_encoder.model_name}'; set conditioning.context_dim to its hidden size"
                )
            cfg.conditioning.context_dim = width
    if cfg.repa.use_reg and cfg.transport.meanflow is not None:
        raise ConfigError("repa.use_reg: REG cannot be combined with MeanFlow (transport.meanflow); turn one off")
    if (cfg.repa.use_repa or cfg.repa.use_reg) and not cfg.repa.target_encoder:
        raise ConfigError("repa.target_encoder: REPA/REG need a target encoder, e.g. dinov2-vit-b")
    if (cfg.repa.use_repa or cfg.repa.use_reg) and cfg.repa.z_dim is None:
        from nanogen.encoders.base import encoder_width

        name = cfg.repa.target_encoder
        width = PLANNED_ENCODER_WIDTHS.get(name) or (encoder_width(name) if name.count("-") == 2 else None)
        if width is None:
            raise ConfigError(
                f"repa.z_dim: unknown width for target encoder '{cfg.repa.target_encoder}'; set repa.z_dim to its embedding size"
            )
        cfg.repa.z_dim = width
    for where, g in (("guidance.cfg", cfg.guidance.cfg), ("guidance.ig", cfg.guidance.ig)):
        if not 0.0 <= g.t_min <= g.t_max <= 1.0:
            raise ConfigError(
                f"{where}: the guidance interval [t_min, t_max] = [{g.t_min}, {g.t_max}] must satisfy "
                f"0 <= t_min <= t_max <= 1 (t = 1 is noise)"
            )
    from nanogen.objectives.flow import LogitNormal

    LogitNormal.parse(cfg.transport.time_dist_type)  # a clear error for unknown time distributions, at load time
    if cfg.perceptual_loss.encoders:
        names = [n.strip() for n in cfg.perceptual_loss.encoders.split(",")]
        weights = cfg.perceptual_loss.percep_loss_weights
        if len(names) != len(weights):
            raise ConfigError(
                f"perceptual_loss.percep_loss_weights: {len(weights)} weights for {len(names)} encoders "
                f"({cfg.perceptual_loss.encoders}); give one weight per encoder, in the same order"
            )
        if cfg.transport.meanflow is None and cfg.transport.prediction != "x":
            raise ConfigError(
                "perceptual_loss: the perceptual losses read the predicted clean image, so they need "
                "transport.prediction: x (got velocity); switch to x-prediction or drop perceptual_loss.encoders"
            )
        if registry.ALIASES.get(cfg.stage_1.target, cfg.stage_1.target) != "pixel":
            raise ConfigError(
                f"perceptual_loss: the perceptual losses compare predicted and real pixels, so they need the pixel "
                f"space (stage_1.target: pixel), got '{cfg.stage_1.target}'"
            )
        if not 0 < cfg.transport.percep_loss_t_thresh <= 1:
            raise ConfigError(f"transport.percep_loss_t_thresh: must be in (0, 1], got {cfg.transport.percep_loss_t_thresh}")
    if cfg.training.grad_accum_steps < 1:
        raise ConfigError(f"training.grad_accum_steps: must be >= 1, got {cfg.training.grad_accum_steps}")
    if len(cfg.misc.latent_size) != 3:
        raise ConfigError(f"misc.latent_size: expected [C, H, W], got {cfg.misc.latent_size}")
    if not 0 <= cfg.conditioning.cfg_dropout_prob < 1:
        raise ConfigError(f"conditioning.cfg_dropout_prob: must be in [0, 1), got {cfg.conditioning.cfg_dropout_prob}")
    tc = cfg.training
    for path, value, ok, rule in [
        ("sampler.num_steps", cfg.sampler.num_steps, cfg.sampler.num_steps >= 1, ">= 1"),
        ("training.max_steps", tc.max_steps, tc.max_steps is None or tc.max_steps >= 0, ">= 0 (or null)"),
        ("training.batch_size", tc.batch_size, tc.batch_size >= 1, ">= 1"),
        ("training.log_interval", tc.log_interval, tc.log_interval >= 1, ">= 1"),
        ("training.ema_decay", tc.ema_decay, 0 <= tc.ema_decay <= 1, "in [0, 1]"),
    ]:
        if not ok:
            raise ConfigError(f"{path}: must be {rule}, got {value}")
    for name, ds in (cfg.eval.datasets if cfg.eval is not None else {}).items():
        if ds.num_samples < 2 or ds.batch_size < 1:
            raise ConfigError(
                f"eval.datasets.{name}: num_samples must be >= 2 (a covariance needs two) and batch_size >= 1, "
                f"got {ds.num_samples} and {ds.batch_size}"
            )

    # --- names resolve through the registries ---
    name1, entry1 = registry.lookup(registry.TOKENIZERS, cfg.stage_1.target, "stage_1.target")
    if name1 in registry.TRAIN_ONLY_TOKENIZERS:
        raise ConfigError(
            f"stage_1.target: '{name1}' is a stage-1 training target (nanogen train-stage1); a stage-2 run loads its "
            f"exported weights with {registry.TRAIN_ONLY_TOKENIZERS[name1]}"
        )
    cfg.stage_1.target = name1
    params1 = registry.build_params(entry1, cfg.stage_1.params, "stage_1.params")  # strict, typed
    if hasattr(params1, "check"):
        params1.check()
    cfg.stage_1.params = to_dict(params1) if params1 is not None else {}
    name2, entry2 = registry.lookup(registry.MODELS, cfg.stage_2.target, "stage_2.target")
    cfg.stage_2.target = name2

    # --- stage-2 params (reference prepare_model_params): fill what YAML left unset, then check strictly ---
    C, H, W = cfg.misc.latent_size
    derived = {
        "in_channels": C,
        "input_size": H,
        "condition_type": cfg.conditioning.type,
        "num_classes": cfg.misc.num_classes,
        "context_dim": cfg.conditioning.context_dim,
        "cond_arch": dataclasses.asdict(cfg.conditioning.arch),
        "enable_reg": cfg.repa.use_reg,
        "enable_repa": cfg.repa.use_repa,
        "repa_layer_depth": cfg.repa.repa_layer_depth,
        "z_dim": cfg.repa.z_dim,
        "is_meanflow": cfg.transport.meanflow is not None,
        "base_model_depth": cfg.internal_guidance.base_model_depth,
    }
    fields = registry.params_fields(entry2)
    params = {**entry2.defaults, **cfg.stage_2.params}
    for k, v in derived.items():
        if k in fields:
            params.setdefault(k, v)
    # Text conditioning always uses one token per text position, whatever the label preset said.
    if "cond_arch" in fields and cfg.conditioning.type == "text":
        params["cond_arch"] = {**params["cond_arch"], "num_c_tokens": cfg.conditioning.arch.num_c_tokens}
    model_cfg = registry.build_params(entry2, params, "stage_2.params")
    if hasattr(model_cfg, "input_size") and (model_cfg.input_size != H or H != W):
        raise ConfigError(
            f"stage_2.params.input_size: {model_cfg.input_size} does not match misc.latent_size {cfg.misc.latent_size} "
            f"(square latents only); make them agree"
        )
    if hasattr(model_cfg, "in_channels") and model_cfg.in_channels != C:
        raise ConfigError(
            f"stage_2.params.in_channels: {model_cfg.in_channels} does not match misc.latent_size channels {C}"
        )
    if hasattr(model_cfg, "check"):
        model_cfg.check()
    cfg.stage_2.params = to_dict(model_cfg)

    # --- run ---
    if cfg.run.name is None:
        cfg.run.name = default_name or cfg.task or "run"
    return cfg


def load_stage1_config(path: str | Path | None, overrides: list[str] | None = None) -> Stage1Config:
    cfg = compose(path, overrides, Stage1Config)
    return resolve_stage1(cfg, Path(path).stem if path is not None else None)


def resolve_stage1(cfg: Stage1Config, default_name: str | None = None) -> Stage1Config:
    """Check a stage-1 run's config (spec ``reference.md`` §2.2, §6.7) and resolve its names. Idempotent."""
    from nanogen import registry

    name, entry = registry.lookup(registry.TOKENIZERS, cfg.stage_1.target, "stage_1.target")
    cfg.stage_1.target = name
    params = registry.build_params(entry, cfg.stage_1.params, "stage_1.params")
    if hasattr(params, "check"):
        params.check()
    cfg.stage_1.params = to_dict(params) if params is not None else {}
    tc, loss = cfg.training, cfg.gan.loss
    for path, value, ok, rule in [
        ("training.max_steps", tc.max_steps, tc.max_steps is None or tc.max_steps >= 0, ">= 0 (or null)"),
        ("training.batch_size", tc.batch_size, tc.batch_size >= 1, ">= 1"),
        ("training.log_interval", tc.log_interval, tc.log_interval >= 1, ">= 1"),
        ("training.ema_decay", tc.ema_decay, 0 <= tc.ema_decay <= 1, "in [0, 1]"),
        ("gan.loss.disc_weight", loss.disc_weight, loss.disc_weight >= 0, ">= 0 (0 = no GAN)"),
        ("gan.loss.perceptual_weight", loss.perceptual_weight, loss.perceptual_weight >= 0, ">= 0 (0 = no LPIPS)"),
        ("gan.loss.disc_updates", loss.disc_updates, loss.disc_updates >= 1, ">= 1"),
        ("gan.loss.max_d_weight", loss.max_d_weight, loss.max_d_weight > 0, "> 0"),
        ("gan.augment.prob", cfg.gan.augment.prob, 0 <= cfg.gan.augment.prob <= 1, "in [0, 1]"),
    ]:
        if not ok:
            raise ConfigError(f"{path}: must be {rule}, got {value}")
    if tc.grad_accum_steps != 1:
        raise ConfigError(
            f"training.grad_accum_steps: stage-1 training takes one generator and one discriminator step per "
            f"batch (§6.7), so accumulation is not supported; got {tc.grad_accum_steps}, use 1"
        )
    for name_, ds in (cfg.eval.datasets if cfg.eval is not None else {}).items():
        if ds.batch_size < 1:
            raise ConfigError(f"eval.datasets.{name_}.batch_size: must be >= 1, got {ds.batch_size}")
    if cfg.run.name is None:
        cfg.run.name = default_name or "stage1"
    return cfg


def shift_dim(cfg: Stage2Config) -> int:
    return cfg.misc.time_dist_shift_dim or math.prod(cfg.misc.latent_size)
