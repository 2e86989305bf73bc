"""``nanogen benchmark``: how close a network's training step runs to this machine's own matmul speed.

Model FLOPs per image are the analytic forward FLOPs x 3 (forward + backward, ``performance.md`` §1). The
ceiling is measured in the same run: a large square matmul in the same dtype. Their ratio is MFU on a GPU and
its honest analogue on a CPU (``performance.md`` §11). Two structural checks ride along, because they decide
whether the fast kernels can run at all: attention receives no dense mask for unmasked inputs (the reference
always builds one, §8.1), and ``torch.compile`` captures the forward in one graph (``torch._dynamo.explain``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanogen.build import build_network
from nanogen.config import Stage2Config


def _timer(stmt: str, globals: dict[str, Any]):
    # torch.utils.benchmark imports cpp_extension, which logs a "no CUDA runtime" notice on CPU machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Timer

    return Timer(stmt, globals=globals)


SDPA_OPS = {
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "scaled_dot_product_attention",
}


class MaskRecorder(TorchDispatchMode):
    """Records, for every attention call, the shape of the mask it received (None = no mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[tuple[int, ...] | None] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.split(".")[0] in SDPA_OPS:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.masks.append(tuple(mask.shape) if isinstance(mask, torch.Tensor) else None)
        return func(*args, **kwargs)


def example_inputs(
    net: torch.nn.Module, batch: int, device: torch.device, masked: bool = True
) -> tuple[tuple, dict]:
    """Random inputs of the right shapes: labels, or text states with a padding mask (``masked``)."""
    cfg = net.cfg  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    if cfg.condition_type == "label":
        cond, mask = torch.randint(0, cfg.num_classes, (batch,), generator=g), None
    else:
        L = cfg.cond_arch.num_c_tokens
        cond = torch.randn(batch, L, cfg.context_dim, generator=g)
        mask = (torch.arange(L)[None] < torch.randint(1, L + 1, (batch, 1), generator=g)) if masked else None
    kwargs: dict[str, Any] = {}
    if cfg.enable_reg:
        kwargs["cls_t"] = torch.randn(batch, cfg.z_dim, generator=g).to(device)
    if cfg.is_meanflow:
        kwargs["t_abs"] = torch.rand(batch, generator=g).to(device)
    args = tuple(a.to(device) if a is not None else None for a in (x, t, cond, mask))
    return args, kwargs


def attention_masks(net: torch.nn.Module, args: tuple, kwargs: dict) -> list[tuple[int, ...] | None]:
    rec = MaskRecorder()
    with torch.no_grad(), rec:
        net(*args, **kwargs)
    return rec.masks


def graph_breaks(net: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch._dynamo

    torch._dynamo.reset()
    ex = torch._dynamo.explain(net)(*args, **kwargs)
    torch._dynamo.reset()
    return {
        "graphs": ex.graph_count,
        "graph_breaks": ex.graph_break_count,
        "reasons": [str(r.reason).splitlines()[0] for r in ex.break_reasons][:5],
    }


def matmul_gflops(
    device: torch.device, dtype: torch.dtype, min_time: float, n: int | None = None
) -> dict[str, Any]:
    """This machine's large-matmul ceiling: C = A @ B with square n x n operands, 2 n^3 FLOPs."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    m = _timer("a @ b", {"a": a, "b": b}).blocked_autorange(min_run_time=min_time)
    return {"n": n, "seconds": m.median, "gflops_per_s": 2 * n**3 / m.median / 1e9}


class PreEncoded:
    """The benchmark's conditioner: batches carry ready conditions (labels, or random text-encoder states with a
    padding mask), as with pre-extracted latents and cached captions, so the timed step is the network's."""

    def __init__(self, cfg: Stage2Config):
        self.text = cfg.conditioning.type == "text"
        self.num_classes = cfg.misc.num_classes
        self.shape = (cfg.conditioning.text_encoder.max_length, cfg.conditioning.context_dim) if self.text else None

    def __call__(self, cond: Any, device: torch.device):
        return cond

    def null(self, batch: int, device: torch.device):
        from nanogen.conditioning import Cond, LabelConditioner

        if not self.text:
            return LabelConditioner(self.num_classes).null(batch, device)
        mask = torch.zeros(batch, self.shape[0], dtype=torch.bool, device=device)
        mask[:, 0] = True
        return Cond(torch.zeros(batch, *self.shape, device=device), mask)

    def batch(self, n: int, device: torch.device, g: torch.Generator):
        from nanogen.conditioning import Cond

        if not self.text:
            return Cond(torch.randint(0, self.num_classes, (n,), generator=g).to(device))
        L, C = self.shape
        mask = torch.arange(L)[None] < torch.randint(L // 4, L + 1, (n, 1), generator=g)
        return Cond(torch.randn(n, L, C, generator=g).to(device), mask.to(device))


def run_benchmark(
    cfg: Stage2Config,
    batch_size: int = 16,
    steps: int = 20,
    warmup: int = 3,
    min_time: float = 1.0,
    explain: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time ``steps`` real optimizer steps of the config (after ``warmup`` untimed ones, which include
    compilation): loss, backward, clip, AdamW, schedule and EMA through ``train.OptimizerStep``, with the
    config's precision, compile, activation checkpointing and (under torchrun) DDP/FSDP, on pre-encoded random
    latents of the config's shape. ``batch_size`` is per process and micro-step."""
    from nanogen import parallel
    from nanogen.build import build_objective, load_frozen, needs_images
    from nanogen.ema import EMA
    from nanogen.errors import UserError
    from nanogen.hardware import device_name, peak_flops, peak_memory_gb
    from nanogen.modelinfo import train_flops_per_image
    from nanogen.optim import build_optimizer, build_scheduler
    from nanogen.train import OptimizerStep

    if batch_size < 1 or steps < 1 or warmup < 0:
        raise UserError(f"--batch-size and --steps must be >= 1 and --warmup >= 0, got {batch_size}, {steps}, {warmup}")
    if threads is not None:
        torch.set_num_threads(threads)
    info = parallel.init(cfg.run.device)
    dev, tc = info.device, cfg.training
    bf16 = tc.precision == "bf16"
    torch.manual_seed(0)
    net = build_network(cfg).to(dev)
    n_params = sum(p.numel() for p in net.parameters())
    # structural checks on the bare network: dense masks block flash attention; graph breaks split compiled code
    args, kwargs = example_inputs(net, min(batch_size, 2), dev)
    masks = attention_masks(net, args, kwargs)
    unmasked = attention_masks(net, args if args[3] is None else (*args[:3], None), kwargs)
    structure: dict[str, Any] = {
        "attention_calls": len(masks),
        "attention_masks": sorted({str(s) for s in masks}),
        "unmasked_input_attention_masks": sum(s is not None for s in unmasked),
    }
    if explain:
        structure["graphs"] = graph_breaks(net, args, kwargs)
    objective = build_objective(cfg, net, load_frozen(cfg)).to(dev)
    ema = EMA(net, tc.ema_decay)
    wrapped = parallel.prepare_training(net, objective, ema.model, info, tc)
    ema.bind(net)
    opt = build_optimizer(net, tc.optimizer, dev, fused=not parallel.is_fsdp(net))
    sched = build_scheduler(opt, tc.scheduler, 1000)
    cond = PreEncoded(cfg)
    stepper = OptimizerStep(cfg, info, wrapped, net, opt, sched, ema, None, cond)

    g = torch.Generator().manual_seed(info.rank)
    z = torch.randn(batch_size, *cfg.misc.latent_size, generator=g).to(dev)
    y = cond.batch(batch_size, dev, g)
    images = None
    if needs_images(cfg):  # REPA / REG / perceptual losses read pixels too
        images = (torch.rand(batch_size, 3, tc.image_size, tc.image_size, generator=g) * 2 - 1).to(dev)

    def next_batch():
        return z, y, images

    sync = _sync(dev)
    for i in range(warmup):
        stepper(i, next_batch)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        loss, _ = stepper(warmup + i, next_batch)
    sync()
    seconds = (time.perf_counter() - t0) / steps
    if not bool(torch.isfinite(loss)):
        raise UserError(f"benchmark: the loss is not finite after {warmup + steps} steps; check the config's optimizer settings")

    per_step = batch_size * tc.grad_accum_steps
    flops_img = train_flops_per_image(cfg)
    achieved = per_step * flops_img / seconds  # model FLOP/s on this device
    peak = peak_flops(dev, bf16)
    ceiling = matmul_gflops(dev, torch.bfloat16 if bf16 and dev.type == "cuda" else torch.float32, min_time)
    if peak is not None:
        mfu, basis = achieved / peak, f"datasheet dense {'bf16' if bf16 else 'tf32'} peak {peak / 1e12:.1f} TFLOP/s"
    else:
        mfu, basis = achieved / (ceiling["gflops_per_s"] * 1e9), "measured matmul ceiling (no datasheet peak for this device)"
    return {
        "model": cfg.stage_2.target,
        "device": device_name(dev),
        "processes": info.world_size,
        "threads": torch.get_num_threads(),
        "precision": tc.precision,
        "compile": tc.compile,
        "activation_checkpointing": tc.activation_checkpointing,
        "parallel": tc.parallel if info.enabled else "none",
        "torch": torch.__version__,
        "batch_size": batch_size,
        "grad_accum_steps": tc.grad_accum_steps,
        "tokens": getattr(net, "num_patches", None),
        "params": n_params,
        "steps": steps,
        "warmup_steps": warmup,
        "step_ms": seconds * 1e3,
        "img_per_s": per_step * info.world_size / seconds,
        "img_per_s_per_device": per_step / seconds,
        "train_gflops_per_image": flops_img / 1e9,
        "gflops_per_s": achieved / 1e9,
        "mfu": mfu,
        "mfu_basis": basis,
        "matmul": ceiling,
        "mfu_vs_matmul": achieved / (ceiling["gflops_per_s"] * 1e9),
        "peak_mem_gb": peak_memory_gb(dev),
        "final_loss": float(loss),
        "latent_size": list(cfg.misc.latent_size),
        **structure,
    }


def _sync(dev: torch.device):
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def render(r: dict[str, Any]) -> str:
    extras = [k for k in ("compile", "activation_checkpointing") if r.get(k) is True]
    lines = [
        f"{r['model']} on {r['device']} x {r['processes']}, {r['threads']} threads, {r['precision']}"
        f"{', ' + ', '.join(extras) if extras else ''}, torch {r['torch']}, batch {r['batch_size']} x {r['grad_accum_steps']} accumulation",
        f"  optimizer step        {r['step_ms']:9.1f} ms  (mean of {r['steps']} after {r['warmup_steps']} warm-up), "
        f"{r['img_per_s_per_device']:.1f} img/s per device",
        f"  model FLOPs           {r['gflops_per_s']:9.1f} GFLOP/s  ({r['train_gflops_per_image']:.3f} GFLOPs per image, 3 x forward)",
        f"  MFU                   {100 * r['mfu']:9.1f} %  (vs {r['mfu_basis']})",
        f"  matmul ceiling        {r['matmul']['gflops_per_s']:9.1f} GFLOP/s  ({r['matmul']['n']}^2 operands"
        + (")" if r["mfu_basis"].startswith("measured") else f"; {100 * r['mfu_vs_matmul']:.1f} % of it)"),
        f"  peak memory           {r['peak_mem_gb']:9.2f} GB",
    ]
    if "attention_calls" in r:
        lines.append(
            f"  attention masks       {r['unmasked_input_attention_masks']} dense masks for unmasked inputs "
            f"({r['attention_calls']} attention calls; with this config's inputs: {', '.join(r['attention_masks'])})"
        )
    if "graphs" in r:
        c = r["graphs"]
        why = f": {'; '.join(c['reasons'])}" if c["reasons"] else ""
        lines.append(f"  torch.compile         {c['graphs']} graph(s), {c['graph_breaks']} graph break(s){why}")
    return "\n".join(lines)
