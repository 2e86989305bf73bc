"""BLIP3o-style WebDataset tar shards, streamed for text-to-image training (spec ``reference.md`` §7.2).
The tars are read with the standard library's ``tarfile``; there is no webdataset dependency.

    <data_dir>/<split>/*.tar    members grouped by key: 000123.jpg + 000123.txt -> one (image, caption) sample

Every rank runs ``W`` data workers, so there are ``world_size * W`` slots. Per epoch, each slot reads:

1. passes over the shards. Pass p shuffles the shard list with (seed, epoch, p), identically on every rank,
   and deals it round-robin to the slots. With fewer shards than slots (tiny sets), every slot reads every
   shard and keeps every (world_size * W)-th sample instead, so each sample still has exactly one slot;
2. a shuffle buffer of raw bytes seeded by (seed, epoch, p, rank, worker), drained at the end of the pass,
   so each pass yields every readable sample of the slot exactly once;
3. batches of ``batch_size`` consecutive samples, decoded only now (PIL), Resize(bicubic) + CenterCrop.

An epoch is exactly ``steps`` batches per rank (``virtual_epoch_steps``, else the estimated set size over
the global batch); a slot whose shards run out starts its next pass. The DataLoader takes batches from its
workers round-robin, so batch j of an epoch comes from worker j % W. That makes the position (epoch, batch)
the whole loader state: a resumed run rebuilds the epoch and each worker drops the raw samples of the
batches it had already made, without decoding them.

Corrupt data is counted, never fatal: a sample without an image or cut off by a truncated tar, an
unreadable shard, an image PIL cannot decode. The membership of a batch is fixed before decoding: an image
that fails to decode is replaced by another image of the same batch, so batches keep their size and
resuming needs no decoding. (Only a batch in which no image decodes reads further into the stream; a resume
past such a batch is then not exact.)

Departures from the reference (webdataset ``shardshuffle=1000``, buffer 10000 with 5000 initial): the shuffle
buffer is filled before it yields and is drained per pass, and the position is resumable exactly.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nanogen.data.captions import CaptionCounters, clean_caption, to_uint8_tensor
from nanogen.data.loader import Position
from nanogen.errors import UserError

# §7.2: estimated samples per split, used only for the epoch length. ("60k" is the 60k-sample SFT set.)
EST_SAMPLES = {
    "journeydb": 4_280_000,  # 419 shards
    "short-caption": 4_770_000,  # 1831 shards
    "long-caption": 27_200_000,  # 2891 shards
    "60k": 57_553,
    "60k-128shards": 57_553,
}
SAMPLES_PER_UNKNOWN_SHARD = 3_500
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
TAR_BLOCK = 512
MAX_UNDECODABLE = 1000  # in a row: beyond that the shards are not images at all

T = TypeVar("T")


def hash_bit(*parts: object) -> bool:
    """A fair coin that is a pure function of ``parts``: flips that do not depend on order or workers."""
    return bool(hashlib.blake2b(repr(parts).encode(), digest_size=1).digest()[0] & 1)


def find_shards(data_dir: str | Path, splits: str | list[str]) -> dict[str, list[Path]]:
    """split -> its sorted ``*.tar`` files; a missing split is a one-line error naming the fix."""
    out = {}
    for split in [splits] if isinstance(splits, str) else splits:
        folder = Path(data_dir) / split
        if not folder.is_dir():
            raise UserError(
                f"dataset split '{split}' not found: no folder {folder}; run `nanogen prepare --data t2i` "
                f"or fix dataset.data_dir / dataset.split"
            )
        tars = sorted(folder.glob("*.tar"))
        if not tars:
            raise UserError(f"dataset split '{split}': no *.tar shards in {folder}; run `nanogen prepare --data t2i`")
        out[split] = tars
    return out


def estimated_size(shards: dict[str, list[Path]]) -> int:
    return sum(EST_SAMPLES.get(split, SAMPLES_PER_UNKNOWN_SHARD * len(tars)) for split, tars in shards.items())


def stable_seed(*parts: object) -> int:
    """A 64-bit seed that is a pure function of ``parts`` (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class RawSample:
    shard: str  # <split>/<file name>: identifies the sample together with the key
    key: str
    image: bytes  # still encoded: the shuffle buffer holds bytes, decoding happens per batch
    caption: bytes | None
    pass_idx: int


class BrokenShard(Exception):
    """A shard stopped being readable; ``lost`` says whether a started sample went with it."""

    def __init__(self, lost: bool):
        super().__init__(lost)
        self.lost = lost


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename, the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_groups(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample in tar order (a sample's members are adjacent).

    Raises ``BrokenShard`` after the last complete sample when the file is not a tar, a member's data is cut
    short, or the archive ends inside a header: tarfile reads the latter as a clean end, so the file size is
    checked against the end-of-archive block that must follow the last member."""
    key: str | None = None  # the sample being read: set from its first member's header on
    files: dict[str, bytes] = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key and files:
                    yield key, files
                    files = {}
                key = k
                files[ext] = tf.extractfile(member).read()
            truncated = path.stat().st_size < tf.offset + TAR_BLOCK
    except (tarfile.TarError, OSError, EOFError):
        raise BrokenShard(key is not None) from None
    if truncated:
        raise BrokenShard(key is not None)
    if files:
        yield key, files


def to_raw(shard: Path, key: str, files: dict[str, bytes], pass_idx: int) -> RawSample | None:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    return None if image is None else RawSample(f"{shard.parent.name}/{shard.name}", key, image, files.get("txt"), pass_idx)


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """A shuffle buffer: fill ``size`` items, then emit a random one per new item; drain in random order."""
    buf: list[T] = []
    for item in items:
        if len(buf) < max(size, 1):
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class Blip3oStream(IterableDataset):
    """One epoch of one rank: yields (uint8 images (B, 3, S, S), captions, counter deltas) per batch.

    Set ``epoch`` and ``start`` (batches of the epoch already consumed) before iterating; in a DataLoader each
    worker iterates its own copy."""

    def __init__(self, shards: list[Path], image_size: int, batch_size: int, seed: int, rank: int, world_size: int,
                 shuffle_buffer: int, steps: int, flip: bool):
        super().__init__()
        self.shards = shards
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.steps = steps
        self.flip = flip
        self.epoch = 0
        self.start = 0

    def pass_samples(self, pass_idx: int, worker: int, workers: int, counters: CaptionCounters) -> Iterator[RawSample]:
        """One pass of a slot over its share of the shards, in tar order (before the shuffle buffer)."""
        slot, slots = self.rank * workers + worker, self.world_size * workers
        order = list(self.shards)
        random.Random(stable_seed("shards", self.seed, self.epoch, pass_idx)).shuffle(order)
        by_sample = len(order) < slots  # too few shards to deal out: deal samples instead
        index = 0  # samples seen in this pass; with by_sample, sample i belongs to slot i % slots
        for n, path in enumerate(order if by_sample else order[slot::slots]):
            try:
                for key, files in read_groups(path):
                    index += 1
                    if by_sample and (index - 1) % slots != slot:
                        continue
                    sample = to_raw(path, key, files, pass_idx)
                    if sample is None:
                        counters.corrupt_skipped += 1
                    else:
                        yield sample
            except BrokenShard as e:
                # every slot reads every shard in by_sample mode; count each event in one slot only
                counters.shards_failed += int(not by_sample or n % slots == slot)
                counters.corrupt_skipped += int(e.lost and (not by_sample or index % slots == slot))
                index += int(e.lost)

    def samples(self, worker: int, workers: int, counters: CaptionCounters) -> Iterator[RawSample]:
        """The slot's endless stream: pass after pass, each through its own shuffle buffer."""
        for p in itertools.count():
            rng = random.Random(stable_seed("buffer", self.seed, self.epoch, p, self.rank, worker))
            n = 0
            for sample in shuffled(self.pass_samples(p, worker, workers, counters), self.shuffle_buffer, rng):
                n += 1
                yield sample
            if n == 0:
                raise UserError(
                    f"rank {self.rank} data worker {worker}: no readable sample in its share of {len(self.shards)} "
                    f"shards ({counters.as_dict()}); check the shards or use fewer data workers"
                )

    def decode(self, s: RawSample, counters: CaptionCounters) -> tuple[Tensor, str] | None:
        flip = self.flip and hash_bit("flip", self.seed, self.epoch, s.pass_idx, s.shard, s.key)
        try:
            with Image.open(io.BytesIO(s.image)) as img:
                image = to_uint8_tensor(img, self.image_size, flip)
        except DECODE_ERRORS:
            counters.corrupt_skipped += 1
            return None
        caption, flag = clean_caption(s.caption)
        counters.count(flag)
        return image, caption

    def decode_batch(self, raw: list[RawSample], more: Iterator[RawSample], counters: CaptionCounters) -> tuple[Tensor, list[str]]:
        decoded = [self.decode(s, counters) for s in raw]
        good = [d for d in decoded if d is not None]
        tries = 0
        while not good:  # no image of the batch decodes: the only case that reads past the batch
            if tries == MAX_UNDECODABLE:
                raise UserError(f"rank {self.rank}: {MAX_UNDECODABLE} images in a row failed to decode; check the shards")
            tries += 1
            d = self.decode(next(more), counters)
            good = [d] if d is not None else []
        batch = [d if d is not None else good[i % len(good)] for i, d in enumerate(decoded)]
        return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

    def __iter__(self) -> Iterator[tuple[Tensor, list[str], dict[str, int]]]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader restarts its round robin at worker 0 on resume: physical worker i makes epoch batches
        # start + i, start + i + W, ..., which belong to logical worker (start + i) % W
        worker = (physical + self.start) % workers
        done = len(range(worker, self.start, workers))
        todo = len(range(worker, self.steps, workers)) - done
        counters = CaptionCounters()
        samples = self.samples(worker, workers, counters)
        deque(itertools.islice(samples, done * self.batch_size), maxlen=0)  # skip, no decoding
        counters.take()  # the run that consumed those batches reported their events
        for _ in range(todo):
            raw = list(itertools.islice(samples, self.batch_size))
            images, captions = self.decode_batch(raw, samples, counters)
            yield images, captions, counters.take()


class StreamLoader(Position):
    """The T2I training loader: ``len`` = batches per epoch per rank; ``iter`` is endless over epochs and
    yields (uint8 images (B, 3, S, S), captions); the state is (epoch, batch); ``stats()`` are the cumulative
    corrupt / caption / shard counts of this process."""

    def __init__(self, data_dir: str | Path, splits: str | list[str], image_size: int, batch_size: int, seed: int,
                 rank: int, world_size: int, num_workers: int, shuffle_buffer: int = 10000,
                 virtual_epoch_steps: int | None = None, flip: bool = False):
        by_split = find_shards(data_dir, splits)
        self.dataset_size = estimated_size(by_split)
        self.batches_per_epoch = virtual_epoch_steps or max(1, self.dataset_size // (batch_size * world_size))
        self.num_workers = num_workers
        self.dataset = Blip3oStream(
            [p for tars in by_split.values() for p in tars], image_size, batch_size, seed, rank, world_size,
            shuffle_buffer, self.batches_per_epoch, flip,
        )
        self.epoch = 0
        self.batch = 0
        self.counters = CaptionCounters()

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch; the next ``iter`` builds its pipeline."""
        self.epoch, self.batch = epoch, 0

    def stats(self) -> dict[str, int]:
        return self.counters.as_dict()

    def _epoch_batches(self) -> Iterator[tuple[Tensor, list[str], dict[str, int]]]:
        self.dataset.epoch, self.dataset.start = self.epoch, self.batch
        if self.num_workers == 0:
            return iter(self.dataset)
        # workers are rebuilt every epoch (not persistent): each needs the new epoch and start position
        # own generator: a new iterator must not draw from the global RNG (a resumed run would diverge)
        return iter(DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                               pin_memory=torch.cuda.is_available(), persistent_workers=False,
                               generator=torch.Generator().manual_seed(self.epoch)))

    def __iter__(self) -> Iterator[tuple[Tensor, list[str]]]:
        while True:
            for images, captions, counts in self._epoch_batches():
                self.counters.merge(counts)
                self.batch += 1
                yield images, captions
            self.epoch, self.batch = self.epoch + 1, 0
