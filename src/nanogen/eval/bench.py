"""``nanogen benchmark-eval``: how fast the evaluation pieces run on this machine (issue 7 item 8).

1. The Fréchet distance at d = 2048 (sample covariances of 2d random features) with each method of
   ``eval/fid.py``; the target is <= 2 s on 2 CPU cores (scipy's sqrtm takes 9-32 s, spec §1.1).
2. Inception feature extraction in images/s, at 32 px (the nano tier) and 256 px (ImageNet), batched.
3. The generation harness on the demo model with FID's consumer (Inception + moments), with the consumer
   overlapped with generation (a worker thread; its own CUDA stream on GPU) and inline, in images/s.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from nanogen.eval.fid import GaussianMoments, frechet_distance


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def frechet_timings(dim: int, methods: list[str], repeats: int = 3) -> dict[str, float]:
    rng = np.random.default_rng(0)
    stats = []
    for shift in (0.0, 0.3):
        x = rng.standard_normal((2 * dim, dim)) @ (rng.standard_normal((dim, dim)) / np.sqrt(dim)) + shift
        stats += [x.mean(0), np.cov(x, rowvar=False)]
    out = {}
    for m in methods:
        out[m] = _best_of(lambda m=m: frechet_distance(*stats, method=m), 1 if m in ("sqrtm", "eig") else repeats)
    return out


def extraction_rate(device: torch.device, size: int, batch: int, batches: int = 3) -> float:
    from nanogen.eval.inception import InceptionFeatures

    net = InceptionFeatures(device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    net(images)  # warm-up (first call loads and lays out the weights)

    def go() -> None:
        for _ in range(batches):
            net(images)
        _sync(device)

    return batch * batches / _best_of(go, 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def harness_rates(config: str, device: torch.device, samples: int, batch: int) -> dict[str, float]:
    """images/s of generate + FID consumer, overlapped and inline, on ``config``'s (untrained) network."""
    from nanogen import parallel
    from nanogen.build import (
        build_conditioner,
        build_network,
        build_objective,
        build_tokenizer,
        sampler_settings,
    )
    from nanogen.config import load_config
    from nanogen.eval import generate as gen
    from nanogen.eval import harness
    from nanogen.eval.images import to_uint8
    from nanogen.eval.inception import InceptionFeatures

    cfg = load_config(config, ["eval=null"])
    torch.manual_seed(0)
    objective = build_objective(cfg, build_network(cfg).to(device).eval())
    tokenizer, conditioner = build_tokenizer(cfg).to(device), build_conditioner(cfg, device)
    settings = sampler_settings(cfg)
    shape = tuple(cfg.misc.latent_size)
    extractor = InceptionFeatures(device)
    info = parallel.DistInfo(device=device)

    def generate(idx):
        noise = gen.per_sample_noise(idx, shape, 0, device)
        with torch.no_grad():
            images = gen.generate(objective, tokenizer, conditioner, gen.balanced_labels(idx, cfg.misc.num_classes), noise, settings)
        return to_uint8(images)

    out = {}
    for overlap in (False, True):
        moments = GaussianMoments.empty(2048)
        plan = harness.Plan(samples, batch, samples, {})
        generate(list(range(batch)))  # warm-up
        t0 = time.perf_counter()
        harness.run(plan, generate, [lambda im, idx, m=moments: m.update(extractor(im))], info, overlap=overlap)
        _sync(device)
        out["overlapped" if overlap else "inline"] = samples / (time.perf_counter() - t0)
    return out


def run(dim: int, methods: list[str], samples: int, batch: int, config: str, device: torch.device) -> dict[str, Any]:
    from nanogen.hardware import cpu_name

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "frechet_seconds": frechet_timings(dim, methods),
        "frechet_dim": dim,
        "inception_img_per_s": {f"{s}px": extraction_rate(device, s, batch) for s in (32, 256)},
        "harness_img_per_s": harness_rates(config, device, samples, batch),
        "harness_config": config,
        "batch": batch,
    }


def render(r: dict[str, Any]) -> str:
    lines = [f"device: {r['device']} ({r['threads']} threads)", f"Fréchet distance at d={r['frechet_dim']}:"]
    lines += [f"  {m:9s} {t:7.2f} s" for m, t in r["frechet_seconds"].items()]
    lines.append(f"Inception features (batch {r['batch']}):")
    lines += [f"  {k:9s} {v:7.1f} img/s" for k, v in r["inception_img_per_s"].items()]
    lines.append(f"generation + FID features, {r['harness_config']}:")
    lines += [f"  {k:10s} {v:7.1f} img/s" for k, v in r["harness_img_per_s"].items()]
    return "\n".join(lines)
