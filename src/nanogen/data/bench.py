"""``nanogen benchmark-data``: how fast the data path feeds a GPU (issue: keep 8 GPUs fed).

Measures, on this machine:
  * images/s of decode + ADM center crop (+ flip) from raw ImageNet-style JPEG folders, through ``MapLoader``
    with 0 (in the main process), 1, 2, ... workers, and per worker;
  * images/s of the BLIP3o WebDataset stream (tar read + shuffle buffer + decode + resize/crop);
  * caption batches/s of the text encoder, uncached and from the caption-hash cache.

The images are synthetic photographs (smooth random fields plus grain, JPEG quality 90, ImageNet's typical
~500x375 sizes, landscape and portrait), written once to a temp directory, so the numbers measure decoding
and cropping, not a particular disk. ``--config`` measures a config's own training loader instead.
"""

from __future__ import annotations

import io
import math
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SIZES = [(500, 375), (500, 333), (375, 500), (640, 480), (500, 400), (333, 500)]  # typical ImageNet photos
CAPTION_WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "red",
    "blue",
    "small",
    "large",
    "old",
    "new",
    "dog",
    "cat",
    "car",
    "house",
    "tree",
    "river",
    "city",
    "street",
    "at",
    "night",
    "in",
    "snow",
]


def synthetic_photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A photo-like image: a smooth low-frequency colour field (upsampled) plus fine grain; JPEG-compresses
    and decodes like a real photo, unlike white noise."""
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def random_caption(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(CAPTION_WORDS, size=words))


def write_folder_tree(root: Path, n: int, seed: int = 0, classes: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / "train" / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        synthetic_photo(rng, SIZES[i % len(SIZES)]).save(d / f"img_{i:06d}.JPEG", quality=90)
    return root


def write_shards(root: Path, n: int, image_size: int, per_shard: int = 64, seed: int = 1) -> Path:
    """BLIP3o-256-style shards: pre-resized square JPEGs with their captions."""
    rng = np.random.default_rng(seed)
    split = root / "bench"
    split.mkdir(parents=True, exist_ok=True)
    for s in range(math.ceil(n / per_shard)):
        with tarfile.open(split / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                buf = io.BytesIO()
                synthetic_photo(rng, (image_size, image_size)).save(buf, format="JPEG", quality=90)
                for suffix, data in ((".jpg", buf.getvalue()), (".txt", random_caption(rng, 12).encode())):
                    info = tarfile.TarInfo(f"{i:08d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def _rate(loader: Any, batches: int, batch_size: int) -> float:
    """Images/s over ``batches`` batches after one warm-up batch (worker start-up is not counted)."""
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t)


def run_data_benchmark(
    image_size: int = 256, images: int = 384, batch_size: int = 32, workers: tuple[int, ...] = (0, 1, 2),
    flip: bool = True, text_encoder: str = "minilm", max_length: int = 77, caption_batches: int = 8,
) -> dict[str, Any]:  # fmt: skip
    from nanogen.data.imagenet import ImageFolderImageNet
    from nanogen.data.loader import MapLoader
    from nanogen.data.webdataset import StreamLoader

    out: dict[str, Any] = {
        "image_size": image_size,
        "batch_size": batch_size,
        "flip": flip,
        "decode_crop": {},
        "stream": {},
    }
    with tempfile.TemporaryDirectory(prefix="nanogen-bench-data-") as tmp:
        root = write_folder_tree(Path(tmp) / "folders", images)
        ds = ImageFolderImageNet(root, "train", image_size, "label", flip)
        batches = images // batch_size - 1
        for w in workers:
            loader = MapLoader(ds, batch_size, seed=0, num_workers=w, pin_memory=False)
            ips = _rate(loader, batches, batch_size)
            out["decode_crop"][str(w)] = {"images_per_s": ips, "per_worker": ips / max(w, 1)}
        shards = write_shards(Path(tmp) / "shards", images, image_size)
        for w in workers:
            stream = StreamLoader(shards, ["bench"], image_size, batch_size, seed=0, rank=0, world_size=1,
                                  num_workers=w, shuffle_buffer=256, flip=flip)  # fmt: skip
            ips = _rate(stream, batches, batch_size)
            out["stream"][str(w)] = {"images_per_s": ips, "per_worker": ips / max(w, 1)}
    if text_encoder:
        out["captions"] = caption_rates(text_encoder, max_length, batch_size, caption_batches)
    return out


def caption_rates(name: str, max_length: int, batch_size: int, batches: int) -> dict[str, float]:
    """Caption batches/s through the text encoder (distinct captions, so every one is encoded) and through the
    caption-hash cache (the same captions again, as in a second epoch)."""
    from nanogen.encoders.text import EmbeddingCache, TextConditioner, TextEncoder

    rng = np.random.default_rng(2)
    caps = [
        [random_caption(rng, int(rng.integers(6, 30))) for _ in range(batch_size)] for _ in range(batches)
    ]
    enc = TextEncoder(name, max_length)
    cond = TextConditioner(enc, EmbeddingCache(enc.identity(), None))
    cond(caps[0])  # warm-up: first-call allocations
    t = time.perf_counter()
    for c in caps[1:]:
        cond(c)
    uncached = (batches - 1) / (time.perf_counter() - t)
    t = time.perf_counter()
    for c in caps[1:]:
        cond(c)
    cached = (batches - 1) / (time.perf_counter() - t)
    return {"text_encoder": name, "max_length": max_length, "uncached_batches_per_s": uncached,
            "cached_batches_per_s": cached}  # fmt: skip


def run_config_benchmark(cfg: Any, batches: int) -> dict[str, Any]:
    """Images/s of a config's own training loader (its data, transform, workers) in this process."""
    from nanogen.data import build_train_loader
    from nanogen.train import micro_batch

    micro = micro_batch(cfg, 1)
    loader = build_train_loader(cfg, micro, 0, 1)
    ips = _rate(loader, batches, micro)
    workers = cfg.training.num_workers if cfg.dataset.num_workers is None else cfg.dataset.num_workers
    return {"dataset": f"{cfg.dataset.target} ({cfg.dataset.type})", "batch_size": micro, "workers": workers,
            "images_per_s": ips, "per_worker": ips / max(workers, 1)}  # fmt: skip


def render(res: dict[str, Any]) -> str:
    if "dataset" in res:
        return (f"{res['dataset']}: {res['images_per_s']:.0f} images/s with {res['workers']} workers "
                f"({res['per_worker']:.0f} per worker), batch {res['batch_size']}")  # fmt: skip
    lines = [f"data throughput, {res['image_size']}px, batch {res['batch_size']}, flip {res['flip']}"]
    for key, title in (
        ("decode_crop", "JPEG folders: decode + ADM crop"),
        ("stream", "WebDataset stream: read + decode + crop"),
    ):
        lines.append(f"  {title}")
        for w, r in res[key].items():
            label = "main process" if w == "0" else f"{w} worker(s)"
            lines.append(
                f"    {label:14s} {r['images_per_s']:8.1f} images/s  ({r['per_worker']:.1f} per worker)"
            )
    if "captions" in res:
        c = res["captions"]
        lines.append(f"  captions ({c['text_encoder']}, {c['max_length']} tokens, batch {res['batch_size']})")
        lines.append(f"    encoder        {c['uncached_batches_per_s']:8.2f} batches/s")
        lines.append(f"    cache hits     {c['cached_batches_per_s']:8.2f} batches/s")
    return "\n".join(lines)
