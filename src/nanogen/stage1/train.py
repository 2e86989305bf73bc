"""The stage-1 loop, ``nanogen train-stage1`` (spec ``reference.md`` §6.7).

Trains the decoder of an RAE (frozen encoder) or a whole KL-VAE with

    L = |x̂ - x|₁ + w_p · LPIPS(x̂, x) [from lpips_start] + w_kl · KL [KL-VAE only]
        + w_d · λ · L_gan(D(aug(2x̂ - 1)))   [from disc_start; λ = adaptive weight on the last decoder layer]

then, from ``disc_upd_start``, ``disc_updates`` discriminator steps per batch on a no-grad, eval-mode,
8-bit-quantised reconstruction (hinge loss, DiffAug on real and fake). Schedules count whole epochs, as the
reference. ``gan.loss.disc_weight: 0`` trains without a discriminator (nothing is built or loaded for it);
``gan.loss.perceptual_weight: 0`` without LPIPS.

    <run.results_dir>/<run.name>/
        config.yaml, metrics.jsonl, loss.png
        checkpoints/    step-XXXXXXX.pt: trainable weights, EMA, discriminator, both optimizers and schedules,
                        data position (noise is seeded per step): a resumed run continues exactly where it stopped
        recon.png       top row: held-out images; bottom row: their EMA reconstructions (latest)
        export/         the EMA tokenizer for stage 2 (RAE: decoder.pt; KL-VAE: a diffusers directory with the
                        latent shift / scale of the training images in its config)

Differences from the reference, on purpose: the EMA covers the trainable part only (the frozen encoder's copy
would be identical), and the discriminator's gradients are all-reduced by hand (its two forwards per step,
real then fake, would confuse DDP).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nanogen import checkpoint as ckpt
from nanogen import parallel
from nanogen.config import Stage1Config, dump_yaml
from nanogen.config.loader import build
from nanogen.data.loader import TensorLoader
from nanogen.ema import EMA
from nanogen.errors import NotAvailableError, UserError
from nanogen.latents.base import check_images, to_unit
from nanogen.log import MetricsLog, append_csv, print0, progress, read_metrics
from nanogen.optim import build_optimizer, build_scheduler
from nanogen.stage1.gan_losses import adaptive_weight, disc_accuracy, disc_loss, gen_loss, quantize_8bit
from nanogen.viz import save_grid, save_loss_curve


@dataclass
class Stage1Result:
    run_dir: Path
    step: int = 0
    steps_this_run: int = 0
    images_per_s: float = 0.0
    final: dict[str, float] = field(default_factory=dict)  # last logged losses
    wall_s: float = 0.0
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> {"<dataset>/<metric>": value}
    export_dir: Path | None = None


# ---------------------------------------------------------------------------------------------------------
# The model under training: an RAE (decoder trains) or a KL-VAE (everything trains)


def build_stage1_model(cfg: Stage1Config) -> nn.Module:
    from nanogen import registry

    name, entry = registry.lookup(registry.TOKENIZERS, cfg.stage_1.target, "stage_1.target")
    if name not in ("rae", "kl-vae"):
        raise UserError(
            f"stage_1.target: train-stage1 trains 'rae' decoders and 'kl-vae' autoencoders, got '{name}' "
            f"(pretrained VAEs are evaluated with nanogen eval-stage1, not trained)"
        )
    params = build(entry.config_cls(), cfg.stage_1.params, source="config", prefix="stage_1.params")
    return entry.load()(params, cfg.misc.weights)


def trainable_part(model: nn.Module) -> nn.Module:
    """What the optimizer, the EMA and the checkpoints see."""
    from nanogen.latents.rae import RAE

    return model.decoder if isinstance(model, RAE) else model


def last_layer(model: nn.Module) -> Tensor:
    from nanogen.latents.rae import RAE

    return model.decoder.decoder_pred.weight if isinstance(model, RAE) else model.last_layer


class Reconstruct(nn.Module):
    """``forward(images in [0, 1]) -> (reconstruction, aux losses)``; the module DDP wraps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x01: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        from nanogen.latents.rae import RAE

        m = self.model
        if isinstance(m, RAE):  # noise augmentation in train mode (§6.2 step 4)
            return m.decode(m.encode(x01, check=False)), {}
        return m(x01)


@contextlib.contextmanager
def ema_weights(module: nn.Module, ema: EMA):
    """Temporarily put the EMA weights into ``module`` (evaluation, pictures, export)."""
    live = [p.detach().clone() for p in module.parameters()]
    with torch.no_grad():
        torch._foreach_copy_(list(module.parameters()), list(ema.model.parameters()))
    try:
        yield module
    finally:
        with torch.no_grad():
            torch._foreach_copy_(list(module.parameters()), live)


def _all_reduce_grads(module: nn.Module, world: int) -> None:
    if world > 1:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        for g in grads:
            torch.distributed.all_reduce(g)
            g.div_(world)


# ---------------------------------------------------------------------------------------------------------
# The two losses (§6.7)


def generator_loss(
    recon: Tensor, x01: Tensor, aux: dict[str, Tensor], gl: Any, epoch: int, *, lpips: nn.Module | None,
    disc: nn.Module | None, augment: nn.Module | None, last_layer: Tensor, kl_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The generator's total loss and its logged parts; ``gl`` is ``gan.loss``. The adaptive weight balances the
    GAN term against the reconstruction terms (L1 + LPIPS) only, on ``last_layer``."""  # fmt: skip
    rec = (recon - x01).abs().mean()  # L1 on [0, 1]
    parts = {"l1": rec}
    l_rec = rec
    if lpips is not None and gl.perceptual_weight > 0 and epoch >= gl.lpips_start:
        lp = lpips(x01 * 2 - 1, recon * 2 - 1).mean()
        l_rec = l_rec + gl.perceptual_weight * lp
        parts["lpips"] = lp
    total = l_rec
    if "kl" in aux:
        total = total + kl_weight * aux["kl"]
        parts["kl"] = aux["kl"]
    if disc is not None and gl.disc_weight > 0 and epoch >= gl.disc_start:
        disc.heads.requires_grad_(False)  # the generator step leaves the heads alone
        g = gen_loss(gl.gen_loss, disc(augment(recon * 2 - 1)))
        lam = adaptive_weight(l_rec, g, last_layer, gl.max_d_weight)
        total = total + gl.disc_weight * lam * g
        disc.heads.requires_grad_(True)
        parts["gan"], parts["d_weight"] = g, lam
    parts["loss"] = total
    return total, parts


def discriminator_loss(
    disc: nn.Module, augment: nn.Module, real: Tensor, fake: Tensor, kind: str
) -> tuple[Tensor, Tensor]:
    """(loss, accuracy) on real and (already quantised, detached) fake images in [-1, 1], each augmented."""
    logits_real, logits_fake = disc(augment(real)), disc(augment(fake))
    return disc_loss(kind, logits_real, logits_fake), disc_accuracy(logits_real, logits_fake)


# ---------------------------------------------------------------------------------------------------------
# The loop


def train_stage1(cfg: Stage1Config, accept_changes: bool = False) -> Stage1Result:
    from nanogen.build import load_train_images
    from nanogen.stage1.diffaug import DiffAug
    from nanogen.stage1.evaluate import check_stage1_metrics, evaluate_reconstruction, load_eval_images
    from nanogen.train import (
        ensure_writable,
        micro_batch,
        periodic,
        restore_sigterm,
        sigterm_as_interrupt,
        slot_seed,
        write_config,
    )

    tc, gl = cfg.training, cfg.gan.loss
    unsupported = [
        f"training.{k}={v}"
        for k, v, ok in (("parallel", tc.parallel, tc.parallel == "ddp"),
                         ("activation_checkpointing", tc.activation_checkpointing, not tc.activation_checkpointing),
                         ("grad_accum_steps", tc.grad_accum_steps, tc.grad_accum_steps == 1))
        if not ok
    ]  # fmt: skip
    if unsupported:
        raise NotAvailableError(
            f"{', '.join(unsupported)}: stage-1 training runs DDP without gradient accumulation or activation "
            f"checkpointing in this release (the decoders are small); drop the setting"
        )
    use_gan, use_lpips = gl.disc_weight > 0, gl.perceptual_weight > 0
    if cfg.eval is not None:
        check_stage1_metrics(cfg.eval.datasets)
    images, _ = load_train_images(cfg)  # data problems surface before any model is built (labels unused)
    check_images(to_unit(images), f"dataset '{cfg.dataset.target}'")

    info = parallel.init(cfg.run.device)
    run_dir = Path(cfg.run.results_dir).expanduser() / str(cfg.run.name)
    if info.is_main:
        ensure_writable(run_dir, "results directory", "run.results_dir=PATH")
    parallel.barrier()
    existing, state = ckpt.resume_point(run_dir, cfg, accept_changes)

    # ---- model, losses, discriminator (everything that can fail to load fails here, before training) ----
    torch.manual_seed(tc.global_seed)
    model = build_stage1_model(cfg).to(info.device)
    model.train()
    part = trainable_part(model)
    parallel.broadcast_module(part)
    lpips = None
    if use_lpips:
        from nanogen.models.lpips import load_lpips

        lpips = load_lpips(device=info.device)
    disc = augment = None
    if use_gan:
        from nanogen.stage1.disc import build_dino_discriminator

        disc = build_dino_discriminator(cfg.gan.arch).to(info.device)
        parallel.broadcast_module(disc.heads)
        augment = DiffAug.from_config(cfg.gan.augment)
    ema = EMA(part, tc.ema_decay)
    world = info.world_size
    micro = micro_batch(cfg, world)
    loader = TensorLoader(images, batch_size=micro, seed=cfg.dataset.seed, rank=info.rank, world_size=world)
    steps_per_epoch = tc.virtual_epoch_steps or max(1, len(loader))
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * steps_per_epoch
    opt = build_optimizer(part, tc.optimizer, info.device)
    sched = build_scheduler(opt, tc.scheduler, steps_per_epoch)
    d_opt = build_optimizer(disc.heads, cfg.gan.optimizer, info.device) if disc is not None else None
    d_sched = build_scheduler(d_opt, cfg.gan.scheduler, steps_per_epoch) if d_opt is not None else None

    # ---- resume ----
    step = d_steps = 0
    if state is not None:
        ckpt.load_weights(part, state["model"], f"checkpoint '{existing}' (model)")
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        if disc is not None and state.get("disc") is not None:
            disc.heads.load_state_dict(state["disc"])
            d_opt.load_state_dict(state["disc_optimizer"])
            if d_sched is not None and state.get("disc_scheduler") is not None:
                d_sched.load_state_dict(state["disc_scheduler"])
        loader.load_state_dict(state["loader"])
        step, d_steps = int(state["step"]), int(state.get("disc_steps", 0))
        print0(f"resumed from {existing} at step {step}")
    if info.is_main:
        write_config(cfg, run_dir, step)

    metrics = MetricsLog(run_dir / "metrics.jsonl" if info.is_main else None)
    wrapped = parallel.wrap_for_training(Reconstruct(model), info, tc.compile)
    eval_sets = {
        name: load_eval_images(name, ds, tc.image_size) for name, ds in (cfg.eval.datasets if cfg.eval else {}).items()
    }
    pool = next(iter(eval_sets.values())) if eval_sets else to_unit(images)
    preview = pool[torch.linspace(0, len(pool) - 1, min(8, len(pool))).long()]  # spread over the set (and classes)
    n_train = sum(p.numel() for p in part.parameters() if p.requires_grad)
    print0(
        f"run {run_dir} | stage 1 {cfg.stage_1.target}, {n_train / 1e6:.2f}M trainable params | {world} process(es) "
        f"on {info.device.type} | batch {micro * world} | {steps_per_epoch} steps/epoch | steps {step} -> {total_steps}"
        f" | LPIPS {'on' if use_lpips else 'off'}, GAN {'on' if use_gan else 'off'}"
    )
    result = Stage1Result(run_dir=run_dir, step=step)
    autocast = dict(device_type=info.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")

    def save_checkpoint() -> None:
        if info.is_main:
            payload = {
                "step": step, "disc_steps": d_steps, "epoch": step // steps_per_epoch,
                "model": part.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
                "disc": disc.heads.state_dict() if disc is not None else None,
                "disc_optimizer": d_opt.state_dict() if d_opt is not None else None,
                "disc_scheduler": d_sched.state_dict() if d_sched is not None else None,
                "loader": loader.state_dict(), "config": dump_yaml(cfg), "stage": 1,
            }  # fmt: skip
            ckpt.save(run_dir / "checkpoints" / f"step-{step:07d}.pt", payload)
            ckpt.prune(run_dir / "checkpoints", tc.keep_checkpoints, tc.keep_every_steps)
        parallel.barrier()

    def recon_eval(x01: Tensor) -> Tensor:
        return Reconstruct(model)(x01)[0]

    def save_recon_picture() -> None:
        model.eval()
        with ema_weights(part, ema), torch.no_grad():
            rec = recon_eval(preview.to(info.device)).clamp(0, 1).cpu()
        model.train()
        if info.is_main:
            grid = torch.cat([preview, rec]) * 2 - 1
            save_grid(grid, run_dir / "recon.png", nrow=len(preview), scale=2)
            save_grid(grid, run_dir / "recon" / f"step-{step:07d}.png", nrow=len(preview), scale=2)

    def run_eval(tag: str) -> None:
        assert cfg.eval is not None
        model.eval()
        with ema_weights(part, ema):
            for name, imgs in eval_sets.items():
                ds = cfg.eval.datasets[name]
                res, _ = evaluate_reconstruction(
                    recon_eval, imgs, ds.metrics, info.device, ds.batch_size, desc=f"eval {name}{tag}"
                )
                result.evals.setdefault(step, {}).update({f"{name}/{k}": v for k, v in res.items()})
                print0(f"eval {name}{tag} [ema]: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
                metrics.log(step, **{f"eval_{name}/{k}": v for k, v in res.items()})
                if info.is_main:
                    append_csv(run_dir / "evals" / f"{cfg.run.name}_ema.csv", {"step": step, "dataset": name, **res})
        model.train()

    # ---- the loop ----
    sums: dict[str, Tensor] = {}
    n_logged = 0
    t_start = t_log = time.time()
    start_step = step_log = step
    batches = iter(loader)
    bar = progress(total_steps, "stage-1 training", unit="step", initial=step)

    def acc(name: str, value: Tensor) -> None:
        sums[name] = sums.get(name, torch.zeros((), device=info.device)) + value.detach().float()

    previous_sigterm = sigterm_as_interrupt()
    try:
        while step < total_steps:
            torch.manual_seed(slot_seed(tc.global_seed, step, info.rank))  # resume is exact with no RNG state to restore
            epoch = step // steps_per_epoch
            (x,) = next(batches)
            x01 = to_unit(x.to(info.device, non_blocking=True))

            # -- generator step --
            with torch.autocast(**autocast):
                recon, aux = wrapped(x01)
                total, parts = generator_loss(
                    recon.float(), x01, aux, gl, epoch, lpips=lpips, disc=disc, augment=augment,
                    last_layer=last_layer(model), kl_weight=getattr(getattr(model, "params", None), "kl_weight", 0.0),
                )  # fmt: skip
            total.backward()
            if tc.clip_grad:
                torch.nn.utils.clip_grad_norm_(part.parameters(), tc.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
            ema.update()
            for k, v in parts.items():
                acc(k, v)

            # -- discriminator steps --
            if disc is not None and epoch >= gl.disc_upd_start:
                model.eval()  # no noise augmentation / posterior mode, as the reference
                with torch.no_grad(), torch.autocast(**autocast):
                    fake = quantize_8bit(Reconstruct(model)(x01)[0].float() * 2 - 1)
                model.train()
                for _ in range(gl.disc_updates):
                    with torch.autocast(**autocast):
                        d_loss, d_acc = discriminator_loss(disc, augment, x01 * 2 - 1, fake, gl.disc_loss)
                    d_opt.zero_grad(set_to_none=True)
                    d_loss.backward()
                    _all_reduce_grads(disc.heads, world)
                    d_opt.step()
                    if d_sched is not None:
                        d_sched.step()
                    d_steps += 1
                acc("d_loss", d_loss)
                acc("d_acc", d_acc)
            step += 1
            n_logged += 1
            bar.update(1)

            if step % tc.log_interval == 0 or step == total_steps:
                logged = {k: (v / n_logged).item() for k, v in sums.items()}  # the only host sync between logs
                if not math.isfinite(logged["loss"]):
                    raise UserError(
                        f"stage-1 training diverged at step {step} (loss {logged['loss']}); last good checkpoint: "
                        f"{ckpt.latest(run_dir / 'checkpoints')}; lower training.optimizer.lr or set training.clip_grad"
                    )
                dt = time.time() - t_log
                ips = (step - step_log) * micro * world / max(dt, 1e-9)
                lr = opt.param_groups[0]["lr"]
                metrics.log(step, **logged, lr=lr, images_per_s=round(ips, 2), epoch=epoch)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", l1=f"{logged['l1']:.4f}", img_s=f"{ips:.0f}")
                if bar.disable:
                    print0(f"step {step}/{total_steps} " + " ".join(f"{k} {v:.4g}" for k, v in logged.items()))
                result.final = logged
                sums.clear()
                n_logged = 0
                t_log, step_log = time.time(), step
            due = periodic(step, total_steps, steps_per_epoch, tc, cfg.eval)
            if due.samples:
                save_recon_picture()
            if due.checkpoint:
                save_checkpoint()
            if due.eval:
                run_eval(f" @ step {step}")
    except KeyboardInterrupt:
        bar.close()
        print0(f"interrupted at step {step}; saving a checkpoint so 'nanogen train-stage1' resumes from here")
        save_checkpoint()
        raise
    finally:
        restore_sigterm(previous_sigterm)
    bar.close()
    result.wall_s = time.time() - t_start
    result.steps_this_run = step - start_step
    result.images_per_s = result.steps_this_run * micro * world / max(result.wall_s, 1e-9)
    result.step = step

    # ---- the end: checkpoint, picture, export, evaluation ----
    if result.steps_this_run > 0 or ckpt.latest(run_dir / "checkpoints") is None:
        save_checkpoint()
    save_recon_picture()
    if info.is_main:
        hist = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        save_loss_curve([r["step"] for r in hist], [r["loss"] for r in hist], run_dir / "loss.png")
    result.export_dir = export(cfg, model, part, ema, images, run_dir / "export", info, step)
    if cfg.eval is not None and cfg.eval.datasets:
        run_eval("")
    return result


@torch.no_grad()
def export(
    cfg: Stage1Config, model: nn.Module, part: nn.Module, ema: EMA, images: Tensor, out: Path, info: Any, step: int
) -> Path:
    """Write the EMA tokenizer where stage 2 can load it (see the module docstring)."""
    from nanogen.latents.rae import RAE
    from nanogen.latents.stats import LatentStats

    meta = {"stage_1": {"target": cfg.stage_1.target, "params": cfg.stage_1.params}, "step": step, "run": str(cfg.run.name)}
    model.eval()
    with ema_weights(part, ema):
        if isinstance(model, RAE):
            if info.is_main:
                out.mkdir(parents=True, exist_ok=True)
                ckpt.save(out / "decoder.pt", {"model": part.state_dict(), "meta": meta})
        else:
            # the latent shift / scale: mean and std of the posterior-mode latents over the training images
            stats = LatentStats()
            for i in range(0, len(images), 256):
                z = model.latents(to_unit(images[i : i + 256].to(info.device))).double()
                stats.update(z.reshape(-1, 1))  # every latent element is one sample of a scalar
            stats.all_reduce_()
            st = stats.finalize()
            mean, std = float(st["mean"].item()), float(st["var"].item()) ** 0.5
            meta.update(latent_mean=mean, latent_std=std, latent_shape=list(model.latent_shape))
            if info.is_main:
                model.export(out, shift=mean, scale=1.0 / std, meta=meta)
    model.train()
    parallel.barrier()
    print0(f"exported the EMA tokenizer to {out}")
    return out
