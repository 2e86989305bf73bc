"""ImageNet pixel datasets: the reference's Arrow files and raw class folders (spec ``reference.md`` §7.1).

Two explicit layouts, chosen by ``dataset.type``:

* ``hf``: ``datasets.save_to_disk`` Arrow files, train at ``<data_dir>/imagenet-latents-images`` and val at
  ``<data_dir>/imagenet-latents-images/val``, columns ``image`` (PIL) and ``label`` (int). The images are
  already ADM-cropped to 256², so the reference's ``Resize(bicubic)`` (``resize_center_crop`` here) is a
  no-op at 256.
* ``folder``: raw ImageNet, ``<data_dir>/<split>/<wnid>/*.JPEG`` (also .jpg / .png), labels = positions of the
  sorted wnid folder names (the standard label order when all 1000 are present), ADM center crop on load.

Each item is ``(uint8 (3, S, S), label)`` where label is the class index, or for ``condition_type="text"`` the
caption "a photo of a {class name}" (§7.1), so ImageNet can be trained as text-to-image. The class names
are built from timm's installed WordNet tables (first lemma, duplicates disambiguated), so their wording can
differ from the reference's own list (``ref:src/data/imagenet_classes.py``).

Horizontal flips are off by default: the reference builds a flip transform but never passes it for Arrow data
(§7.1). With ``flip=True`` each position is mirrored with probability 1/2, decided by (flip_seed, epoch,
position): the loader calls ``set_epoch`` and a resumed run sees the same flips.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from nanogen.data.transforms import EpochFlips, adm_center_crop, maybe_flip, resize_center_crop, to_uint8_chw
from nanogen.errors import ConfigError, UserError

ARROW_DIR = "imagenet-latents-images"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
WNID = re.compile(r"n\d{8}")
CAPTION = "a photo of a {}"
# The two synsets that share their only lemma, "crane": the wading bird and the lifting machine.
HAND_NAMES = {"n02012849": "crane bird", "n03126707": "construction crane"}


# ---------------------------------------------------------------------------------------------- class names


def _timm_info_dir() -> Path:
    # find_spec locates the package without importing it (importing timm takes seconds).
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("ImageNet class names need the 'timm' package: install it with 'uv pip install timm'")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in label order."""
    return tuple((_timm_info_dir() / "imagenet_synsets.txt").read_text().split())


@functools.cache
def _lemmas() -> dict[str, list[str]]:
    """wnid -> its WordNet lemmas, for the 1000 ImageNet-1k synsets."""
    wanted = set(imagenet_wnids())
    out = {}
    for line in (_timm_info_dir() / "imagenet_synset_to_lemma.txt").read_text().splitlines():
        wnid, _, lemmas = line.partition("\t")
        if wnid in wanted:
            out[wnid] = [lemma.strip() for lemma in lemmas.split(",")]
    return out


@functools.cache
def _class_names() -> tuple[str, ...]:
    wnids, lemmas = imagenet_wnids(), _lemmas()
    names = [lemmas[w][0] for w in wnids]
    # WordNet repeats a few first lemmas ("crane" the bird and the machine, "maillot" twice): a repeated name
    # takes its synset's second lemma when it has one, else a hand-written name (else its wnid appended, for
    # other timm tables), so all 1000 captions differ.
    repeated = {n for n, c in Counter(names).items() if c > 1}
    names = [
        lemmas[w][1] if n in repeated and len(lemmas[w]) > 1 else n for n, w in zip(names, wnids, strict=True)
    ]
    repeated = {n for n, c in Counter(names).items() if c > 1}
    names = [HAND_NAMES.get(w, f"{n} {w}") if n in repeated else n for n, w in zip(names, wnids, strict=True)]
    return tuple(names)


def imagenet_class_names() -> list[str]:
    """The 1000 distinct ImageNet-1k class names in label order (0 "tench", 1 "goldfish", ...)."""
    return list(_class_names())


def imagenet_caption(label: int) -> str:
    """The text condition for an ImageNet label: "a photo of a {class name}" (§7.1)."""
    return CAPTION.format(_class_names()[label])


@functools.cache
def _name_by_wnid() -> dict[str, str]:
    return dict(zip(imagenet_wnids(), _class_names(), strict=True))


# ---------------------------------------------------------------------------------------------- datasets


class _PixelDataset(Dataset):
    """What both layouts share: the condition type and the per-epoch flip coins."""

    def __init__(self, image_size: int, condition_type: str, flip: bool, flip_seed: int):
        if condition_type not in ("label", "text"):
            raise ConfigError(f"dataset.condition_type={condition_type!r}: use 'label' or 'text'")
        self.image_size = image_size
        self.condition_type = condition_type
        self.flip = flip
        self.flip_seed = flip_seed

    def __len__(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self._flips().epoch = epoch

    def _flips(self) -> EpochFlips:
        if getattr(self, "_coins", None) is None:  # built after the subclass knows its length
            self._coins = EpochFlips(self.flip, self.flip_seed, len(self))
        return self._coins

    def _flipped(self, i: int) -> bool:
        return self._flips()(i)


def _raw_folder_hint(data_dir: str | os.PathLike, split: str) -> str:
    """A hint when ``<data_dir>/<split>`` looks like raw ImageNet class folders."""
    root = Path(data_dir) / split
    if root.is_dir() and any(d.is_dir() and WNID.fullmatch(d.name) for d in root.iterdir()):
        return f"; {root} holds raw class folders: set dataset.type=folder to read them"
    return ""


def arrow_path(data_dir: str | os.PathLike, split: str) -> Path:
    """Where §7.1 keeps the Arrow files of ``split``."""
    if split not in ("train", "val"):
        raise ConfigError(
            f"dataset.split={split!r}: the ImageNet Arrow data has the splits 'train' and 'val'"
        )
    root = Path(data_dir) / ARROW_DIR
    return root if split == "train" else root / "val"


def _load_arrow(path: Path) -> Any:
    import datasets  # imported on use: it pulls in pyarrow and pandas

    ds = datasets.load_from_disk(str(path))
    if not isinstance(ds, datasets.Dataset) or not {"image", "label"} <= set(ds.column_names):
        raise UserError(f"{path} is not an ImageNet Arrow dataset with 'image' and 'label' columns: re-run "
                        f"'nanogen prepare --data imagenet'")  # fmt: skip
    return ds.select_columns(["image", "label"])  # skip any other column's decoding


class ImageNetArrow(_PixelDataset):
    """The reference's pre-cropped ImageNet Arrow files (§7.1) as a map-style dataset."""

    def __init__(
        self, data_dir: str | os.PathLike, split: str = "train", image_size: int = 256,
        condition_type: str = "label", flip: bool = False, flip_seed: int = 0,
    ):  # fmt: skip
        super().__init__(image_size, condition_type, flip, flip_seed)
        self.path = arrow_path(data_dir, split)
        if not (self.path / "state.json").is_file():
            hint = _raw_folder_hint(data_dir, split)
            raise UserError(f"ImageNet {split} Arrow data not found at {self.path}: run 'nanogen prepare "
                            f"--data imagenet' or set dataset.data_dir{hint}")  # fmt: skip
        self._ds = _load_arrow(self.path)
        self._len = len(self._ds)

    def __getstate__(self) -> dict:
        # Worker processes reopen the memory-mapped files instead of receiving a pickled table.
        return {**self.__dict__, "_ds": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[Tensor, int | str]:
        if self._ds is None:
            self._ds = _load_arrow(self.path)
        row = self._ds[int(i)]
        x = maybe_flip(to_uint8_chw(resize_center_crop(row["image"], self.image_size)), self._flipped(i))
        label = int(row["label"])
        return x, imagenet_caption(label) if self.condition_type == "text" else label


class ImageFolderImageNet(_PixelDataset):
    """Raw ImageNet ``<data_dir>/<split>/<wnid>/*.JPEG`` with the ADM center crop."""

    def __init__(
        self, data_dir: str | os.PathLike, split: str = "train", image_size: int = 256,
        condition_type: str = "label", flip: bool = False, flip_seed: int = 0,
    ):  # fmt: skip
        super().__init__(image_size, condition_type, flip, flip_seed)
        self.root = Path(data_dir) / split
        if not self.root.is_dir():
            raise UserError(f"ImageNet folder {self.root} not found: expected <data_dir>/<split>/<wnid>/"
                            f"*.JPEG; set dataset.data_dir / dataset.split")  # fmt: skip
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and d.name[0] != ".")
        files, labels = [], []
        for label, wnid in enumerate(self.classes):
            names = sorted(e.name for e in os.scandir(self.root / wnid)
                           if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
            files += [f"{wnid}/{name}".encode() for name in names]
            labels += [label] * len(names)
        if not files:
            raise UserError(f"no .JPEG/.jpg/.png images in class folders under {self.root}: expected "
                            f"<data_dir>/<split>/<wnid>/*.JPEG")  # fmt: skip
        # Two numpy buffers instead of a million Python strings: forked workers would otherwise copy every
        # page the reference counts touch.
        self._files = np.array(files)
        self._labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._files)

    def caption(self, label: int) -> str:
        """The caption of a folder label; a folder that is not a known wnid stands for its own name."""
        wnid = self.classes[label]
        return CAPTION.format(_name_by_wnid().get(wnid, wnid.replace("_", " ")))

    def __getitem__(self, i: int) -> tuple[Tensor, int | str]:
        with Image.open(self.root / self._files[i].decode()) as img:
            x = to_uint8_chw(adm_center_crop(img, self.image_size))
        label = int(self._labels[i])
        condition = self.caption(label) if self.condition_type == "text" else label
        return maybe_flip(x, self._flipped(i)), condition


def open_imagenet(
    data_dir: str | os.PathLike, split: str = "train", image_size: int = 256, condition_type: str = "label",
    flip: bool = False, type: str = "hf", flip_seed: int = 0,
) -> ImageNetArrow | ImageFolderImageNet:  # fmt: skip
    """The ImageNet dataset of layout ``type`` ("hf" = Arrow, "folder" = raw class folders)."""
    layouts = {"hf": ImageNetArrow, "folder": ImageFolderImageNet}
    if type not in layouts:
        raise ConfigError(
            f"dataset.type={type!r} for ImageNet: use 'hf' (Arrow files) or 'folder' (raw class folders)"
        )
    return layouts[type](data_dir, split, image_size, condition_type, flip, flip_seed)
