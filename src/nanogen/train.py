"""The stage-2 training loop: build -> step -> log / sample / checkpoint / evaluate.

Readable top to bottom. Everything that depends on the method lives in the objective; everything that
depends on the hardware (DDP, compile) is applied by ``parallel.py``; the loop itself only moves batches,
steps the optimizer and keeps the run directory up to date:

    <run.results_dir>/<run.name>/
        config.yaml        the resolved config (exactly what ran; loads back with --config)
        metrics.jsonl      one JSON object per log line / evaluation
        checkpoints/       step-XXXXXXX.pt (model, ema, optimizer, scheduler, data position, RNG)
        samples.png        latest EMA sample grid (one row per class); samples/ keeps the history
        loss.png           the loss curve

Host syncs happen only at log intervals (the loss is accumulated on the device in between).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanogen import checkpoint as ckpt
from nanogen import parallel
from nanogen.build import (
    build_conditioner,
    build_network,
    build_objective,
    build_tokenizer,
    check_runnable,
    load_frozen,
    sampler_settings,
)
from nanogen.config import Stage1Config, Stage2Config, dump_yaml
from nanogen.data import build_train_loader, known_captions
from nanogen.data.latent_shards import open_for_training as open_latents
from nanogen.ema import EMA
from nanogen.errors import UserError
from nanogen.eval import generate as gen
from nanogen.latents.base import to_unit
from nanogen.log import MetricsLog, print0, progress, read_metrics
from nanogen.optim import build_optimizer, build_scheduler
from nanogen.viz import save_captioned_grid, save_grid, save_loss_curve


@dataclass
class TrainResult:
    run_dir: Path
    step: int = 0
    steps_this_run: int = 0
    images_per_s: float = 0.0
    final_loss: float = float("nan")
    wall_s: float = 0.0
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    params: int = 0


def ensure_writable(directory: Path, what: str, fix: str) -> Path:
    """Create (or reopen) a directory and prove it can be written; one clear line if not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} '{directory}' is not writable ({e.strerror}); choose another with {fix}") from None
    return directory


def eval_dir(cfg: Stage2Config, run_dir: Path) -> Path:
    assert cfg.eval is not None
    return Path(cfg.eval.eval_dir).expanduser() if cfg.eval.eval_dir else run_dir / "evals"


def write_config(cfg: Stage2Config, run_dir: Path, resumed_step: int) -> None:
    text = dump_yaml(cfg)
    path = run_dir / "config.yaml"
    if path.is_file() and resumed_step > 0 and path.read_text() != text:
        path = run_dir / f"config.resume-{resumed_step:07d}.yaml"  # keep what the first part ran with
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def sample_grid(
    cfg: Stage2Config, objective, tokenizer, conditioner, device: torch.device, per_row: int = 8
) -> tuple[torch.Tensor, list[str] | None]:
    """A fixed grid with fixed noise, so grids compare across steps: one row per class (up to 10 classes), or
    for text models one row per prompt of ``data.grid_prompts`` (returned with the images)."""
    prompts = None
    if cfg.conditioning.type == "text":
        from nanogen.data import grid_prompts

        prompts = grid_prompts(cfg)
        conds: torch.Tensor | list[str] = [p for p in prompts for _ in range(per_row)]
    else:
        conds = torch.arange(min(cfg.misc.num_classes, 10)).repeat_interleave(per_row)
    idx = list(range(len(conds)))
    noise = gen.per_sample_noise(idx, tuple(cfg.misc.latent_size), 1234, device, gen.reg_dim(objective))
    return gen.generate(objective, tokenizer, conditioner, conds, noise, sampler_settings(cfg)), prompts


def _sigterm_as_interrupt() -> Any:
    """SIGTERM (what SLURM and Kubernetes send before killing a job) takes Ctrl-C's path: save a checkpoint,
    then exit. Returns the previous handler (None when not in the main thread, where signals cannot be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: Stage2Config) -> TrainResult:
    check_runnable(cfg)  # everything that can be wrong with the config fails here, before any work
    info = parallel.init(cfg.run.device)
    tc = cfg.training
    run_dir = Path(cfg.run.results_dir).expanduser() / str(cfg.run.name)
    if info.is_main:  # every directory the run will write is checked now, not after hours of training
        ensure_writable(run_dir, "results directory", "run.results_dir=PATH")
        if cfg.eval is not None and cfg.eval.datasets:
            ensure_writable(eval_dir(cfg, run_dir), "eval directory", "eval.eval_dir=PATH")
    parallel.barrier()
    found = ckpt.newest_readable(run_dir / "checkpoints") if cfg.run.resume else None
    existing, state = found if found is not None else (ckpt.latest(run_dir / "checkpoints"), None)
    if existing is not None and not cfg.run.resume:
        raise UserError(
            f"run.resume=false but '{run_dir}' already holds checkpoints (newest: {existing.name}); "
            f"choose a new run.name, drop run.resume=false to continue that run, or pass --overwrite to move it aside"
        )
    diffs = ckpt.config_differences(state["config"], cfg) if state is not None and "config" in state else []
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise UserError(
            f"'{run_dir}' holds a run of another config ({shown}); use another run.name, or pass --overwrite "
            f"to move the old run aside and start over"
        )

    # ---- data ----
    micro = micro_batch(cfg, info.world_size)
    pre_encoded = cfg.dataset.latents_dir is not None  # shards from `nanogen extract-latents`: no encoder in the loop
    if pre_encoded:
        loader = open_latents(cfg, micro, info.rank, info.world_size)  # batches (z, y, images or None)
    else:
        loader = build_train_loader(cfg, micro, info.rank, info.world_size)  # batches (images, labels or captions)
    steps_per_epoch = tc.virtual_epoch_steps or max(1, len(loader) // tc.grad_accum_steps)
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * steps_per_epoch

    # ---- model, objective, EMA, optimizer (same init on every rank, then broadcast) ----
    torch.manual_seed(tc.global_seed)
    tokenizer = build_tokenizer(cfg).to(info.device)
    conditioner = build_conditioner(cfg, info.device)
    captions = known_captions(cfg) if not pre_encoded else None
    if captions:  # a small, finite caption set: embed each caption once, before the first step
        conditioner.warm(captions)
    net = build_network(cfg).to(info.device)
    parallel.broadcast_module(net)
    objective = build_objective(cfg, net, load_frozen(cfg)).to(info.device)
    ema = EMA(net, tc.ema_decay)
    ema_objective = build_objective(cfg, ema.model)  # sampling / eval use the EMA weights
    opt = build_optimizer(net, tc.optimizer, info.device)
    sched = build_scheduler(opt, tc.scheduler, steps_per_epoch)
    n_params = sum(p.numel() for p in net.parameters())

    # ---- resume ----
    step = 0
    if state is not None:
        ckpt.load_weights(net, ckpt.weights_from(state, "model")[0], f"checkpoint '{existing}' (model)")
        ema.load_state_dict(ckpt.weights_from(state, "ema")[0])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        if state.get("objective") is not None:
            objective.set_extra_state(state["objective"])  # e.g. MeanFlow's FM/MF branch schedule
        step = int(state["step"])
        print0(f"resumed from {existing} at step {step}")
    if info.is_main:
        write_config(cfg, run_dir, step)
    torch.manual_seed(tc.global_seed * 7919 + info.rank + step)  # per-rank noise; distinct after a resume
    if state is not None and "rng" in state and info.world_size == 1:
        ckpt.set_rng_state(state["rng"])  # single process: the resumed run continues bit-exactly

    metrics = MetricsLog(run_dir / "metrics.jsonl" if info.is_main else None, _wandb(cfg, run_dir, info))
    wrapped = parallel.wrap_for_training(objective, info, tc.compile)
    autocast = dict(device_type=info.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    result = TrainResult(run_dir=run_dir, step=step, params=n_params)
    print0(
        f"run {run_dir} | {cfg.stage_2.target} {n_params / 1e6:.2f}M params | {info.world_size} process(es) on "
        f"{info.device.type} | global batch {micro * info.world_size * tc.grad_accum_steps} | steps {step} -> {total_steps}"
    )

    def save_checkpoint() -> None:
        if info.is_main:
            payload = {
                "step": step, "epoch": step // steps_per_epoch, "model": net.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
                "loader": loader.state_dict(), "rng": ckpt.rng_state(), "config": dump_yaml(cfg),
                "objective": _extra_state(objective),
            }
            ckpt.save(run_dir / "checkpoints" / f"step-{step:07d}.pt", payload)
            ckpt.prune(run_dir / "checkpoints", tc.keep_checkpoints, tc.keep_every_steps)
        parallel.barrier()

    def save_samples() -> None:
        grid, prompts = sample_grid(cfg, ema_objective, tokenizer, conditioner, info.device)
        if info.is_main:
            for path in (run_dir / "samples" / f"step-{step:07d}.png", run_dir / "samples.png"):
                if prompts is None:
                    save_grid(grid, path, nrow=8, scale=2)
                else:
                    save_captioned_grid(grid, prompts, path, nrow=8, scale=2)

    def run_eval(tag: str) -> None:
        """EMA weights always, raw weights too with eval.eval_model; metrics.jsonl + one CSV per weight kind."""
        from nanogen.eval.evaluate import evaluate, record, summary_line

        assert cfg.eval is not None
        kinds = [("ema", ema_objective)] + ([("model", objective)] if cfg.eval.eval_model else [])
        out = eval_dir(cfg, run_dir)
        for kind, obj in kinds:
            samples = out / "samples" / cfg.run.name / f"step-{step:07d}-{kind}" if cfg.eval.save_samples else None
            res = evaluate(cfg, obj, tokenizer, conditioner, info, seed=0, tag=f"{tag} [{kind}]", samples_dir=samples)
            if kind == "ema":
                result.evals[step] = res
            print0(f"eval{tag} [{kind}]: {summary_line(res)}")
            metrics.log(step, **{f"eval_{kind}/{k}": v for k, v in res.items()})
            record(cfg, out, kind, step, res, cfg.run.name)

    if cfg.eval is not None and cfg.eval.eval_at_start and step == 0:
        run_eval(" (untrained)")

    # ---- the loop ----
    t_start = time.time()
    loss_sum = torch.zeros((), device=info.device)
    loss_count = 0
    t_log, step_log = time.time(), step
    start_step = step
    batches = iter(loader)
    null = conditioner.null(1, info.device)  # the CFG-dropout condition, made once
    last_counters: dict[str, int] = {}
    bar = progress(total_steps, "training", unit="step", initial=step)
    previous_sigterm = _sigterm_as_interrupt()
    try:
        while step < total_steps:
            for micro_i in range(tc.grad_accum_steps):
                if pre_encoded:
                    z, y, x = (t.to(info.device, non_blocking=True) if t is not None else None for t in next(batches))
                else:
                    x, y = next(batches)
                    x = as_model_images(x.to(info.device, non_blocking=True))
                    if isinstance(y, torch.Tensor):
                        y = y.to(info.device, non_blocking=True)
                sync = micro_i == tc.grad_accum_steps - 1 or not info.enabled
                ctx = wrapped.no_sync() if not sync and hasattr(wrapped, "no_sync") else _null()
                with ctx, torch.autocast(**autocast):
                    if not pre_encoded:
                        with torch.no_grad():
                            z = tokenizer.encode(to_unit(x), check=False)  # the data were range-checked at load
                    out = wrapped(z, conditioner(y, info.device), null, images=x)
                    loss = out["loss"] / tc.grad_accum_steps
                loss.backward()
                # what the log shows: the loss itself, unless the objective names a more telling one
                loss_sum += out.get("report_loss", out["loss"]).detach() / tc.grad_accum_steps
            if tc.clip_grad:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
            ema.update()
            step += 1
            loss_count += 1
            bar.update(1)

            if step % tc.log_interval == 0 or step == total_steps:
                mean_loss = (loss_sum / loss_count).item()  # the only host sync between log lines
                if not math.isfinite(mean_loss):
                    good = ckpt.latest(run_dir / "checkpoints")
                    raise UserError(
                        f"training diverged at step {step} (loss {mean_loss}); last good checkpoint: {good}; "
                        f"lower training.optimizer.lr or set training.clip_grad"
                    )
                dt = time.time() - t_log
                ips = (step - step_log) * micro * info.world_size * tc.grad_accum_steps / max(dt, 1e-9)
                lr = opt.param_groups[0]["lr"]
                counters = data_counters(loader, conditioner)  # skipped samples, truncated captions, ...: never silent
                metrics.log(step, loss=mean_loss, lr=lr, images_per_s=round(ips, 2), epoch=step // steps_per_epoch, **counters)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                if bar.disable:  # no live bar (NANOGEN_NO_PROGRESS=1, non-main rank): keep a plain log line
                    print0(f"step {step}/{total_steps} loss {mean_loss:.4f} lr {lr:.2e} {ips:.0f} img/s")
                if counters != last_counters:
                    print0("data: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counters.items()))
                    last_counters = counters
                result.final_loss = mean_loss
                loss_sum.zero_()
                loss_count = 0
                t_log, step_log = time.time(), step
            due = periodic(step, total_steps, steps_per_epoch, tc, cfg.eval)
            if due.samples:
                save_samples()
            if due.checkpoint:
                save_checkpoint()
            if due.eval:
                run_eval(f" @ step {step}")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from a scheduler's preemption / time limit
        bar.close()
        print0(f"interrupted at step {step}; saving a checkpoint so 'nanogen train' resumes from here")
        save_checkpoint()
        raise
    finally:
        _restore_sigterm(previous_sigterm)
    bar.close()
    result.wall_s = time.time() - t_start
    result.steps_this_run = step - start_step
    result.images_per_s = result.steps_this_run * micro * info.world_size * tc.grad_accum_steps / max(result.wall_s, 1e-9)
    result.step = step

    # ---- the end: checkpoint, pictures, evaluation ----
    if result.steps_this_run > 0 or ckpt.latest(run_dir / "checkpoints") is None:
        save_checkpoint()
    else:
        print0(f"run already complete at step {step}; nothing to train (set run.name=NEW for a fresh run)")
    save_samples()
    if info.is_main:
        hist = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        save_loss_curve([r["step"] for r in hist], [r["loss"] for r in hist], run_dir / "loss.png")
    if cfg.eval is not None and cfg.eval.datasets:
        run_eval("")
    return result


@dataclass
class Due:
    samples: bool
    checkpoint: bool
    eval: bool


def periodic(step: int, total_steps: int, steps_per_epoch: int, tc: Any, eval_cfg: Any) -> Due:
    """What the loop owes after optimizer step ``step`` (sample grid, checkpoint, evaluation), shared by the
    stage-1 and stage-2 loops. Nothing at the last step: the end of the run does all three itself."""
    if step == total_steps:
        return Due(False, False, False)
    at_epoch_end = step % steps_per_epoch == 0 and (step // steps_per_epoch) % max(1, tc.checkpoint_interval) == 0
    return Due(
        samples=bool(tc.sample_every) and step % tc.sample_every == 0,
        checkpoint=at_epoch_end or bool(tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0),
        eval=eval_cfg is not None and bool(eval_cfg.eval_interval) and step % eval_cfg.eval_interval == 0,
    )


def as_model_images(x: torch.Tensor) -> torch.Tensor:
    """Loader images -> float [-1, 1]. Streaming loaders send uint8 (4x less host traffic, and always in range);
    the in-memory nano tier is float already (range-checked once when loaded)."""
    return x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x


def data_counters(loader: Any, conditioner: Any) -> dict[str, int]:
    """The non-zero counters of the data path: corrupt samples skipped, non-UTF-8 / empty / truncated captions."""
    out = dict(loader.stats()) if hasattr(loader, "stats") else {}
    if hasattr(conditioner, "counters"):
        out |= {k: v for k, v in conditioner.counters().items() if k == "captions_truncated"}
    return {k: int(v) for k, v in out.items() if v}


def _extra_state(objective: torch.nn.Module) -> Any:
    """The objective's own resumable state (MeanFlow's branch schedule), if its class defines one."""
    if type(objective).get_extra_state is torch.nn.Module.get_extra_state:
        return None
    return objective.get_extra_state()


def micro_batch(cfg: Stage2Config | Stage1Config, world: int) -> int:
    """The per-process batch: ``training.global_batch_size`` split over processes and accumulation steps."""
    tc = cfg.training
    if tc.global_batch_size is None:
        return tc.batch_size
    denom = world * tc.grad_accum_steps
    if tc.global_batch_size % denom:
        raise UserError(
            f"training.global_batch_size: {tc.global_batch_size} is not divisible by processes x grad_accum_steps "
            f"= {world} x {tc.grad_accum_steps}; change one of them"
        )
    return tc.global_batch_size // denom


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _wandb(cfg: Stage2Config, run_dir: Path, info: parallel.DistInfo) -> Any:
    if not cfg.run.wandb or not info.is_main:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("run.wandb: Weights & Biases is not installed; pip install 'nanogen[wandb]' or set run.wandb=false") from None
    from nanogen.config import to_dict

    return wandb.init(name=cfg.run.name, dir=str(run_dir), config=to_dict(cfg), resume="allow", id=str(cfg.run.name))
