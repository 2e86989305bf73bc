"""Generation metrics over the datasets of ``eval.datasets``: FID for class-conditional sets and the nano
GenEval score for the nano text-to-image tier (the full suite, GenEval / DPG / VQAScore / FD_r, comes with the
eval suite).

Reference statistics come from a built-in dataset (computed once and cached under
``$NANOGEN_CACHE``, default ``~/.cache/nanogen``, keyed by dataset, split, count and the extractor's weight
hash) or from a ``reference_npz`` holding ``mu`` and ``sigma`` (the ADM / JiT format).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nanogen import parallel
from nanogen.config import Stage2Config
from nanogen.config.schema import EvalDatasetConfig
from nanogen.errors import NotAvailableError, UserError
from nanogen.eval import generate as gen
from nanogen.eval.fid import GaussianMoments, fid_from_moments, frechet_distance
from nanogen.eval.images import to_uint8
from nanogen.eval.inception import FEATURE_DIM, InceptionFeatures, weights_sha256
from nanogen.log import progress

AVAILABLE_METRICS = ("fid", "nano_geneval")
NANO_GENEVAL_SET = "nano-geneval"  # the built-in prompt set of the nano T2I tier (data/nano_scenes.py)


def check_metrics(cfg: Stage2Config) -> None:
    assert cfg.eval is not None
    for name, ds in cfg.eval.datasets.items():
        for m in ds.metrics:
            if m not in AVAILABLE_METRICS:
                raise NotAvailableError(
                    f"eval.datasets.{name}.metrics: '{m}' is not available in this nanogen release yet "
                    f"(available: {', '.join(AVAILABLE_METRICS)}); remove it or set eval=null"
                )
        if ds.type != "builtin" and "fid" in ds.metrics:
            if not ds.reference_npz:
                raise UserError(f"eval.datasets.{name}.reference_npz: FID on '{name}' needs reference statistics (an npz with mu, sigma)")
            npz_reference(ds.reference_npz)  # present and readable now, not after hours of training
        text = ds.condition_type == "text"
        if text != (cfg.conditioning.type == "text"):
            raise UserError(
                f"eval.datasets.{name}.condition_type: '{ds.condition_type}' but the model is "
                f"{cfg.conditioning.type}-conditioned; evaluate {cfg.conditioning.type} models on {cfg.conditioning.type} sets"
            )
        if "nano_geneval" in ds.metrics and (ds.target or name) != NANO_GENEVAL_SET:
            raise UserError(
                f"eval.datasets.{name}.metrics: nano_geneval scores the built-in '{NANO_GENEVAL_SET}' prompt set; "
                f"set eval.datasets.{name}.target={NANO_GENEVAL_SET}"
            )
        if text and "fid" in ds.metrics:
            raise NotAvailableError(f"eval.datasets.{name}.metrics: FID on a text-to-image set is not available yet; remove 'fid'")


def cache_dir() -> Path:
    return Path(os.environ.get("NANOGEN_CACHE", Path.home() / ".cache" / "nanogen")).expanduser()


def _extract(extractor: InceptionFeatures, images: torch.Tensor, batch: int, desc: str) -> GaussianMoments:
    mom = GaussianMoments.empty(FEATURE_DIM)
    with progress(len(images), desc, unit="img", leave=False) as bar:
        for i in range(0, len(images), batch):
            chunk = images[i : i + batch]
            mom.update(extractor(chunk))
            bar.update(len(chunk))
    return mom


def _reduce(mom: GaussianMoments) -> GaussianMoments:
    """Sum moments over processes (exact: sums of float64)."""
    n = parallel.all_reduce_sum(torch.tensor([float(mom.n)], dtype=torch.float64))
    s = parallel.all_reduce_sum(mom.sum.clone())
    so = parallel.all_reduce_sum(mom.sum_outer.clone())
    return GaussianMoments(int(n.item()), s, so)


def builtin_reference(name: str, ds: EvalDatasetConfig, image_size: int, n: int, extractor: InceptionFeatures) -> GaussianMoments:
    from nanogen.data.nano import NUM_CLASSES, load_nano

    key = json.dumps({"ds": name, "split": ds.split, "n": n, "size": image_size, "w": weights_sha256()}, sort_keys=True)
    path = cache_dir() / "refstats" / f"{name}-{ds.split}-{n}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if path.is_file():
        try:
            st = torch.load(path, map_location="cpu")
            return GaussianMoments(st["n"], st["sum"], st["sum_outer"])
        except Exception:
            path.unlink(missing_ok=True)  # a damaged cache entry is recomputed, not trusted
    split = load_nano(ds.split, image_size)
    if n > len(split):
        raise UserError(f"eval.datasets.{name}.num_samples: {n} is more than the {len(split)} images of split '{ds.split}'")
    # Class-balanced subset: the k-th image of every class in turn (matches the balanced generated labels).
    per_class = [torch.nonzero(split.labels == c).flatten() for c in range(NUM_CLASSES)]
    order = [int(per_class[i % NUM_CLASSES][i // NUM_CLASSES]) for i in range(n)]
    mom = _extract(extractor, to_uint8(split.images[order]), 50, f"FID reference ({name}/{ds.split})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(mom.state_dict(), tmp)
    os.replace(tmp, path)
    return mom


def npz_reference(path_str: str) -> tuple[np.ndarray, np.ndarray]:
    p = Path(path_str).expanduser()
    if not p.is_file():
        raise UserError(f"reference_npz not found: '{path_str}'; download it (nanogen prepare --data eval) or fix the path")
    with np.load(p) as f:
        if "mu" not in f or "sigma" not in f:
            raise UserError(f"reference_npz '{path_str}' has no 'mu' and 'sigma' arrays (keys: {', '.join(f.files)})")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


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
) -> dict[str, float]:
    """Generate ``num_samples`` images per eval dataset on all processes and compute its metrics."""
    from nanogen.build import sampler_settings

    assert cfg.eval is not None
    extractor = InceptionFeatures(info.device)
    results: dict[str, float] = {}
    latent_shape = tuple(cfg.misc.latent_size)
    autocast = torch.bfloat16 if cfg.training.precision == "bf16" else None
    settings = sampler_settings(cfg)
    for name, ds in cfg.eval.datasets.items():
        if ds.condition_type == "text":
            results.update(_evaluate_prompts(cfg, name, ds, objective, tokenizer, conditioner, info, seed, tag))
            continue
        n = ds.num_samples
        mine = list(range(info.rank, n, info.world_size))
        fake = GaussianMoments.empty(FEATURE_DIM)
        steps = cfg.sampler.num_steps * len(range(0, len(mine), ds.batch_size))
        with progress(steps, f"sampling {name}{tag}", unit="step", leave=False) as bar:
            for i in range(0, len(mine), ds.batch_size):
                idx = mine[i : i + ds.batch_size]
                noise = gen.per_sample_noise(idx, latent_shape, seed, info.device, gen.reg_dim(objective))
                labels = gen.balanced_labels(idx, cfg.misc.num_classes)
                images = gen.generate(
                    objective, tokenizer, conditioner, labels, noise, settings,
                    autocast_dtype=autocast, on_step=lambda: bar.update(1),
                )
                fake.update(extractor(to_uint8(images)))
        fake = _reduce(fake)
        if "fid" in ds.metrics:
            if ds.type == "builtin":
                # rank 0 computes (and caches) the reference; the others then read the cache instead of redoing it
                if info.is_main:
                    ref = builtin_reference(name, ds, cfg.training.image_size, n, extractor)
                parallel.barrier()
                if not info.is_main:
                    ref = builtin_reference(name, ds, cfg.training.image_size, n, extractor)
                results[f"fid_{name}"] = fid_from_moments(fake, ref)
            else:
                mu, sigma = npz_reference(ds.reference_npz)  # type: ignore[arg-type]
                results[f"fid_{name}"] = frechet_distance(*fake.mean_cov(), mu, sigma)
    return results


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
    return [(it.prompt, it.metadata) for it in items[: ds.num_samples]]


def _evaluate_prompts(cfg, name, ds, objective, tokenizer, conditioner, info, seed, tag) -> dict[str, float]:
    """One image per prompt (sample i seeded by i, prompts split over processes), scored per prompt; the
    per-category sums are added over processes in float64."""
    from nanogen.build import sampler_settings

    items = eval_prompts(name, ds)
    mine = list(range(info.rank, len(items), info.world_size))
    settings = sampler_settings(cfg)
    autocast = torch.bfloat16 if cfg.training.precision == "bf16" else None
    scorer = None
    if "nano_geneval" in ds.metrics:
        from nanogen.data.nano_scenes import TAGS
        from nanogen.eval.nano_geneval import score_images

        scorer = score_images
        sums = torch.zeros(len(TAGS), 2, dtype=torch.float64)  # per category: correct, images
    steps = cfg.sampler.num_steps * len(range(0, len(mine), ds.batch_size))
    with progress(steps, f"sampling {name}{tag}", unit="step", leave=False) as bar:
        for i in range(0, len(mine), ds.batch_size):
            idx = mine[i : i + ds.batch_size]
            noise = gen.per_sample_noise(idx, tuple(cfg.misc.latent_size), seed, info.device, gen.reg_dim(objective))
            images = gen.generate(
                objective, tokenizer, conditioner, [items[j][0] for j in idx], noise, settings,
                autocast_dtype=autocast, on_step=lambda: bar.update(1),
            )  # fmt: skip
            if scorer is not None:
                meta = [items[j][1] for j in idx]
                for m, ok in zip(meta, scorer(to_uint8(images), meta, info.device), strict=True):
                    sums[TAGS.index(m["tag"])] += torch.tensor([float(ok), 1.0], dtype=torch.float64)
    out: dict[str, float] = {}
    if scorer is not None:
        sums = parallel.all_reduce_sum(sums.to(info.device)).cpu()
        acc = sums[:, 0] / sums[:, 1].clamp(min=1)
        present = sums[:, 1] > 0
        for t, a, p in zip(TAGS, acc.tolist(), present.tolist(), strict=True):
            if p:
                out[f"nano_geneval_{name}/{t}"] = a
        out[f"nano_geneval_{name}/overall"] = float(acc[present].mean())  # GenEval's overall: mean of categories
        out[f"nano_geneval_{name}/per_image"] = float(sums[:, 0].sum() / sums[:, 1].sum())  # the reference's number
    return out
