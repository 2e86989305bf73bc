"""An exactly resumable, rank-sharded batch iterator over in-memory tensors.

Every epoch has a fixed permutation (seed + epoch); each process takes its own strided slice. The position
(epoch, batch) is the whole state, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


class TensorLoader:
    def __init__(self, *tensors: Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        n = len(tensors[0])
        if n < batch_size * world_size:
            raise ValueError(f"dataset of {n} items is smaller than one global batch ({batch_size * world_size})")
        self.tensors = tensors
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = n // (batch_size * world_size)  # drop_last, identical on every rank
        self.epoch = 0
        self.batch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _perm(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.tensors[0]), generator=g)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        while True:
            perm = self._perm()
            while self.batch < self.batches_per_epoch:
                start = (self.batch * self.world_size + self.rank) * self.batch_size
                idx = perm[start : start + self.batch_size]
                self.batch += 1
                yield tuple(t[idx] for t in self.tensors)
            self.epoch += 1
            self.batch = 0
