"""The distributed generation harness (spec ``reference.md`` §8.1, ``evaluation.md`` §7.3; issue 7).

N samples are cut into shards of consecutive global indices [k S, (k + 1) S). Process r generates the shards
k with k mod world = r, in batches. Three things make the result trustworthy and cheap to redo:

* **Per-sample seeds.** Sample i starts from noise seeded by (seed, i) and gets the condition of index i
  (class ``i mod K`` for class-balanced ImageNet: 50 per class for 50,000; prompt ``i // images_per_prompt``
  for prompt sets), so image i is the same for any number of GPUs or batch size. The reference draws its eval
  noise from one global RNG per rank, so its images depend on both.
* **uint8 shards on disk** (optional): ``shard-<first index>.npz`` with ``arr_0`` (n, H, W, 3) uint8 (the ADM /
  DiffusionBench sample format, readable by ``nanogen fid``) and ``index``; written atomically, with a
  ``plan.json`` recording what they are samples of. After a crash, finished shards are read back instead of
  regenerated; a plan mismatch (another checkpoint, sampler or count) is an error, never a silent mix.
* **Overlap.** A worker thread runs the consumers (feature extractors, metric updates, shard writes) on batch
  b while the main thread generates batch b + 1; on CUDA the worker uses its own stream.

Consumers see uint8 NCHW batches with their global indices and must be order-independent (every metric
here accumulates sums, or keeps features keyed by index).
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nanogen import parallel
from nanogen.errors import UserError
from nanogen.log import progress

Consumer = Callable[[Tensor, list[int]], None]  # (uint8 images (B, 3, H, W), global indices)


@dataclass(frozen=True)
class Plan:
    num_samples: int
    batch_size: int  # per process and step
    shard_size: int  # samples per shard (a multiple of batch_size)
    identity: dict  # what the samples are of (checkpoint fingerprint, sampler, seed, ...): must match on resume

    def shards(self) -> list[range]:
        return [range(lo, min(lo + self.shard_size, self.num_samples)) for lo in range(0, self.num_samples, self.shard_size)]


def default_shard_size(num_samples: int, batch_size: int) -> int:
    """About 1,000 samples (at least 32 shards for smaller sets), rounded up to whole batches. It does not
    depend on the number of processes, so a crashed evaluation can resume on another GPU count."""
    per = min(1000, math.ceil(num_samples / 32))
    return max(batch_size, math.ceil(per / batch_size) * batch_size)


def _shard_path(shard_dir: Path, shard: range) -> Path:
    return shard_dir / f"shard-{shard.start:07d}.npz"


def _read_shard(path: Path, shard: range) -> np.ndarray | None:
    """The images of a finished shard, or None when it is missing or damaged (then it is regenerated)."""
    try:
        with np.load(path) as f:
            images, index = f["arr_0"], f["index"]
    except Exception:
        return None
    if images.dtype != np.uint8 or not np.array_equal(index, np.arange(shard.start, shard.stop)):
        return None
    return images


def _write_shard(path: Path, images_nhwc: np.ndarray, shard: range) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, arr_0=images_nhwc, index=np.arange(shard.start, shard.stop))
    tmp.replace(path)


def prepare_shard_dir(shard_dir: Path, plan: Plan, info: parallel.DistInfo) -> None:
    """Create ``shard_dir`` with its plan.json, or check that an existing one holds samples of this plan."""
    plan_file = shard_dir / "plan.json"
    mine = {"num_samples": plan.num_samples, "shard_size": plan.shard_size, **plan.identity}
    if info.is_main:
        shard_dir.mkdir(parents=True, exist_ok=True)
        if plan_file.is_file():
            theirs = json.loads(plan_file.read_text())
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise UserError(
                    f"{shard_dir} holds samples of another run (different {', '.join(diff)}); "
                    f"delete it or choose another samples directory"
                )
        else:
            plan_file.write_text(json.dumps(mine, indent=1, sort_keys=True, default=str))
    parallel.barrier()


class _Worker:
    """Runs consumers on a background thread, one batch behind the generator."""

    def __init__(self, consumers: Sequence[Consumer], device: torch.device, overlap: bool = True):
        self.consumers = consumers
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and overlap else None
        self.thread = threading.Thread(target=self._run, daemon=True) if overlap else None
        if self.thread is not None:
            self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            images, idx, ready = item
            try:
                ctx = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
                with ctx, torch.inference_mode():
                    if ready is not None:
                        self.stream.wait_event(ready)  # type: ignore[union-attr]
                    for consume in self.consumers:
                        consume(images, idx)
            except BaseException as e:  # surfaced in the main thread by put()/close()
                self.error = e

    def put(self, images: Tensor, idx: list[int]) -> None:
        if self.error is not None:
            raise self.error
        if self.thread is None:  # overlap off (benchmarks): consume inline
            with torch.inference_mode():
                for consume in self.consumers:
                    consume(images, idx)
            return
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        self.q.put((images, idx, ready))

    def close(self) -> None:
        if self.thread is None:
            return
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def run(
    plan: Plan,
    generate: Callable[[list[int]], Tensor],
    consumers: Sequence[Consumer],
    info: parallel.DistInfo,
    *,
    shard_dir: Path | None = None,
    desc: str = "sampling",
    overlap: bool = True,
) -> int:
    """Generate (or read back) every sample of this process's shards and feed them to ``consumers``.

    ``generate(indices)`` returns uint8 images (B, 3, H, W) for the given global indices. ``overlap=False`` runs
    the consumers inline (to measure what the overlap saves). Returns the number of samples this process
    regenerated (the rest came from finished shards)."""
    shards = plan.shards()[info.rank :: info.world_size]
    if shard_dir is not None:
        prepare_shard_dir(shard_dir, plan, info)
    worker = _Worker(consumers, info.device, overlap)
    made = 0
    try:
        with progress(sum(len(s) for s in shards), desc, unit="img", leave=False) as bar:
            for shard in shards:
                done = _read_shard(_shard_path(shard_dir, shard), shard) if shard_dir is not None else None
                if done is not None:  # finished before a crash: its samples are not redrawn
                    for lo in range(0, len(shard), plan.batch_size):
                        part = torch.from_numpy(done[lo : lo + plan.batch_size]).permute(0, 3, 1, 2).to(info.device)
                        worker.put(part, list(shard[lo : lo + plan.batch_size]))
                        bar.update(len(part))
                    continue
                kept: list[Tensor] = []
                for lo in range(0, len(shard), plan.batch_size):
                    idx = list(shard[lo : lo + plan.batch_size])
                    images = generate(idx)
                    if images.dtype != torch.uint8 or images.shape[0] != len(idx):
                        raise ValueError(f"generate() must return {len(idx)} uint8 images, got {images.dtype} {tuple(images.shape)}")
                    worker.put(images, idx)
                    if shard_dir is not None:
                        kept.append(images.permute(0, 2, 3, 1).cpu())
                    made += len(idx)
                    bar.update(len(idx))
                if shard_dir is not None:
                    _write_shard(_shard_path(shard_dir, shard), torch.cat(kept).numpy(), shard)
    finally:
        worker.close()
    parallel.barrier()
    return made
