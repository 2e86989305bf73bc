"""``nanogen benchmark``: how close a network's training step runs to this machine's own matmul speed.

Model FLOPs per image are the analytic forward FLOPs x 3 (forward + backward, ``performance.md`` §1). The
ceiling is measured in the same run: a large square matmul in the same dtype. Their ratio is MFU on a GPU and
its honest analogue on a CPU (``performance.md`` §11). Two structural checks ride along, because they decide
whether the fast kernels can run at all: attention receives no dense mask for unmasked inputs (the reference
always builds one, §8.1), and ``torch.compile`` captures the forward in one graph (``torch._dynamo.explain``).
"""

from __future__ import annotations

import contextlib
import logging
import platform
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanogen.build import build_network
from nanogen.config import Stage2Config
from nanogen.config.loader import build


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


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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


def run_benchmark(
    cfg: Stage2Config,
    batch_size: int = 16,
    min_time: float = 3.0,
    explain: bool = True,
    threads: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    from nanogen import registry
    from nanogen.errors import UserError
    from nanogen.models.flops import forward_flops

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = cfg.training.precision == "bf16" and dev.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    net = build_network(cfg).to(dev)
    _, entry = registry.lookup(registry.MODELS, cfg.stage_2.target, "stage_2.target")
    mcfg = build(entry.config_cls(), cfg.stage_2.params, source="config", prefix="stage_2.params")
    args, kwargs = example_inputs(net, batch_size, dev)

    masks = attention_masks(net, args, kwargs)
    unmasked_args = args if args[3] is None else (*args[:3], None)
    unmasked = attention_masks(net, unmasked_args, kwargs)

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        with amp:
            out = net(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()

    step()  # warm-up (allocations, lazy init)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    m = _timer("step(); sync()", {"step": step, "sync": _sync(dev)}).blocked_autorange(
        min_run_time=min_time
    )
    peak = matmul_gflops(dev, dtype, min_time)
    flops_step = 3 * forward_flops(mcfg) * batch_size
    achieved = flops_step / m.median / 1e9
    res: dict[str, Any] = {
        "model": cfg.stage_2.target,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({cpu_name()})",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "batch_size": batch_size,
        "step_seconds": m.median,
        "step_iqr_seconds": m.iqr,
        "images_per_s": batch_size / m.median,
        "train_gflops_per_image": 3 * forward_flops(mcfg) / 1e9,
        "achieved_gflops_per_s": achieved,
        "matmul": peak,
        "mfu_vs_matmul": achieved / peak["gflops_per_s"],
        "attention_calls": len(masks),
        "attention_masks": sorted({str(s) for s in masks}),
        "unmasked_input_attention_masks": sum(s is not None for s in unmasked),
    }
    if explain:
        res["compile"] = graph_breaks(net, args, kwargs)
    return res


def _sync(dev: torch.device):
    return torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


def render(r: dict[str, Any]) -> str:
    lines = [
        f"{r['model']} on {r['device']}, {r['threads']} threads, {r['dtype']}, torch {r['torch']}, batch {r['batch_size']}",
        f"  train step (fwd+bwd)  {r['step_seconds'] * 1e3:9.1f} ms  (IQR {r['step_iqr_seconds'] * 1e3:.1f} ms), "
        f"{r['images_per_s']:.1f} img/s",
        f"  model FLOPs           {r['achieved_gflops_per_s']:9.1f} GFLOP/s  ({r['train_gflops_per_image']:.3f} GFLOPs per image)",
        f"  matmul ceiling        {r['matmul']['gflops_per_s']:9.1f} GFLOP/s  ({r['matmul']['n']}^2 operands)",
        f"  MFU vs matmul         {100 * r['mfu_vs_matmul']:9.1f} %",
        f"  attention masks       {r['unmasked_input_attention_masks']} dense masks for unmasked inputs "
        f"({r['attention_calls']} attention calls; with this config's inputs: {', '.join(r['attention_masks'])})",
    ]
    if "compile" in r:
        c = r["compile"]
        why = f": {'; '.join(c['reasons'])}" if c["reasons"] else ""
        lines.append(
            f"  torch.compile         {c['graphs']} graph(s), {c['graph_breaks']} graph break(s){why}"
        )
    return "\n".join(lines)
