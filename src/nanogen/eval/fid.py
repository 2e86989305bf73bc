"""Fréchet Inception Distance from streaming, mergeable moments (spec ``evaluation.md`` §1.1, §7.3).

FD = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), with the unbiased covariance (divisor n - 1).
Moments are kept as (n, sum x, sum x x^T) in float64, so shards from several processes add up exactly.
Tr((S1 S2)^(1/2)) is taken in the symmetric form Tr((A S2 A)^(1/2)) with A = S1^(1/2) via ``eigh``, which is
real and stable for the rank-deficient covariances of small sample sets; it agrees with ``scipy.linalg.sqrtm``
(the reference's method) to numerical precision (tests/test_fid.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class GaussianMoments:
    n: int
    sum: Tensor  # (d,) float64
    sum_outer: Tensor  # (d, d) float64

    @classmethod
    def empty(cls, dim: int) -> GaussianMoments:
        return cls(0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    def update(self, feats: Tensor) -> None:
        f = feats.detach().to("cpu", torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f

    def merge(self, other: GaussianMoments) -> GaussianMoments:
        return GaussianMoments(self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
        mu = self.sum / self.n
        cov = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()

    def state_dict(self) -> dict[str, object]:
        return {"n": self.n, "sum": self.sum, "sum_outer": self.sum_outer}


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    a = _sqrt_psd(s1)
    inner = a @ s2 @ a
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_moments(a: GaussianMoments, b: GaussianMoments) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())
