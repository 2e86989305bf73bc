"""Pre-extracted latents: the shards ``nanogen extract-latents`` writes and ``nanogen train`` reads when
``dataset.latents_dir`` is set, so the stage-2 loop runs no frozen encoder.

The reference encodes every batch on the fly (spec ``reference.md`` §6.1), which costs about +27% training
FLOPs with the SD-VAE. The shards hold exactly what the tokenizer returns for each training image (eval mode,
float32 by default), so stage 2 computes the same loss on the same batch either way (the objectives draw their
noise in logical order, so the latents' memory layout does not matter). Bit for bit when the extraction ran at
the training micro-batch size on the same kind of device (extract-latents' default batch size): CPU
convolutions round differently at other batch sizes (~1e-7).

    <latents_dir>/
        meta.json                  what produced the shards; training checks it against its config
        shard-00000.safetensors    latents (n, C, H, W), labels (n,), index (n,): positions in the dataset,
        shard-00001.safetensors    and with --flip latents_flip (n, C, H, W): latents of the mirrored images
        ...

The extracted set is the whole training set (or, with ``--num``, a fixed random subset, kept in dataset order);
shard ``i`` holds its entries ``[i * shard_size, (i + 1) * shard_size)``. Every shard is written atomically
(temporary file, then rename), so a shard file that exists is complete and a rerun skips it.

What pre-extraction cannot do:

* carry per-step RAE noise augmentation (``stage_1.params.noise_tau``): the shards are encoded in eval mode,
  noise off. Stage-2 configs use ``noise_tau: 0`` anyway; training refuses shards for a config that asks
  for noise;
* draw a fresh VAE posterior sample per step (``sample_mode: sample``): each image keeps one frozen sample.

Flips: with ``latents_flip`` present, training takes the flipped copy of each sample with probability 1/2,
decided by a generator seeded from (``dataset.seed``, epoch) and looked up by dataset position. The choice does
not depend on the batch size or the number of processes, and a resumed run makes the same choices.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nanogen.config import Stage2Config
from nanogen.data.loader import TensorLoader
from nanogen.data.transforms import flip_mask
from nanogen.errors import ConfigError

FORMAT = 1  # bump when the layout changes
META = "meta.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def num_shards(count: int, shard_size: int) -> int:
    return (count + shard_size - 1) // shard_size


def source_fields(cfg: Stage2Config) -> dict[str, Any]:
    """The config fields the latents depend on, by their dotted names (JSON values, as stored in meta.json)."""
    fields = {
        "stage_1.target": cfg.stage_1.target,
        "stage_1.params": cfg.stage_1.params,
        "misc.latent_size": list(cfg.misc.latent_size),
        "training.image_size": cfg.training.image_size,
        "dataset.target": cfg.dataset.target,
        "dataset.type": cfg.dataset.type,
        "dataset.split": cfg.dataset.split,
    }
    return json.loads(json.dumps(fields))


def make_meta(
    cfg: Stage2Config, count: int, shard_size: int, dtype: str, flip: bool
) -> dict[str, Any]:
    from nanogen import __version__

    return {
        "format": FORMAT,
        "nanogen_version": __version__,
        "config": source_fields(cfg),
        "count": count,
        "shard_size": shard_size,
        "num_shards": num_shards(count, shard_size),
        "dtype": dtype,
        "flip": flip,
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory).expanduser() / META
    try:
        meta = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(
            f"dataset.latents_dir: cannot read '{path}' ({e.strerror}); write the shards with "
            f"'nanogen extract-latents -c CONFIG --out {Path(directory)}'"
        ) from None
    except ValueError:
        raise ConfigError(f"dataset.latents_dir: '{path}' is not valid JSON; re-run 'nanogen extract-latents'") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(
            f"dataset.latents_dir: '{path}' is not a nanogen latent-shard index (format {FORMAT}); "
            f"re-run 'nanogen extract-latents'"
        )
    return meta


def _first_difference(have: Any, want: Any, name: str) -> tuple[str, Any, Any] | None:
    """(dotted name, have, want) of the first difference, descending into dicts."""
    if isinstance(have, dict) and isinstance(want, dict):
        for k in sorted(set(have) | set(want)):
            diff = _first_difference(have.get(k), want.get(k), f"{name}.{k}")
            if diff is not None:
                return diff
        return None
    return None if have == want else (name, have, want)


def check_meta(meta: dict[str, Any], cfg: Stage2Config, directory: str | os.PathLike) -> None:
    """One-line ``ConfigError`` unless the shards were extracted for this config's tokenizer and data."""
    for name, want in source_fields(cfg).items():
        diff = _first_difference(meta["config"].get(name), want, name)
        if diff is not None:
            field, have, want = diff
            raise ConfigError(
                f"dataset.latents_dir: the latents in '{directory}' were extracted with {field}={json.dumps(have)} "
                f"but this config has {field}={json.dumps(want)}; re-run 'nanogen extract-latents' with this config "
                f"(and a new --out), or point dataset.latents_dir at matching shards"
            )
    if cfg.stage_1.target == "rae" and float(cfg.stage_1.params.get("noise_tau", 0.0)) > 0:
        raise ConfigError(
            f"dataset.latents_dir: pre-extracted latents carry no RAE noise augmentation, but "
            f"stage_1.params.noise_tau is {cfg.stage_1.params['noise_tau']}; set stage_1.params.noise_tau=0 "
            f"(as the stage-2 configs do) or drop dataset.latents_dir to encode on the fly"
        )


def load_shards(directory: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Tensor]:
    """All shards concatenated in order: {'latents', 'labels', 'index'[, 'latents_flip']} (in memory)."""
    from safetensors.torch import load_file

    root = Path(directory).expanduser()
    n = int(meta["num_shards"])
    missing = [i for i in range(n) if not (root / shard_name(i)).is_file()]
    if missing:
        raise ConfigError(
            f"dataset.latents_dir: '{root}' is incomplete: {len(missing)} of {n} shards missing (first: "
            f"{shard_name(missing[0])}); re-run the same 'nanogen extract-latents' command to finish it"
        )
    parts = [load_file(root / shard_name(i)) for i in range(n)]
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if len(data["index"]) != int(meta["count"]):
        raise ConfigError(
            f"dataset.latents_dir: '{root}' holds {len(data['index'])} latents but meta.json says {meta['count']}; "
            f"delete the directory and re-run 'nanogen extract-latents'"
        )
    return data


class LatentBatches:
    """Training batches ``(z, y, x or None)`` from loaded shards: z float32 latents (the flipped copy where the
    coin says so), y labels, x the matching images in [-1, 1] (flipped alike) when ``images`` is given.

    Resumable exactly like ``TensorLoader`` (the same state dict): the order is the loader's permutation and
    the flips depend only on (seed, epoch, dataset position)."""

    def __init__(
        self, data: dict[str, Tensor], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        images: Tensor | None = None,
    ):  # fmt: skip
        self.has_flip = "latents_flip" in data
        tensors = [data["latents"], data["labels"], data["index"]]
        if self.has_flip:
            tensors.append(data["latents_flip"])
        self.loader = TensorLoader(*tensors, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self.seed = seed
        self.images = images
        self.num_positions = int(data["index"].max()) + 1 if len(data["index"]) else 0
        self._mask: tuple[int, Tensor] | None = None  # (epoch, flip coin per dataset position)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)

    def flip_mask(self, epoch: int) -> Tensor:
        """(num_positions,) bool: True = use the flipped copy in this epoch."""
        if self._mask is None or self._mask[0] != epoch:  # the same flips as pixel training with dataset.flip
            self._mask = (epoch, flip_mask(self.seed, epoch, self.num_positions))
        return self._mask[1]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        for batch in self.loader:
            z, y, index = batch[:3]
            flip = None
            if self.has_flip:
                flip = self.flip_mask(self.loader.epoch)[index].view(-1, 1, 1, 1)  # the epoch of this batch
                z = torch.where(flip, batch[3], z)
            x = None
            if self.images is not None:
                x = self.images[index]
                if flip is not None:
                    x = torch.where(flip, x.flip(-1), x)
            yield z.float(), y, x


def open_for_training(cfg: Stage2Config, batch_size: int, rank: int = 0, world_size: int = 1) -> LatentBatches:
    """``LatentBatches`` over ``cfg.dataset.latents_dir`` (checked against the config), with the images too when
    the objective reads pixels (REPA / REG / perceptual losses)."""
    from nanogen.build import load_train_images, needs_images
    from nanogen.latents.base import check_images, to_unit

    directory = cfg.dataset.latents_dir
    assert directory is not None
    meta = read_meta(directory)
    check_meta(meta, cfg, directory)
    data = load_shards(directory, meta)
    images = None
    if needs_images(cfg):
        images, _ = load_train_images(cfg)
        check_images(to_unit(images), f"dataset '{cfg.dataset.target}'")
    return LatentBatches(data, batch_size, cfg.dataset.seed, rank, world_size, images)
