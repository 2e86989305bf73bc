"""Exactly resumable, rank-sharded batch iterators: ``TensorLoader`` over in-memory tensors (or lists, such
as captions) and ``MapLoader`` over a map-style dataset decoded by DataLoader workers (``reference.md`` §7.3).

Every epoch has a fixed permutation (seed + epoch); each process takes its own strided slice. The position
(epoch, batch) is the whole state, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from nanogen.errors import UserError


def _permutation(seed: int, epoch: int, n: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _take(t: Tensor | list, idx: Tensor) -> Tensor | list:
    return [t[i] for i in idx.tolist()] if isinstance(t, list) else t[idx]


class Position:
    """The whole resumable state of a loader: (epoch, batch) of the next batch to yield; ``len()`` is this
    process's batches per epoch. Shared by ``TensorLoader``, ``MapLoader`` and the WebDataset ``StreamLoader``."""

    epoch: int = 0
    batch: int = 0
    batches_per_epoch: int = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def stats(self) -> dict[str, int]:
        """Counters for the log line (skipped samples, caption flags); none by default."""
        return {}


class TensorLoader(Position):
    def __init__(
        self, *tensors: Tensor | list, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):  # fmt: skip
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

    def _perm(self) -> Tensor:
        return _permutation(self.seed, self.epoch, len(self.tensors[0]))

    def __iter__(self) -> Iterator[tuple[Tensor | list, ...]]:
        while True:
            perm = self._perm()
            while self.batch < self.batches_per_epoch:
                start = (self.batch * self.world_size + self.rank) * self.batch_size
                idx = perm[start : start + self.batch_size]
                self.batch += 1
                yield tuple(_take(t, idx) for t in self.tensors)
            self.epoch += 1
            self.batch = 0


# ---------------------------------------------------------------------------------------------- MapLoader


def collate(items: Sequence[tuple[Any, ...]]) -> tuple[Tensor | list[str], ...]:
    """Batch dataset items field by field: tensors stacked (uint8 images stay uint8), ints -> LongTensor,
    strings (captions) -> list[str]."""
    return tuple(_collate_field(list(values)) for values in zip(*items, strict=True))


def _collate_field(values: list) -> Tensor | list[str]:
    if isinstance(values[0], Tensor):
        return torch.stack(values)
    if isinstance(values[0], str):
        return values
    if isinstance(values[0], int | np.integer):
        return torch.tensor(values, dtype=torch.long)
    raise TypeError(f"cannot batch dataset items of type {type(values[0]).__name__}")


class _EpochKeyed(Dataset):
    """The dataset indexed by (epoch, index) keys. The epoch travels with every index, so the dataset copies
    in persistent workers switch epochs (``set_epoch``: new flip coins) without being rebuilt."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.epoch: int | None = None

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, i = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[i]


class _BatchKeys:
    """The DataLoader's batch sampler. It asks the loader for a fresh key stream on every ``iter()``, so a
    persistent worker pool resumes from wherever the loader's state points."""

    def __init__(self, keys: Callable[[], Iterator[list[tuple[int, int]]]]):
        self.keys = keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.keys()


class MapLoader(Position):
    """Endless batches ``collate([dataset[i] ...])`` over a map-style dataset, resumable like TensorLoader.

    Training (``shuffle=True``): every epoch a fixed permutation of all indices (seed, epoch), global batch
    ``b * world_size + rank`` goes to this rank, the last partial global batch is dropped; the same batches
    ``TensorLoader`` would yield. Evaluation (``shuffle=False``): dataset order, and by default the last
    partial batch is kept (ranks may then differ by one batch). ``__len__`` is this rank's batches per epoch.

    The state is (epoch, batch) of the last yielded batch; after ``load_state_dict`` iteration starts at the
    next batch and the batches before it are never decoded. One live iterator at a time: a new ``iter()``
    restarts the worker pool from the current state and discards what the old one had prefetched.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        num_workers: int = 0, pin_memory: bool = False, shuffle: bool = True, drop_last: bool | None = None,
        prefetch_factor: int = 2, mp_context: str | None = None,
    ):  # fmt: skip
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = shuffle if drop_last is None else drop_last  # train drops, eval keeps every item
        # Global batch g goes to rank g % world_size: with drop_last the incomplete last round is dropped too,
        # so every rank has the same count; without it the first ranks may get one batch more.
        if self.drop_last:
            self.batches_per_epoch = self.n // (batch_size * world_size)
        else:
            global_batches = -(-self.n // batch_size)
            self.batches_per_epoch = max(0, global_batches - rank + world_size - 1) // world_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"dataset of {self.n} items is too small for one batch of {batch_size} on each of "
                f"{world_size} process(es): lower the batch size or use more data"
            )
        self.num_workers = num_workers
        # Pinning needs an accelerator; on a CPU-only host it would only warn.
        self.pin_memory = pin_memory and torch.accelerator.is_available()
        self.prefetch_factor = prefetch_factor
        self.mp_context = mp_context
        self.epoch = 0
        self.batch = 0
        self._start = (0, 0)  # where the next key stream begins (read by _BatchKeys)
        self._loader: DataLoader | None = None
        self._order: tuple[int, Tensor] | None = None  # (epoch, index order) cache

    def stats(self) -> dict[str, int]:
        """Counters for the log line: what the dataset counted when it read its index (e.g. a caption folder's
        empty or non-UTF-8 captions); most map-style datasets have none."""
        counters = getattr(self.dataset, "counters", None)
        return counters.as_dict() if counters is not None else {}

    def _positions(self, epoch: int, batch: int) -> Iterator[tuple[int, int]]:
        """(epoch, batch) of every batch from the given position on, forever."""
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        while True:
            for b in range(batch, self.batches_per_epoch):
                yield epoch, b
            epoch, batch = epoch + 1, 0

    def batch_indices(self, epoch: int, batch: int) -> list[int]:
        """Dataset indices of this rank's batch ``batch`` in ``epoch``."""
        if self._order is None or self._order[0] != epoch:
            order = _permutation(self.seed, epoch, self.n) if self.shuffle else torch.arange(self.n)
            self._order = (epoch, order)
        start = (batch * self.world_size + self.rank) * self.batch_size
        return self._order[1][start : start + self.batch_size].tolist()

    def _keys(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, b in self._positions(*self._start):
            yield [(epoch, i) for i in self.batch_indices(epoch, b)]

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = self.num_workers > 0
            self._loader = DataLoader(
                _EpochKeyed(self.dataset), batch_sampler=_BatchKeys(self._keys), num_workers=self.num_workers,
                collate_fn=collate, pin_memory=self.pin_memory, persistent_workers=workers,
                prefetch_factor=self.prefetch_factor if workers else None,
                multiprocessing_context=self.mp_context if workers else None,
                # its own generator: creating the iterator must not draw from the global RNG, or a resumed run
                # (which creates it at step k instead of step 0) would see different training noise
                generator=torch.Generator().manual_seed(self.seed),
            )  # fmt: skip
        return self._loader

    def __iter__(self) -> Iterator[tuple[Tensor | list[str], ...]]:
        self._start = (self.epoch, self.batch)
        # The DataLoader yields batches in key order, so the positions advance in lockstep with it.
        for (epoch, b), batch in zip(self._positions(*self._start), self._dataloader(), strict=False):
            self.epoch, self.batch = epoch, b + 1
            yield batch
