"""Per-element latent statistics for RAE normalisation (spec ``reference.md`` §6.4).

A float64 streaming accumulator of the per-element mean and the **population** variance over (C, H, W) latents.
Each batch is reduced on its own (two-pass within the batch) and merged with Chan et al.'s parallel formula, so
shards accumulated on different ranks merge to the same result as one pass over all the data (up to rounding).

Across ranks: ``state()`` gives a single float64 tensor ``[count, mean..., m2...]`` of the same size on every
rank; all-gather it (``torch.distributed.all_gather``) and fold with ``from_state`` + ``merge``, or call
``all_reduce_()``. ``save`` writes ``{'mean': (C,H,W), 'var': (C,H,W)}`` (float32) — the format ``RAE`` loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import Tensor


class LatentStats:
    """Streaming per-element mean / population variance, float64."""

    def __init__(self, shape: tuple[int, ...] | None = None):
        self.shape = tuple(shape) if shape is not None else None
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None  # sum of squared deviations from the mean
        if self.shape is not None:
            self.mean = torch.zeros(self.shape, dtype=torch.float64)
            self.m2 = torch.zeros(self.shape, dtype=torch.float64)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if self.shape is None:
            self.shape = shape
            self.mean = torch.zeros(shape, dtype=torch.float64)
            self.m2 = torch.zeros(shape, dtype=torch.float64)
        elif shape != self.shape:
            raise ValueError(f"latent stats shape {shape} does not match the accumulated shape {self.shape}")

    def _combine(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        if n_b == 0:
            return
        n_a = self.count
        if n_a == 0:
            self.count, self.mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n

    def update(self, batch: Tensor) -> LatentStats:
        """Add a batch (B, *shape), e.g. (B, C, H, W)."""
        x = batch.detach().to("cpu", torch.float64)
        self._check_shape(tuple(x.shape[1:]))
        n_b = x.shape[0]
        if n_b == 0:
            return self
        mean_b = x.mean(0)
        m2_b = (x - mean_b).square().sum(0)
        self._combine(n_b, mean_b, m2_b)
        return self

    def merge(self, other: LatentStats) -> LatentStats:
        """Fold another accumulator into this one (Chan's parallel formula)."""
        if other.count == 0:
            return self
        self._check_shape(other.shape)
        self._combine(other.count, other.mean, other.m2)
        return self

    def state(self) -> Tensor:
        """One float64 tensor ``[count, mean.flatten(), m2.flatten()]`` (same size on every rank)."""
        if self.shape is None:
            raise ValueError("latent stats: state() before any update, the shape is unknown")
        count = torch.tensor([float(self.count)], dtype=torch.float64)
        return torch.cat([count, self.mean.flatten(), self.m2.flatten()])

    @classmethod
    def from_state(cls, state: Tensor, shape: tuple[int, ...]) -> LatentStats:
        state = state.detach().to("cpu", torch.float64)
        numel = 1
        for s in shape:
            numel *= s
        if state.numel() != 1 + 2 * numel:
            raise ValueError(
                f"latent stats state has {state.numel()} values, expected {1 + 2 * numel} for {shape}"
            )
        out = cls(shape)
        out.count = int(round(state[0].item()))
        out.mean = state[1 : 1 + numel].reshape(shape).clone()
        out.m2 = state[1 + numel :].reshape(shape).clone()
        return out

    @classmethod
    def merged(cls, parts: Iterable[LatentStats]) -> LatentStats:
        out = cls()
        for p in parts:
            out.merge(p)
        return out

    def all_reduce_(self, group=None) -> LatentStats:
        """Replace this accumulator by the merge over all ranks (rank order), if torch.distributed is up."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        local = self.state()
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        )
        local = local.to(device)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        shape = self.shape
        merged = LatentStats.merged(LatentStats.from_state(p, shape) for p in parts)
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        return self

    def finalize(self) -> dict[str, Tensor]:
        """``{'mean', 'var'}`` (float64), var = population variance (divide by the count)."""
        if self.count == 0:
            raise ValueError("latent stats: no samples accumulated")
        return {"mean": self.mean.clone(), "var": self.m2 / self.count}

    def save(self, path: str | os.PathLike) -> dict[str, Tensor]:
        """Write ``torch.save({'mean': (C,H,W), 'var': (C,H,W)})`` in float32; returns what was written."""
        out = {k: v.float().contiguous() for k, v in self.finalize().items()}
        torch.save(out, path)
        return out
