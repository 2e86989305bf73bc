"""Inception Score from per-split sufficient statistics, mergeable across processes (spec ``evaluation.md``
§1.6, §7.3).

IS = mean over splits s of exp(E_x[KL(p(y|x) || p_s(y))]) with p_s the mean prediction of the split. Within a
split, with n_s images, S_s = sum_i p_i and E_s = sum_i sum_c p_ic log p_ic,

    E_x KL = (E_s - sum_c S_sc log(S_sc / n_s)) / n_s,

so each process keeps (n_s, S_s, E_s) per split, in float64, and the sums all-reduce exactly. The split of an
image is decided by its *global sample index* through a seeded permutation of the known total N, so the
result is the same for any number of processes and any batch size.

Conventions (they differ by ~1%, and a class-sorted sample set shows why the shuffle matters: 10 unshuffled
splits of 1000 balanced classes see 100 classes each and score 100, not 1000):

* ``diffusionbench`` (the paper's, the default): ``RandomState(0).permutation(N)``, 10 splits of ``N // 10``
  images (the remainder is dropped), eps 1e-10 inside both logs.
* ``torch-fidelity``: ``RandomState(2020).permutation(N)``, split boundaries ``i * N // 10``, no eps.
* ``adm``: no shuffle, consecutive chunks of 5000 images in sample order (the last one may be shorter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Convention = Literal["diffusionbench", "torch-fidelity", "adm"]
CONVENTIONS: tuple[str, ...] = ("diffusionbench", "torch-fidelity", "adm")
ADM_SPLIT_SIZE = 5000


def split_assignment(num_samples: int, convention: Convention = "diffusionbench", splits: int = 10) -> np.ndarray:
    """Split id of every global sample index 0..N-1 (-1 = not counted)."""
    n = num_samples
    out = np.full(n, -1, dtype=np.int64)
    if convention == "adm":
        return np.arange(n) // ADM_SPLIT_SIZE
    if convention == "diffusionbench":
        perm = np.random.RandomState(0).permutation(n)
        size = n // splits
        for s in range(splits):
            out[perm[s * size : (s + 1) * size]] = s
        return out
    if convention == "torch-fidelity":
        perm = np.random.RandomState(2020).permutation(n)
        for s in range(splits):
            out[perm[s * n // splits : (s + 1) * n // splits]] = s
        return out
    raise ValueError(f"unknown Inception Score convention '{convention}' ({', '.join(CONVENTIONS)})")


@dataclass
class InceptionScoreState:
    """Per-split (count, sum of p, sum of p log p) over the samples seen so far."""

    assignment: np.ndarray  # split id per global index (split_assignment)
    counts: Tensor  # (splits,)
    prob_sums: Tensor  # (splits, classes)
    plogp_sums: Tensor  # (splits,)
    eps: float

    @classmethod
    def create(
        cls, num_samples: int, num_classes: int = 1008, convention: Convention = "diffusionbench", splits: int = 10
    ) -> InceptionScoreState:
        assignment = split_assignment(num_samples, convention, splits)
        k = int(assignment.max()) + 1 if num_samples else 0
        eps = 1e-10 if convention == "diffusionbench" else 0.0
        z = torch.zeros
        return cls(assignment, z(k, dtype=torch.float64), z(k, num_classes, dtype=torch.float64), z(k, dtype=torch.float64), eps)

    def update(self, logits: Tensor, global_index: Tensor | list[int]) -> None:
        """Add images with unbiased logits (B, classes) and their global sample indices."""
        idx = torch.as_tensor(global_index, dtype=torch.long).cpu()
        if len(idx) != len(logits):
            raise ValueError(f"{len(logits)} logits but {len(idx)} indices")
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self.assignment)):
            raise ValueError(f"sample index out of range 0..{len(self.assignment) - 1}")
        split = torch.from_numpy(self.assignment[idx.numpy()])
        keep = split >= 0
        logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)[keep]
        p = logp.exp()
        if self.eps:  # DiffusionBench: log(p + eps)
            logp = torch.log(p + self.eps)
        split = split[keep]
        self.counts.index_add_(0, split, torch.ones(len(split), dtype=torch.float64))
        self.prob_sums.index_add_(0, split, p)
        self.plogp_sums.index_add_(0, split, (p * logp).sum(1))

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor], device: torch.device | str = "cpu") -> None:
        """Sum the statistics over processes, in place."""
        flat = torch.cat([self.counts, self.plogp_sums, self.prob_sums.flatten()]).to(device)
        flat = all_reduce_sum(flat).cpu()
        k = len(self.counts)
        self.counts, self.plogp_sums = flat[:k], flat[k : 2 * k]
        self.prob_sums = flat[2 * k :].view(k, -1)

    def per_split(self) -> Tensor:
        n = self.counts.clamp(min=1)[:, None]
        marginal = self.prob_sums / n
        cross = torch.xlogy(self.prob_sums, marginal + self.eps).sum(1)  # 0 log 0 = 0 for classes a split never sees
        return torch.exp((self.plogp_sums - cross) / n[:, 0])

    def compute(self) -> tuple[float, float]:
        """(mean, std) over splits; every split must be complete."""
        expected = np.bincount(self.assignment[self.assignment >= 0], minlength=len(self.counts))
        if not np.array_equal(self.counts.numpy().astype(np.int64), expected):
            raise ValueError(f"Inception Score: split counts {self.counts.tolist()} do not match the plan {expected.tolist()}")
        scores = self.per_split()
        return float(scores.mean()), float(scores.std(unbiased=False))
