"""Offline passes of a config's tokenizer over its training images (the ``compute-stats`` and
``extract-latents`` subcommands).

    compute_stats    per-element mean / population variance of the raw RAE latents (spec ``reference.md`` §6.4)
                     -> torch.save({'mean': (C,H,W), 'var': (C,H,W)}), the file stage_1.params.normalization_stat_path reads
    extract_latents  the stage-2 training latents as shards (format: ``nanogen.data.latent_shards``)

Both run plain or under torchrun: each process takes its own share of the images (statistics: a strided
slice, merged with Chan's formula over all ranks; shards: every world_size-th shard), and rank 0 writes the
shared files. Every output file is written to a temporary name and renamed, so an interrupted run never
leaves a truncated file behind.
"""

from __future__ import annotations

import copy
import os
import shlex
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nanogen import parallel
from nanogen.config import Stage1Config, Stage2Config
from nanogen.config.loader import find_config, read_yaml
from nanogen.errors import CheckpointError, ConfigError, UserError
from nanogen.latents.base import check_images, to_unit
from nanogen.latents.stats import LatentStats
from nanogen.log import print0, progress

# ----------------------------------------------------------------------------------------------------------
# configs and tokenizers


def is_stage1_config(path: str | os.PathLike, overrides: list[str] | None = None) -> bool:
    """A stage-1 config has a ``gan`` block, in the file itself, one of its ``defaults`` or an override."""
    if any(o.split("=", 1)[0].split(".")[0].strip() == "gan" for o in overrides or []):
        return True
    seen: set[Path] = set()

    def has_gan(p: Path) -> bool:
        p = p.resolve()
        if p in seen:  # a cycle; the real loader reports it
            return False
        seen.add(p)
        raw = read_yaml(p)
        defaults = raw.get("defaults") or []
        defaults = [defaults] if isinstance(defaults, str) else defaults
        return "gan" in raw or any(
            isinstance(d, str) and (p.parent / d).is_file() and has_gan(p.parent / d) for d in defaults
        )

    return has_gan(find_config(path))


def load_any_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Stage1Config | Stage2Config:
    """A stage-1 config (``load_stage1_config``) or a stage-2 config (``load_config``), whichever ``path`` is."""
    from nanogen.config import load_config, load_stage1_config

    if is_stage1_config(path, overrides):
        return load_stage1_config(path, overrides)
    return load_config(path, overrides)


def build_any_tokenizer(cfg: Stage1Config | Stage2Config, *, ignore_stats: bool = False) -> nn.Module:
    """The config's frozen tokenizer, in eval mode. ``ignore_stats``: do not read the RAE's
    ``normalization_stat_path`` (computing the statistics must not need them)."""
    from nanogen import registry
    from nanogen.build import build_tokenizer
    from nanogen.config.loader import build

    if ignore_stats and cfg.stage_1.target == "rae":
        cfg = copy.deepcopy(cfg)
        cfg.stage_1.params["normalization_stat_path"] = None
    if isinstance(cfg, Stage2Config):
        return build_tokenizer(cfg).eval()
    name, entry = registry.lookup(registry.TOKENIZERS, cfg.stage_1.target, "stage_1.target")
    if name == "pixel":
        return entry.load()(None, image_size=cfg.training.image_size).eval()
    params = build(entry.config_cls(), cfg.stage_1.params, source="config", prefix="stage_1.params")
    weights = getattr(getattr(cfg, "misc", None), "weights", None)  # stage-1 trees may carry misc.weights
    return entry.load()(params, weights).eval()


def raw_latents(tokenizer: nn.Module, images01: Tensor) -> Tensor:
    """RAE: the encoder's latents without noise or normalisation (§6.4). Other tokenizers: their own latents
    (a VAE's are already shifted and scaled; pixels are pixels)."""
    from nanogen.latents.rae import RAE

    with torch.no_grad():
        if isinstance(tokenizer, RAE):
            return tokenizer.encode_raw(images01, check=False)
        return tokenizer.encode(images01, check=False)


def subset(n: int, num: int | None, seed: int) -> Tensor:
    """Dataset positions to process: all ``n``, or a fixed random subset of ``num`` (seeded), in dataset order."""
    if num is None or num >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:num].sort().values


def _check_positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be at least 1, got {v}")


def _load_images(cfg: Stage1Config | Stage2Config) -> tuple[Tensor, Tensor]:
    from nanogen.build import load_train_images

    images, labels = load_train_images(cfg)  # type: ignore[arg-type]  # reads only dataset + training.image_size
    check_images(to_unit(images), f"dataset '{cfg.dataset.target}'")
    return images, labels


# ----------------------------------------------------------------------------------------------------------
# compute-stats (§6.4)


def accumulate_stats(
    tokenizer: nn.Module, images: Tensor, batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1
) -> LatentStats:
    """Float64 statistics of ``raw_latents`` over ``images`` ([-1, 1]): this rank takes ``images[rank::world_size]``;
    the result is merged over all ranks (identical on every rank)."""
    stats = LatentStats(tuple(tokenizer.latent_shape))
    mine = images[rank::world_size]
    bar = progress(len(mine), "latent stats", unit="img")
    for i in range(0, len(mine), batch_size):
        x = mine[i : i + batch_size].to(device)
        stats.update(raw_latents(tokenizer, to_unit(x)))
        bar.update(len(x))
    bar.close()
    return stats.all_reduce_()


def default_stats_path(cfg: Stage1Config | Stage2Config) -> Path:
    """``<run.results_dir>/stats/<encoder>-<resolution>px-<dataset>.pt``: statistics belong to an encoder, a
    resolution and a dataset, not to a run."""
    p = cfg.stage_1.params or {}
    name = p.get("encoder_name") or p.get("vae_type") or cfg.stage_1.target
    res = p.get("resolution") or cfg.training.image_size
    return Path(cfg.run.results_dir).expanduser() / "stats" / f"{name}-{res}px-{cfg.dataset.target}.pt"


def read_stats(path: str | os.PathLike) -> dict[str, Tensor]:
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"--compare: stats file not found: '{path}'") from None
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"--compare: cannot read stats file '{path}': {str(e).splitlines()[0][:160]}") from None
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), Tensor) for k in ("mean", "var")):
        raise CheckpointError(f"--compare: '{path}' is not a stats file (a dict with 'mean' and 'var' tensors)")
    return stats


def check_compatible(ref: dict[str, Tensor], shape: tuple[int, ...], ref_path: str | os.PathLike) -> None:
    for k in ("mean", "var"):
        if tuple(ref[k].shape) != tuple(shape):
            raise CheckpointError(
                f"--compare: '{ref_path}' has {k} of shape {tuple(ref[k].shape)} but this tokenizer's latents have "
                f"shape {tuple(shape)} (C, H, W); compare with stats computed for the same encoder and resolution"
            )


def compare_stats(new: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, tuple[float, float]]:
    """{'mean' | 'var': (max |new - ref|, that divided by max |ref|)}: the relative number is scaled by the
    reference's largest magnitude, so near-zero entries do not blow it up."""
    out = {}
    for k in ("mean", "var"):
        a, b = new[k].double(), ref[k].double()
        diff = (a - b).abs().max().item()
        out[k] = (diff, diff / max(b.abs().max().item(), 1e-30))
    return out


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_compute_stats(
    config: str, overrides: list[str], out: str | None = None, compare: str | None = None, num: int | None = None,
    batch_size: int = 64,
) -> Path:  # fmt: skip
    """The ``compute-stats`` subcommand: returns the path written."""
    _check_positive(num=num, batch_size=batch_size)
    cfg = load_any_config(config, overrides)
    ref = read_stats(compare) if compare else None  # a missing or unreadable file fails before any work
    info = parallel.init(cfg.run.device)
    tokenizer = build_any_tokenizer(cfg, ignore_stats=True).to(info.device)
    shape = tuple(tokenizer.latent_shape)
    if ref is not None:
        check_compatible(ref, shape, compare)  # type: ignore[arg-type]
    path = Path(out).expanduser() if out else default_stats_path(cfg)
    if info.is_main:  # fail now, not after the pass over the data
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"compute-stats --out: cannot create '{path.parent}' ({e.strerror}); choose another path") from None
    images, _ = _load_images(cfg)
    images = images[subset(len(images), num, cfg.dataset.seed)]
    print0(f"latent statistics of {cfg.stage_1.target} {list(shape)} over {len(images)} images of '{cfg.dataset.target}'")
    stats = accumulate_stats(tokenizer, images, batch_size, info.device, info.rank, info.world_size)
    result = {k: v.float().contiguous() for k, v in stats.finalize().items()}
    if info.is_main:
        try:
            save_atomic(result, path)
        except OSError as e:
            raise UserError(f"compute-stats --out: cannot write '{path}' ({e.strerror}); choose another path") from None
        print(f"wrote {path} (mean, var of shape {tuple(shape)} over {stats.count} images)")
        if cfg.stage_1.target == "rae":
            print(f"use it with: stage_1.params.normalization_stat_path={path}")
        if ref is not None:
            print(f"compared with {compare}:")
            for k, (diff, rel) in compare_stats(result, ref).items():
                print(f"  {k + ':':5s} max |diff| {diff:.3e}   relative to max |ref| {rel:.3e}")
    parallel.barrier()
    return path


# ----------------------------------------------------------------------------------------------------------
# extract-latents


def encode_shard(tokenizer: nn.Module, images: Tensor, batch_size: int, device: torch.device, flip: bool) -> dict[str, Tensor]:
    """{'latents'[, 'latents_flip']} (float32, CPU) of ``images`` ([-1, 1]), encoded ``batch_size`` at a time."""
    out: dict[str, list[Tensor]] = {"latents": [], **({"latents_flip": []} if flip else {})}
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = to_unit(images[i : i + batch_size].to(device))
            out["latents"].append(tokenizer.encode(x, check=False).float().cpu())
            if flip:
                out["latents_flip"].append(tokenizer.encode(x.flip(-1), check=False).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def default_latents_dir(cfg: Stage2Config) -> Path:
    """``<run.results_dir>/latents/<run.name>``."""
    return Path(cfg.run.results_dir).expanduser() / "latents" / str(cfg.run.name)


def run_extract_latents(
    config: str, overrides: list[str], out: str | None = None, flip: bool = False, shard_size: int = 4096,
    batch_size: int | None = None, dtype: str = "float32", num: int | None = None,
) -> Path:  # fmt: skip
    """The ``extract-latents`` subcommand: returns the shard directory. ``batch_size`` None: the config's
    training micro-batch, so the shards are bit-identical to what the training loop would encode."""
    from safetensors.torch import save_file

    from nanogen.data import latent_shards as fmt

    _check_positive(shard_size=shard_size, batch_size=batch_size, num=num)
    if dtype not in fmt.DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(fmt.DTYPES)}, got '{dtype}'")
    if is_stage1_config(config, overrides):
        raise ConfigError(f"extract-latents: '{config}' is a stage-1 config (it has a gan block); pass a stage-2 config")
    cfg = load_any_config(config, overrides)
    assert isinstance(cfg, Stage2Config)
    root = Path(out).expanduser() if out else default_latents_dir(cfg)
    images, labels = _load_images(cfg)
    index = subset(len(images), num, cfg.dataset.seed)
    info = parallel.init(cfg.run.device)
    from nanogen.train import micro_batch  # the training batch: identical conv rounding, so identical latents

    batch_size = batch_size or micro_batch(cfg, info.world_size)
    tokenizer = build_any_tokenizer(cfg).to(info.device)  # eval mode: no RAE noise augmentation
    meta = fmt.make_meta(cfg, len(index), shard_size, dtype, flip)
    if (root / fmt.META).is_file():  # a rerun continues only what the same settings started
        old = fmt.read_meta(root)
        diff = next(((k, old.get(k), v) for k, v in meta.items() if k != "nanogen_version" and old.get(k) != v), None)
        if diff is not None:
            raise UserError(
                f"extract-latents: '{root}' holds latents extracted with other settings ({diff[0]}: {diff[1]} there, "
                f"{diff[2]} now); choose another --out or delete that directory"
            )
    if info.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fmt.write_json_atomic(root / fmt.META, meta)
        except OSError as e:
            raise UserError(f"extract-latents --out: cannot write '{root}' ({e.strerror}); choose another directory") from None
    parallel.barrier()
    mine = range(info.rank, meta["num_shards"], info.world_size)
    todo = [i for i in mine if not (root / fmt.shard_name(i)).is_file()]
    size = lambda i: min(shard_size, len(index) - i * shard_size)
    done = sum(size(i) for i in mine) - sum(size(i) for i in todo)
    print0(
        f"extracting {len(index)} latents {list(tokenizer.latent_shape)} of '{cfg.dataset.target}' into {root}"
        + (f" ({done} already there)" if done else "") + (" + flipped copies" if flip else "")
    )  # fmt: skip
    bar = progress(sum(size(i) for i in mine), "extract latents", unit="img", initial=done)
    for i in todo:
        idx = index[i * shard_size : (i + 1) * shard_size]
        tensors = encode_shard(tokenizer, images[idx], batch_size, info.device, flip)
        tensors = {k: v.to(fmt.DTYPES[dtype]).contiguous() for k, v in tensors.items()}
        tensors.update(labels=labels[idx].long().contiguous(), index=idx.long().contiguous())
        path = root / fmt.shard_name(i)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"format": f"nanogen-latents/{fmt.FORMAT}"})
        os.replace(tmp, path)
        bar.update(len(idx))
    bar.close()
    parallel.barrier()
    if info.is_main:
        print(f"wrote {meta['num_shards']} shards ({len(index)} latents, {dtype}) to {root}")
        again = " ".join(shlex.quote(a) for a in [config, *overrides, f"dataset.latents_dir={root}"])
        print(f"train on them with: nanogen train -c {again}")
    return root
