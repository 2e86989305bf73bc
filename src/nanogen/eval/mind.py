"""MIND ("Monge Inception Distance", Berthet et al. 2026): a scaled sliced 2-Wasserstein distance between
two feature sets (spec evaluation.md §2.2, reference.md §8.3).

    MIND = 3d * mean over M unit directions u of  mean_j (sort(X u)_j - sort(Y u)_j)^2

in float32, with one CPU generator seeded ``seed`` (2020 in the reference) drawn from in this order:

1. when n1 != n2, ``randperm(max(n1, n2))[:min(n1, n2)]``: the rows kept of the larger set;
2. ``randn(M, d)``, rows scaled to unit norm: the directions.

The draw depends on (n1, n2, d, M, seed) only, which makes the distributed form exact: every rank calls
``draw`` with the global counts and projects its own features (``project``: n_r x M floats instead of
n_r x d); rank 0 concatenates the projections in global sample order and calls ``mind_from_projections``,
which keeps the drawn rows, sorts and averages. Keeping rows after projecting equals projecting the kept
rows, and ``mind`` is this same path on one process. MIND is not divided by a normaliser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nanogen.errors import UserError


@dataclass(frozen=True)
class MindDraw:
    """The random part of MIND: the rows kept of each set (None: all) and the (M, d) unit directions."""

    keep1: Tensor | None
    keep2: Tensor | None
    directions: Tensor


def draw(n1: int, n2: int, d: int, num_projections: int = 1000, seed: int = 2020) -> MindDraw:
    """Subsampling indices and directions for n1 and n2 features of dimension d, in the reference's order."""
    if min(n1, n2) < 1 or d < 1 or num_projections < 1:
        raise UserError(
            f"MIND needs two non-empty feature sets and at least one projection; got n1={n1}, n2={n2}, "
            f"d={d}, num_projections={num_projections}"
        )
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = min(n1, n2)
    keep1 = torch.randperm(n1, generator=g)[:n] if n1 > n else None
    keep2 = torch.randperm(n2, generator=g)[:n] if n2 > n else None
    u = torch.randn(num_projections, d, generator=g, dtype=torch.float32)
    return MindDraw(keep1, keep2, u / u.norm(dim=1, keepdim=True).clamp_min(1e-12))


def project(features: Tensor, directions: Tensor) -> Tensor:
    """(n, d) features -> (n, M) float32 projections on the directions, on the features' device."""
    if features.ndim != 2 or features.shape[1] != directions.shape[1]:
        raise ValueError(f"expected (n, {directions.shape[1]}) features, got {tuple(features.shape)}")
    return features.float() @ directions.to(features.device).T


def mind_from_projections(p1: Tensor, p2: Tensor, drawn: MindDraw) -> float:
    """MIND from both sets' full projections, rows in global sample order (the order ``draw`` indexes)."""
    if drawn.keep1 is not None:
        p1 = p1[drawn.keep1.to(p1.device)]
    if drawn.keep2 is not None:
        p2 = p2[drawn.keep2.to(p2.device)]
    if p1.shape != p2.shape:
        raise ValueError(f"projections do not match the draw: {tuple(p1.shape)} vs {tuple(p2.shape)}")
    # sorting each direction's column pairs the order statistics: the 1-D optimal transport plan
    w2 = (p1.sort(dim=0).values - p2.sort(dim=0).values.to(p1.device)).square().mean(dim=0)
    return 3.0 * drawn.directions.shape[1] * w2.mean().item()


def mind(x: Tensor, y: Tensor, num_projections: int = 1000, seed: int = 2020) -> float:
    """MIND between features x (n1, d) and y (n2, d); the larger set is subsampled to min(n1, n2) rows."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two (n, d) sets of one d, got {tuple(x.shape)} and {tuple(y.shape)}")
    drawn = draw(len(x), len(y), x.shape[1], num_projections, seed)
    return mind_from_projections(project(x, drawn.directions), project(y, drawn.directions), drawn)
