"""Generation evaluation: for every entry of ``eval.datasets``, generate its samples with the config's sampler
and guidance (eval/harness.py) and compute its metrics (eval/metrics.py). Used by online eval during training
(EMA weights every ``eval.eval_interval`` steps) and by ``nanogen eval`` for released checkpoints (spec
``reference.md`` §8.1).

Results are one dict ``{<metric>_<set>[/<part>]: value}``; ``record`` appends them, with the config name, step,
guidance and sample count, to ``<eval_dir>/<run name>_<ema|model>.csv`` and ``results.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from nanogen import parallel
from nanogen.config import Stage2Config
from nanogen.config.schema import EvalDatasetConfig
from nanogen.errors import UserError
from nanogen.eval import harness
from nanogen.eval import metrics as M
from nanogen.eval.images import to_uint8
from nanogen.eval.metrics import NANO_GENEVAL_SET, cache_dir  # noqa: F401  (cache_dir: used across the package)
from nanogen.log import append_csv, is_main

from . import generate as gen


def check_metrics(cfg: Stage2Config) -> None:
    """Every eval set's metrics exist, suit the set and have their reference files, before any work."""
    assert cfg.eval is not None
    for name, ds in cfg.eval.datasets.items():
        text = ds.condition_type == "text"
        if text != (cfg.conditioning.type == "text"):
            raise UserError(
                f"eval.datasets.{name}.condition_type: '{ds.condition_type}' but the model is "
                f"{cfg.conditioning.type}-conditioned; evaluate {cfg.conditioning.type} models on {cfg.conditioning.type} sets"
            )
        if ds.images_per_prompt < 1:
            raise UserError(f"eval.datasets.{name}.images_per_prompt: must be >= 1, got {ds.images_per_prompt}")
        M.check(name, ds, text)
        if text:
            eval_prompts(name, ds)  # the prompt set is there and readable now, not after hours of training


def eval_prompts(name: str, ds: EvalDatasetConfig) -> list[tuple[str, dict]]:
    """(prompt, metadata) of a text eval set: the built-in nano GenEval set (``num_samples`` prompts, balanced
    over its six categories), or a prompt set from local files (GenEval / DPG-Bench / GenAI-Bench, ...)."""
    target = ds.target or name
    if target == NANO_GENEVAL_SET:
        from nanogen.data.nano_scenes import TAGS, nano_geneval_prompts

        meta = nano_geneval_prompts(max(1, ds.num_samples // len(TAGS)), seed=0)
        return [(m["prompt"], m) for m in meta]
    from nanogen.data.prompts import load_prompts

    items = load_prompts(target, ds.data_dir, ds.split)
    return [(it.prompt, it.metadata) for it in items]


def weights_fingerprint(module: nn.Module) -> str:
    """A cheap identity of a network's weights (per-tensor float64 sums and sums of squares), so that sample
    shards from another checkpoint are never mixed into a resumed evaluation."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if p.is_floating_point():
                t = p.detach().double()
                h.update(f"{name}:{tuple(p.shape)}:{float(t.sum()):.12e}:{float((t * t).sum()):.12e}".encode())
    return h.hexdigest()[:16]


def context(cfg: Stage2Config, name: str, ds: EvalDatasetConfig, info: parallel.DistInfo) -> M.Context:
    size = cfg.training.image_size
    if ds.condition_type == "text":
        prompts = eval_prompts(name, ds)
        per = ds.images_per_prompt
        n = min(ds.num_samples, len(prompts) * per) if (ds.target or name) != NANO_GENEVAL_SET else len(prompts) * per
        items = [prompts[i // per] for i in range(n)]
        return M.Context(name, ds, n, size, info, items)
    ctx = M.Context(name, ds, ds.num_samples, size, info)
    if ds.type == "builtin":
        ctx.reference_images = lambda: M.builtin_reference_images(name, ds, size, ds.num_samples)
    return ctx


@torch.no_grad()
def evaluate(
    cfg: Stage2Config,
    objective,
    tokenizer: nn.Module,
    conditioner,
    info: parallel.DistInfo,
    *,
    seed: int = 0,
    tag: str = "",
    samples_dir: Path | None = None,
    by_identity: bool = False,
) -> dict[str, float]:
    """Generate every eval set's samples on all processes and compute its metrics.

    ``samples_dir``: keep uint8 sample shards in ``<samples_dir>/<set>/`` and reuse finished ones after a crash;
    ``by_identity``: in ``<samples_dir>/<hash of weights, sampler, seed>/<set>/`` instead, so that another
    checkpoint or sampler setting gets its own folder."""
    from nanogen.build import sampler_settings

    assert cfg.eval is not None
    results: dict[str, float] = {}
    settings = sampler_settings(cfg)
    autocast = torch.bfloat16 if cfg.training.precision == "bf16" else None
    latent_shape = tuple(cfg.misc.latent_size)
    identity = {
        "weights": weights_fingerprint(objective.net),
        "sampler": repr(settings),
        "seed": seed,
        "precision": cfg.training.precision,
    }
    if samples_dir is not None and by_identity:
        samples_dir = samples_dir / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    for name, ds in cfg.eval.datasets.items():
        ctx = context(cfg, name, ds, info)
        streams = M.FeatureStreams(info.device)
        metrics = M.build(ctx, streams)
        text = ds.condition_type == "text"

        def generate(idx: list[int], ctx=ctx, text=text) -> torch.Tensor:
            noise = gen.per_sample_noise(idx, latent_shape, seed, info.device, gen.reg_dim(objective))
            cond = [ctx.items[i][0] for i in idx] if text else gen.balanced_labels(idx, cfg.misc.num_classes)
            images = gen.generate(objective, tokenizer, conditioner, cond, noise, settings, autocast_dtype=autocast)
            return to_uint8(images)

        def consume(images: torch.Tensor, idx: list[int], metrics=metrics, streams=streams) -> None:
            feats = streams(images)
            for m in metrics:
                m.update(feats, images, idx)

        plan = harness.Plan(
            ctx.num_samples, ds.batch_size,
            cfg.eval.shard_size or harness.default_shard_size(ctx.num_samples, ds.batch_size),
            {**identity, "set": name, "target": ds.target or name, "split": ds.split},
        )  # fmt: skip
        shard_dir = samples_dir / name if samples_dir is not None else None
        t0 = time.perf_counter()
        harness.run(plan, generate, [consume], info, shard_dir=shard_dir, desc=f"sampling {name}{tag}")
        for m in metrics:
            results.update(m.result())
        results[f"num_samples_{name}"] = ctx.num_samples
        results[f"seconds_{name}"] = round(time.perf_counter() - t0, 2)
    return results


def evaluate_checkpoint(
    cfg: Stage2Config, ckpt: str | None, *, seed: int = 0, samples_dir: Path | None = None, by_identity: bool = False,
    tag: str = "",
) -> dict[str, float]:
    """``evaluate`` on a checkpoint's EMA weights (its raw weights if it has no EMA): what ``nanogen eval`` and the
    bench suite run. The network, tokenizer and conditioner are built from ``cfg``; processes join if launched."""
    from nanogen.build import build_conditioner, build_objective, build_tokenizer, load_network

    info = parallel.init(cfg.run.device)
    net = load_network(cfg, ckpt, info.device)
    return evaluate(
        cfg, build_objective(cfg, net), build_tokenizer(cfg).to(info.device), build_conditioner(cfg, info.device), info,
        seed=seed, tag=tag, samples_dir=samples_dir, by_identity=by_identity,
    )  # fmt: skip


def record(cfg: Stage2Config, out_dir: Path, kind: str, step: int, res: dict[str, float], config_name: str) -> None:
    """Append one evaluation to ``<out_dir>/<run name>_<kind>.csv`` and ``<out_dir>/results.jsonl`` (rank 0),
    with what produced it: config, step, weights (ema | model), guidance, sampler steps; the sample count of
    every set is among the results (``num_samples_<set>``)."""
    if not is_main():
        return
    assert cfg.eval is not None
    g = cfg.guidance.cfg
    row = {
        "step": step,
        "config": config_name,
        "weights": kind,
        "cfg_scale": g.scale,
        "cfg_interval": f"{g.t_min}-{g.t_max}",
        "sampler_steps": cfg.sampler.num_steps,
        **res,
    }
    append_csv(out_dir / f"{cfg.run.name}_{kind}.csv", row)
    with open(out_dir / "results.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}) + "\n")



def summary_line(res: dict[str, float]) -> str:
    """The metrics of an evaluation on one line (bookkeeping keys left out)."""
    return ", ".join(f"{k} {v:.4g}" for k, v in res.items() if not k.startswith(("seconds_", "num_samples_")))
