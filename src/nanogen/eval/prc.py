"""Improved precision and recall (Kynkäänniemi et al. 2019) with ADM's ManifoldEstimator settings
(spec evaluation.md §1.7).

Each set spans a manifold: the union of balls around its points, each radius being the distance to the
point's k-th nearest neighbour in its own set, itself excluded (k = 3). Precision is the fraction of
generated samples inside the real manifold; recall is the fraction of real samples inside the generated
one. A point on a ball's surface is inside.

Distances are squared Euclidean, |a|^2 - 2 a.b + |b|^2, in ``block`` x ``block`` tiles so that 50k x 50k
never sits in memory. On CUDA the tiles are fp16, as ADM's, and a tile with a non-finite entry (features
too large for fp16) is recomputed in fp32; on CPU everything is fp32.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from nanogen.errors import UserError


def _tile_sq_dists(a: Tensor, b: Tensor, fp16: bool) -> Tensor:
    """(len(a), len(b)) squared distances as float32, clamped at 0 (cancellation can dip below)."""
    if fp16:
        a16, b16 = a.half(), b.half()
        d = (a16.square().sum(1, keepdim=True) - 2 * a16 @ b16.T + b16.square().sum(1)).float()
        if torch.isfinite(d).all():
            return d.clamp_min(0)
    a, b = a.float(), b.float()
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min(0)


def _usable_k(n: int, k: int, name: str) -> int:
    """k, or n - 1 with a warning when the set has no k-th neighbour (fewer than k + 1 points)."""
    if n < k + 1:
        warnings.warn(
            f"precision/recall: the {name} set has {n} samples, fewer than k+1={k + 1}; "
            f"its radii use neighbour {n - 1} instead",
            stacklevel=3,
        )
        return n - 1
    return k


def knn_sq_radii(
    x: Tensor, k: int = 3, block: int = 10000, fp16: bool | None = None, name: str = "feature"
) -> Tensor:
    """(n,) float32 squared distance of each row of x to its k-th nearest other row.

    A set of n <= k points warns and uses neighbour n - 1; a single point gets radius 0.
    ``fp16``: None = fp16 tiles on CUDA, fp32 elsewhere.
    """
    n = len(x)
    fp16 = x.is_cuda if fp16 is None else fp16
    k = _usable_k(n, k, name)
    if k == 0:
        return torch.zeros(n, device=x.device)
    radii = []
    for i in range(0, n, block):
        rows = x[i : i + block]
        nearest = None  # (rows, <= k): the smallest squared distances seen so far
        for j in range(0, n, block):
            d = _tile_sq_dists(rows, x[j : j + block], fp16)
            if i == j:  # this tile's diagonal is each row's distance to itself: not a neighbour
                d.fill_diagonal_(float("inf"))
            if nearest is not None:
                d = torch.cat([nearest, d], dim=1)
            nearest = d.topk(min(k, d.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k - 1])
    return torch.cat(radii)


def inside_any(
    points: Tensor, centres: Tensor, sq_radii: Tensor, block: int = 10000, fp16: bool | None = None
) -> Tensor:
    """(len(points),) bool: whether each point lies in at least one ball (centre, radius), surface in."""
    fp16 = points.is_cuda if fp16 is None else fp16
    flags = []
    for i in range(0, len(points), block):
        rows = points[i : i + block]
        hit = torch.zeros(len(rows), dtype=torch.bool, device=points.device)
        for j in range(0, len(centres), block):
            d = _tile_sq_dists(rows, centres[j : j + block], fp16)
            hit |= (d <= sq_radii[j : j + block]).any(dim=1)
        flags.append(hit)
    return torch.cat(flags)


def precision_recall(
    real: Tensor, fake: Tensor, k: int = 3, block: int = 10000, fp16: bool | None = None
) -> tuple[float, float]:
    """(precision, recall) of generated features ``fake`` (n_f, d) against reference ``real`` (n_r, d).

    ``fp16``: None = fp16 distance tiles on CUDA (with the fp32 fallback), fp32 on CPU.
    """
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    if len(real) == 0 or len(fake) == 0:
        raise UserError(
            f"precision/recall needs real and generated features; got {len(real)} real, {len(fake)} generated"
        )
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected two (n, d) sets of one d; got {tuple(real.shape)}, {tuple(fake.shape)}")
    fake = fake.to(real.device)
    real_r = knn_sq_radii(real, k, block, fp16, name="real")
    fake_r = knn_sq_radii(fake, k, block, fp16, name="generated")
    precision = inside_any(fake, real, real_r, block, fp16).sum().item() / len(fake)
    recall = inside_any(real, fake, fake_r, block, fp16).sum().item() / len(real)
    return precision, recall
