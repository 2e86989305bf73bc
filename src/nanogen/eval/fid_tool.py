"""``nanogen fid A B`` and ``nanogen ref-stats SRC OUT``: FID between any two image sets or statistics files,
and reference statistics built from images (spec ``evaluation.md`` §1, issue 7).

Both go through the same code as evaluation during training: ``InceptionFeatures`` (TF-2015 Inception,
TF1-bilinear resize, pool3), ``GaussianMoments`` (float64, mergeable) and ``frechet_distance``. Under
``torchrun`` every process reads a contiguous slice of the images and the moments are reduced exactly, so
the result does not depend on the number of processes.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanogen import parallel
from nanogen.errors import UserError
from nanogen.eval import refstats
from nanogen.eval.fid import FrechetMethod, GaussianMoments, check_sample_count, frechet_distance
from nanogen.eval.image_sources import ImageSource
from nanogen.eval.inception import FEATURE_DIM
from nanogen.log import progress


@dataclass
class SetStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int | None  # images behind the statistics (None: a file that does not say)
    manifest: dict
    label: str


def image_moments(source: ImageSource, extractor, info: parallel.DistInfo, batch_size: int = 100) -> GaussianMoments:
    """Inception moments of every image of ``source``, split over processes and reduced."""
    n = len(source)
    lo, hi = n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size
    mom = GaussianMoments.empty(FEATURE_DIM)
    with progress(hi - lo, f"features {source.path.name}", unit="img") as bar:
        for batch in source.batches(batch_size, lo, hi):
            mom.update(extractor(batch))
            bar.update(len(batch))
    mom = mom.reduce(parallel.all_reduce_sum, info.device)
    return mom


def set_stats(path: str, extractor_factory, info: parallel.DistInfo, batch_size: int) -> SetStats:
    """Statistics of A or B: read from a stats npz, or computed from images (a folder or an arr_0 npz)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".npz" and refstats.is_stats_file(p):
        st = refstats.load(p, what=f"statistics '{path}'")
        return SetStats(st.mu, st.sigma, st.manifest.get("num_images"), st.manifest, path)
    source = ImageSource(p)
    check_sample_count(len(source), str(path), warn=False)
    extractor = extractor_factory()
    mom = image_moments(source, extractor, info, batch_size)
    check_sample_count(mom.n, str(path))  # after the features: a bad image later in the set is the one error
    mu, sigma = mom.mean_cov()
    return SetStats(mu, sigma, mom.n, {"extractor": extractor.extractor_id}, path)


def fid_between(a: SetStats, b: SetStats, method: FrechetMethod = "auto") -> float:
    for x, y in ((a, b), (b, a)):
        if len(x.mu) != len(y.mu):
            raise UserError(f"'{x.label}' holds {len(x.mu)}-d statistics but '{y.label}' {len(y.mu)}-d; compare statistics of one extractor")
        ex, ey = x.manifest.get("extractor"), y.manifest.get("extractor")
        if ex and ey and ex.split(" ")[0] != ey.split(" ")[0]:
            raise UserError(f"'{x.label}' was computed with '{ex}' but '{y.label}' with '{ey}'; use one extractor for both")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method=method)


def build_ref_stats(src: str, out: str, extractor_factory, info: parallel.DistInfo, batch_size: int, note: str = "") -> dict:
    """Write ``out`` (mu, sigma, manifest) from the images of ``src``; returns the manifest."""
    source = ImageSource(src)
    check_sample_count(len(source), src, warn=False)
    extractor = extractor_factory()
    mom = image_moments(source, extractor, info, batch_size)
    check_sample_count(mom.n, src)
    mu, sigma = mom.mean_cov()
    manifest = {
        "extractor": extractor.extractor_id,
        "weights_sha256": getattr(extractor, "weights_sha256", None),
        "preprocess": "uint8 -> tf1-bilinear 299 -> (x-128)/128",
        "source": source.describe(),
        "num_images": mom.n,
        "image_size": list(source.size),
        "note": note,
        "created_by": f"nanogen ref-stats (torch {torch.__version__}, {platform.machine()})",
    }
    if info.is_main:
        refstats.save(out, mu, sigma, manifest)
    parallel.barrier()
    return manifest
