"""The stage-2 training loop: build -> step -> log / sample / checkpoint / evaluate.

Readable top to bottom. Everything that depends on the method lives in the objective; everything that
depends on the hardware (DDP, compile) is applied by ``parallel.py``; the loop itself only moves batches,
steps the optimizer and keeps the run directory up to date:

    <run.results_dir>/<run.name>/
        config.yaml        the resolved config (exactly what ran; loads back with --config)
        metrics.jsonl      one JSON object per log line / evaluation
        checkpoints/       step-XXXXXXX.pt (model, ema, optimizer, scheduler, data position and layout, config)
        samples.png        latest EMA sample grid (one row per class); samples/ keeps the history
        loss.png           the loss curve

Host syncs happen only at log intervals (the loss is accumulated on the device in between).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
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


def sigterm_as_interrupt() -> Any:
    """SIGTERM (what SLURM and Kubernetes send before killing a job) takes Ctrl-C's path: save a checkpoint,
    then exit. Returns the previous handler (None when not in the main thread, where signals cannot be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: Stage2Config, accept_changes: bool = False) -> TrainResult:
    check_runnable(cfg)  # everything that can be wrong with the config fails here, before any work
    info = parallel.init(cfg.run.device)
    tc = cfg.training
    micro = micro_batch(cfg, info.world_size)  # a global batch that does not split fails before anything is written
    run_dir = Path(cfg.run.results_dir).expanduser() / str(cfg.run.name)
    if info.is_main:  # every directory the run will write is checked now, not after hours of training
        ensure_writable(run_dir, "results directory", "run.results_dir=PATH")
        if cfg.eval is not None and cfg.eval.datasets:
            ensure_writable(eval_dir(cfg, run_dir), "eval directory", "eval.eval_dir=PATH")
    parallel.barrier()
    existing, state = ckpt.resume_point(run_dir, cfg, accept_changes)

    # ---- data ----
    pre_encoded = cfg.dataset.latents_dir is not None  # shards from `nanogen extract-latents`: no encoder in the loop
    if pre_encoded:
        loader = open_latents(cfg, micro, info.rank, info.world_size)  # batches (z, y, images or None)
    else:
        loader = build_train_loader(cfg, micro, info.rank, info.world_size)  # batches (images, labels or captions)
    steps_per_epoch = tc.virtual_epoch_steps or max(1, len(loader) // tc.grad_accum_steps)
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * steps_per_epoch

    # ---- model, objective, EMA (same init on every rank, then broadcast) ----
    torch.manual_seed(tc.global_seed)
    tokenizer = build_tokenizer(cfg).to(info.device)
    conditioner = build_conditioner(cfg, info.device)
    captions = known_captions(cfg) if not pre_encoded else None
    if captions:  # a small, finite caption set: embed each caption once, before the first step
        conditioner.warm(captions)
    net = build_network(cfg).to(info.device)
    parallel.broadcast_module(net)
    objective = build_objective(cfg, net, load_frozen(cfg)).to(info.device)
    ema = EMA(net, tc.ema_decay)  # after the broadcast: every rank's EMA starts identical (reference §1.5 quirk)
    ema_objective = build_objective(cfg, ema.model)  # sampling / eval use the EMA weights
    n_params = sum(p.numel() for p in net.parameters())
    if state is not None:  # whole weights go in before sharding; each FSDP rank then keeps its shard
        ckpt.load_weights(net, ckpt.weights_from(state, "model")[0], f"checkpoint '{existing}' (model)")
        ema.model.load_state_dict(ckpt.weights_from(state, "ema")[0])

    # ---- speed and scale (parallel.py), then the optimizer over the (possibly sharded) parameters ----
    wrapped = parallel.prepare_training(net, objective, ema.model, info, tc)
    ema.bind(net)
    opt = build_optimizer(net, tc.optimizer, info.device, fused=not parallel.is_fsdp(net))
    sched = build_scheduler(opt, tc.scheduler, steps_per_epoch)

    # ---- resume ----
    step = 0
    if state is not None:
        parallel.load_optimizer_state_dict(net, opt, state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        loader.load_state_dict(data_position(state, info.world_size, micro, loader))
        if state.get("objective") is not None:
            objective.set_extra_state(state["objective"])  # e.g. MeanFlow's FM/MF branch schedule
        step = int(state["step"])
        print0(f"resumed from {existing} at step {step}")
    if info.is_main:
        write_config(cfg, run_dir, step)

    metrics = MetricsLog(run_dir / "metrics.jsonl" if info.is_main else None, _wandb(cfg, run_dir, info))
    stepper = OptimizerStep(cfg, info, wrapped, net, opt, sched, ema, tokenizer, conditioner)
    rates = Rates(cfg, info)
    result = TrainResult(run_dir=run_dir, step=step, params=n_params)
    global_batch = micro * info.world_size * tc.grad_accum_steps
    mode = f"{tc.parallel.upper()} over {info.world_size} processes" if info.enabled else "1 process"
    print0(
        f"run {run_dir} | {cfg.stage_2.target} {n_params / 1e6:.2f}M params | {mode} on {info.device.type} | "
        f"global batch {global_batch} | steps {step} -> {total_steps}"
    )

    def save_checkpoint() -> None:
        stepper.check_finite(run_dir)  # a model updated with a NaN loss is never saved as "good"
        weights, ema_weights = parallel.full_state_dict(net), ema.state_dict()  # collectives under FSDP
        optimizer = parallel.optimizer_state_dict(net, opt)
        if info.is_main:
            payload = {
                "step": step, "epoch": step // steps_per_epoch, "model": weights, "ema": ema_weights,
                "optimizer": optimizer, "scheduler": sched.state_dict() if sched else None,
                "loader": loader.state_dict(), "data_layout": {"processes": info.world_size, "micro_batch": micro},
                "config": dump_yaml(cfg), "objective": _extra_state(objective),
                "skipped_steps": stepper.skipped,
            }
            ckpt.save(run_dir / "checkpoints" / f"step-{step:07d}.pt", payload)
            ckpt.prune(run_dir / "checkpoints", tc.keep_checkpoints, tc.keep_every_steps)
        parallel.barrier()

    def for_sampling(kind: str) -> torch.nn.Module:
        """The objective that samples with the EMA (or live) weights. Under FSDP every process first gathers a
        whole copy: evaluation deals uneven shards of work to processes, and sharded forwards must run in step."""
        if not parallel.is_fsdp(net):
            return ema_objective if kind == "ema" else objective
        whole = build_network(cfg).to(info.device).eval().requires_grad_(False)
        whole.load_state_dict(parallel.full_state_dict(ema.model if kind == "ema" else net, everywhere=True))
        return build_objective(cfg, whole)

    def save_samples() -> None:
        grid, prompts = sample_grid(cfg, for_sampling("ema"), tokenizer, conditioner, info.device)
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
        kinds = [("ema", for_sampling("ema"))] + ([("model", for_sampling("model"))] if cfg.eval.eval_model else [])
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
    start_step = step
    batches = iter(loader)
    last_counters: dict[str, int] = {}
    bar = progress(total_steps, "training", unit="step", initial=step)
    rates.start(step)
    previous_sigterm = sigterm_as_interrupt()
    try:
        while step < total_steps:
            loss, updated = stepper(step, lambda: next(batches))
            step += 1
            bar.update(1)
            if updated:
                loss_sum += loss
                loss_count += 1

            if step % tc.log_interval == 0 or step == total_steps:
                parallel.all_reduce_sum(loss_sum)  # the mean over every process, not rank 0's alone
                stepper.check_finite(run_dir)
                mean_loss = loss_sum.item() / max(1, loss_count * info.world_size)  # the only host sync between log lines
                r = rates.measure(step)
                lr = opt.param_groups[0]["lr"]
                counters = data_counters(loader, conditioner)  # skipped samples, truncated captions, ...: never silent
                if stepper.skipped:
                    counters["skipped_nonfinite_steps"] = stepper.skipped
                metrics.log(step, loss=mean_loss, lr=lr, epoch=step // steps_per_epoch, **r, **counters)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **rates.short(r))
                if bar.disable:  # no live bar (NANOGEN_NO_PROGRESS=1, non-main rank): keep a plain log line
                    print0(f"step {step}/{total_steps} loss {mean_loss:.4f} lr {lr:.2e} {rates.line(r)}")
                if counters != last_counters:
                    print0("data: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counters.items()))
                    last_counters = counters
                result.final_loss = mean_loss
                loss_sum.zero_()
                loss_count = 0
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
        restore_sigterm(previous_sigterm)
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
    if tc.final_samples:
        save_samples()
    if info.is_main:
        hist = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        save_loss_curve([r["step"] for r in hist], [r["loss"] for r in hist], run_dir / "loss.png")
    if cfg.eval is not None and cfg.eval.datasets:
        run_eval("")
    metrics.close()
    return result


def slot_seed(seed: int, step: int, slot: int) -> int:
    """The RNG seed of one micro-batch: a function of (seed, optimizer step, slot), slot = micro_i * world + rank.

    The loaders hand chunk ``(step * accum + micro_i) * world + rank`` of their permutation to a process, which
    is chunk ``slot`` of the step's global batch for any split of it into processes x accumulation steps. Seeding
    the noise by the same slot makes a run identical on 8 GPUs, on 4 GPUs with 2 accumulation steps or on one
    process with 8 (up to float summation order), and makes resume exact with no RNG state to restore."""
    digest = hashlib.blake2b(f"{seed}/{step}/{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class OptimizerStep:
    """One optimizer step, shared by ``train`` and ``nanogen benchmark``: for each micro-batch, seed its slot,
    encode the images (unless pre-encoded), compute the loss and backpropagate (gradients reduced on the last
    micro-batch only, the reference's global-batch semantics §1.5); then clip, update, schedule, EMA.

    Non-finite losses (``training.nonfinite``): ``stop`` records the first bad step on the device (no host sync)
    and ``check_finite`` raises at the next log line or checkpoint; ``skip`` checks the gradient norm every step
    (one host sync) and drops the update, stopping after ``max_skipped_steps`` in a row."""

    def __init__(self, cfg: Stage2Config, info: parallel.DistInfo, wrapped, net, opt, sched, ema, tokenizer, conditioner):
        self.tc, self.info = cfg.training, info
        self.wrapped, self.net, self.opt, self.sched, self.ema = wrapped, net, opt, sched, ema
        self.tokenizer, self.conditioner = tokenizer, conditioner
        self.autocast = dict(device_type=info.device.type, dtype=torch.bfloat16, enabled=self.tc.precision == "bf16")
        self.null = conditioner.null(1, info.device)  # the CFG-dropout condition, made once
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.first_bad = torch.zeros((), dtype=torch.long, device=info.device)  # 0 = none yet
        self.skipped = self.in_a_row = 0

    def batch(self, raw: tuple) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        dev = self.info.device
        if len(raw) == 3:  # latent shards: (z, y, images or None)
            return tuple(t.to(dev, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in raw)  # type: ignore[return-value]
        x, y = raw
        x = as_model_images(x.to(dev, non_blocking=True))
        if isinstance(y, torch.Tensor):
            y = y.to(dev, non_blocking=True)
        with torch.no_grad(), torch.autocast(**self.autocast):
            z = self.tokenizer.encode(to_unit(x), check=False)  # the data were range-checked at load
        return z, y, x

    def __call__(self, step: int, next_batch) -> tuple[torch.Tensor, bool]:
        """Run step ``step`` (0-based) and return (the step's loss on this process, whether the update was made)."""
        tc, info = self.tc, self.info
        accum = tc.grad_accum_steps
        report = torch.zeros((), device=info.device)
        for i in range(accum):
            torch.manual_seed(slot_seed(tc.global_seed, step, i * info.world_size + info.rank))
            z, y, x = self.batch(next_batch())
            with parallel.gradient_sync(self.wrapped, self.net, i == accum - 1), torch.autocast(**self.autocast):
                out = self.wrapped(z, self.conditioner(y, info.device), self.null, images=x)
                loss = out["loss"] / accum
            loss.backward()
            # what the log shows: the loss itself, unless the objective names a more telling one
            report += out.get("report_loss", out["loss"]).detach() / accum
        if tc.nonfinite == "skip":
            norm = torch.nn.utils.clip_grad_norm_(self.params, tc.clip_grad or math.inf)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
            if not bool(torch.isfinite(norm)):  # the same on every rank: gradients are already reduced
                self.opt.zero_grad(set_to_none=True)
                self.skipped += 1
                self.in_a_row += 1
                print0(f"step {step + 1}: non-finite gradient norm ({norm.item()}); update skipped ({self.skipped} so far)")
                if self.in_a_row > tc.max_skipped_steps:
                    raise UserError(
                        f"training diverged: {self.in_a_row} non-finite steps in a row up to step {step + 1} "
                        f"(training.max_skipped_steps={tc.max_skipped_steps}); lower training.optimizer.lr or set training.clip_grad"
                    )
                return report, False
            self.in_a_row = 0
        elif tc.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, tc.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sched is not None:
            self.sched.step()
        self.ema.update()
        if tc.nonfinite == "stop":  # remember the first bad step without a host sync
            bad = (self.first_bad == 0) & ~torch.isfinite(report)
            self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step + 1), self.first_bad)
        return report, True

    def check_finite(self, run_dir: Path) -> None:
        """Raise (on every rank) if any process saw a non-finite loss, naming the step and the last good checkpoint."""
        if self.tc.nonfinite != "stop":
            return
        first = torch.where(self.first_bad > 0, self.first_bad, torch.full_like(self.first_bad, 2**62))
        if parallel.all_reduce_min(first).item() < 2**62:
            good = ckpt.latest(run_dir / "checkpoints")
            raise UserError(
                f"training diverged: non-finite loss at step {first.item()}; last good checkpoint: {good or 'none'} "
                f"(rerun resumes from it); lower training.optimizer.lr, set training.clip_grad, or set "
                f"training.nonfinite=skip to drop such steps"
            )


class Rates:
    """Throughput for the log: images/s, model FLOP/s per device and MFU against the datasheet peak
    (``hardware.PEAK_TFLOPS``; on CPU the achieved GFLOP/s instead), and the peak memory so far."""

    def __init__(self, cfg: Stage2Config, info: parallel.DistInfo):
        from nanogen.hardware import peak_flops
        from nanogen.modelinfo import train_flops_per_image

        tc = cfg.training
        self.info = info
        self.images_per_step = micro_batch(cfg, info.world_size) * info.world_size * tc.grad_accum_steps
        try:
            self.flops_per_image: float | None = train_flops_per_image(cfg)
        except Exception:  # a network without an analytic FLOP count: report images/s only
            self.flops_per_image = None
        self.peak = peak_flops(info.device, tc.precision == "bf16")

    def start(self, step: int) -> None:
        self.t, self.step = time.time(), step

    def measure(self, step: int) -> dict[str, float]:
        from nanogen.hardware import peak_memory_gb

        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        now = time.time()
        ips = (step - self.step) * self.images_per_step / max(now - self.t, 1e-9)
        self.t, self.step = now, step
        out = {"images_per_s": round(ips, 2), "peak_mem_gb": round(peak_memory_gb(self.info.device), 3)}
        if self.flops_per_image is not None:
            per_device = ips * self.flops_per_image / self.info.world_size
            out["gflops_per_s"] = round(per_device / 1e9, 2)  # model FLOP/s per device
            if self.peak is not None:
                out["mfu"] = round(per_device / self.peak, 4)
        return out

    @staticmethod
    def short(r: dict[str, float]) -> dict[str, str]:
        out = {"img_s": f"{r['images_per_s']:.0f}"}
        if "mfu" in r:
            out["mfu"] = f"{100 * r['mfu']:.1f}%"
        elif "gflops_per_s" in r:
            out["gflops"] = f"{r['gflops_per_s']:.1f}"
        out["mem"] = f"{r['peak_mem_gb']:.1f}G"
        return out

    @staticmethod
    def line(r: dict[str, float]) -> str:
        rate = f"MFU {100 * r['mfu']:.1f}%" if "mfu" in r else f"{r.get('gflops_per_s', float('nan')):.1f} GFLOP/s"
        return f"{r['images_per_s']:.0f} img/s {rate} peak mem {r['peak_mem_gb']:.2f} GB"


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


def data_position(state: dict[str, Any], world: int, micro: int, loader: Any) -> dict[str, int]:
    """The loader position to resume at. Each process counts its own batches, so a checkpoint written with
    another number of processes or another micro batch (same global batch, other split) is converted through
    the number of samples consumed in the epoch: the resumed run reads exactly the samples the old one would have."""
    pos = dict(state["loader"])
    layout = state.get("data_layout")
    if not layout or (layout["processes"], layout["micro_batch"]) == (world, micro):
        return pos
    consumed = int(pos["batch"]) * int(layout["processes"]) * int(layout["micro_batch"])
    if consumed % (world * micro):
        raise UserError(
            f"the checkpoint stopped after {consumed} samples of its epoch ({layout['processes']} processes x micro batch "
            f"{layout['micro_batch']}), which is not a whole number of batches for {world} processes x micro batch {micro}; "
            f"resume with the checkpoint's split (training.global_batch_size / grad_accum_steps) or from an epoch boundary"
        )
    if type(loader).__name__ == "StreamLoader":
        warnings.warn("streaming data resumed with another process count: the position is kept, the sample order differs", stacklevel=2)
    pos["batch"] = consumed // (world * micro)
    print0(f"data position converted: {layout['processes']} x {layout['micro_batch']} -> {world} x {micro} per batch, "
           f"{consumed} samples into epoch {pos['epoch']}")  # fmt: skip
    return pos


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


def _wandb(cfg: Stage2Config, run_dir: Path, info: parallel.DistInfo) -> Any:
    if not cfg.run.wandb or not info.is_main:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("run.wandb: Weights & Biases is not installed; pip install 'nanogen[wandb]' or set run.wandb=false") from None
    from nanogen.config import to_dict

    return wandb.init(name=cfg.run.name, dir=str(run_dir), config=to_dict(cfg), resume="allow", id=str(cfg.run.name))
