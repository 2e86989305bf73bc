"""Fréchet distance between Gaussians, from streaming and mergeable moments (spec ``evaluation.md`` §1.1, §7.3).

FD = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), with the unbiased covariance (divisor n - 1),
as every FID implementation uses it.

Moments: ``GaussianMoments`` keeps (n, mean, M2 = sum of centred outer products) in float64 and merges
batches with Chan et al.'s pairwise update, so adding 1e3 to every feature loses nothing (a raw
sum-of-squares accumulator would cancel catastrophically). Across processes ``reduce`` is exact and takes two
all-reduces: first n and the sum (giving the global mean), then each rank's M2 re-centred on that mean.

The trace term, Tr((S1 S2)^(1/2)) = sum of the square roots of the eigenvalues of S1 S2, which are also the
eigenvalues of the symmetric L^T S2 L for any factor S1 = L L^T. Methods:

* ``cholesky`` (the default when a covariance is positive definite): L from a Cholesky factorisation, then
  ``eigvalsh`` (values only) of L^T S2 L. About 1 s at 2048-d on 2 CPU cores, against 9-32 s for
  ``scipy.linalg.sqrtm`` (spec §1.1, §6).
* ``eigh``: L = S1^(1/2) from a full eigendecomposition; works for singular (rank < d) covariances, which
  sample sets smaller than the feature dimension always have. ``auto`` falls back to it.
* ``sqrtm``: the reference's ``scipy.linalg.sqrtm(S1 @ S2)`` with the ADM / pytorch-fid recipe (add 1e-6 I to
  both when the result is not finite; a complex result with an imaginary diagonal above 1e-3 is an error),
  without the ``disp`` argument that SciPy 1.18 removes. Kept to compare against.
* ``eig``: ``sum(sqrt(eigvals(S1 @ S2)).real)``, torch-fidelity >= 0.4 and torchmetrics.

All four agree to ~1e-9 relative on well-conditioned inputs (tests/test_fid.py). Like the reference, a
negative result from rounding is clipped to 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from nanogen.errors import UserError

FrechetMethod = Literal["auto", "cholesky", "eigh", "sqrtm", "eig"]


@dataclass
class GaussianMoments:
    """Running mean and centred second moment of feature vectors, float64 on the CPU."""

    n: int
    mean: Tensor  # (d,)
    m2: Tensor  # (d, d): sum over samples of (x - mean)(x - mean)^T

    @classmethod
    def empty(cls, dim: int) -> GaussianMoments:
        return cls(0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def update(self, feats: Tensor) -> None:
        f = torch.as_tensor(feats).detach().to("cpu", torch.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {tuple(f.shape)}")
        if len(f) == 0:
            return
        mean = f.mean(0)
        c = f - mean
        self._absorb(len(f), mean, c.T @ c)

    def _absorb(self, n: int, mean: Tensor, m2: Tensor) -> None:
        """Chan et al.'s pairwise combination of two (n, mean, M2) summaries."""
        total = self.n + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + torch.outer(delta, delta) * (self.n * n / total)
        self.mean = self.mean + delta * (n / total)
        self.n = total

    def merge(self, other: GaussianMoments) -> GaussianMoments:
        out = GaussianMoments(self.n, self.mean.clone(), self.m2.clone())
        if other.n:
            out._absorb(other.n, other.mean, other.m2)
        return out

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor], device: torch.device | str = "cpu") -> GaussianMoments:
        """The moments of the union of every process's samples (``all_reduce_sum`` sums a tensor in place
        over processes, e.g. ``parallel.all_reduce_sum``); exact up to float64 rounding."""
        head = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.mean * self.n]).to(device)
        head = all_reduce_sum(head).cpu()
        n = int(round(float(head[0])))
        if n == 0:
            return GaussianMoments.empty(self.dim)
        mean = head[1:] / n
        delta = self.mean - mean
        m2 = all_reduce_sum((self.m2 + torch.outer(delta, delta) * self.n).to(device)).cpu()
        return GaussianMoments(n, mean, m2)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
        return self.mean.numpy().copy(), (self.m2 / (self.n - 1)).numpy()

    def state_dict(self) -> dict[str, object]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state_dict(cls, st: dict) -> GaussianMoments:
        return cls(int(st["n"]), st["mean"].to(torch.float64), st["m2"].to(torch.float64))


def _sym(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


def _sqrt_eigvals_sum(m: np.ndarray) -> float:
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(_sym(m)), 0, None)).sum())


def _cholesky(s: np.ndarray) -> np.ndarray | None:
    """The Cholesky factor of a clearly positive-definite ``s``; None when ``s`` is (nearly) singular, where
    tiny pivots would carry most of the rounding error."""
    try:
        low = np.linalg.cholesky(s)
    except np.linalg.LinAlgError:
        return None
    d = np.diag(low)
    return low if d.min() > 1e-6 * d.max() else None


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, method: FrechetMethod = "auto") -> float:
    """Tr((S1 S2)^(1/2)) for covariance matrices S1, S2."""
    if method in ("auto", "cholesky"):
        for a, b in ((s1, s2), (s2, s1)):  # the trace is symmetric in S1, S2: factor whichever is definite
            low = _cholesky(a)
            if low is not None:
                return _sqrt_eigvals_sum(low.T @ b @ low)
        if method == "cholesky":
            raise ValueError("cholesky: neither covariance is positive definite; use method='eigh'")
        method = "eigh"
    if method == "eigh":
        w, v = np.linalg.eigh(_sym(s1))
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        return _sqrt_eigvals_sum(root @ s2 @ root)
    if method == "eig":
        return float(np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real.sum())
    if method == "sqrtm":
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            eps = 1e-6 * np.eye(len(s1))
            covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"sqrtm: imaginary component {np.abs(covmean.imag).max():.3g} is too large")
            covmean = covmean.real
        return float(np.trace(covmean))
    raise ValueError(f"unknown Fréchet method '{method}' (auto, cholesky, eigh, sqrtm, eig)")


def frechet_distance(
    mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, method: FrechetMethod = "auto"
) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2, method))
    return max(fd, 0.0)


def check_sample_count(n: int, what: str, dim: int = 2048, *, warn: bool = True) -> None:
    """At least 2 samples (an error otherwise, said in one line); fewer than the feature dimension is a warning
    with the count: the sample covariance is then singular and the distance biased upwards."""
    if n < 2:
        raise UserError(f"{what}: {n} sample(s); a Fréchet distance needs at least 2 (papers use 50,000)")
    if warn and n < dim:
        warnings.warn(f"{what}: only {n} samples (< {dim} features): the covariance is singular and the score is biased upwards; papers use 50,000", stacklevel=3)


def fid_from_moments(a: GaussianMoments, b: GaussianMoments, method: FrechetMethod = "auto") -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov(), method=method)
