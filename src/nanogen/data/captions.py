"""Captions for text-to-image data: cleaning, the counters every caption source keeps, and
``CaptionFolder`` (a user's own folder of images with a ``captions.jsonl``).

Spec ``reference.md`` §7.2: captions are UTF-8 text, stripped; the image transform is
``Resize(image_size, bicubic) + CenterCrop(image_size)``. Bad captions are never fatal: an empty caption
trains the unconditional branch (the "" null of CFG), and a non-UTF-8 one is decoded with replacement
characters. Both are counted so that a run can report how much of its data was affected.

    <root>/
        captions.jsonl    {"file_name": "cats/1.jpg", "caption": "a cat on a mat"}   (one object per line)
        cats/1.jpg        paths are relative to <root>

Image keys: ``file_name`` (the Hugging Face imagefolder convention), ``file`` or ``image``; caption keys:
``caption``, ``text`` or ``prompt``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from nanogen.data.transforms import EpochFlips, maybe_flip, resize_center_crop, to_uint8_chw
from nanogen.errors import UserError

IMAGE_KEYS = ("file_name", "file", "image")
CAPTION_KEYS = ("caption", "text", "prompt")
CAPTIONS_FILE = "captions.jsonl"
JSONL_EXAMPLE = '{"file_name": "a.jpg", "caption": "a red apple"}'


def clean_caption(raw: bytes | str | None) -> tuple[str, str | None]:
    """A caption as training text, and why it is unusual: ``None``, ``"non_utf8"`` or ``"empty"``.

    Non-UTF-8 bytes keep their readable part (undecodable bytes become U+FFFD); an empty or whitespace-only
    caption becomes "" (unconditional)."""
    flag = None
    if raw is None:
        return "", "empty"
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw, flag = raw.decode("utf-8", errors="replace"), "non_utf8"
    text = raw.strip()
    return (text, flag) if text else ("", "empty")


@dataclass
class CaptionCounters:
    """Event counts of a data source; they only grow, and are summed across workers and batches."""

    corrupt_skipped: int = 0  # samples dropped: undecodable or missing image, truncated tar member
    non_utf8: int = 0  # captions decoded with replacement characters
    empty: int = 0  # empty or missing captions, used as unconditional
    shards_failed: int = 0  # tar shards that could not be read to the end

    def count(self, flag: str | None) -> None:
        """Count one event by its counter name (a ``clean_caption`` flag); ``None`` counts nothing."""
        if flag is not None:
            setattr(self, flag, getattr(self, flag) + 1)

    def merge(self, other: CaptionCounters | Mapping[str, int]) -> None:
        values = other.as_dict() if isinstance(other, CaptionCounters) else other
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + int(values.get(f.name, 0)))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def take(self) -> dict[str, int]:
        """The counts so far, resetting them to zero (so each batch carries only its own events)."""
        out = self.as_dict()
        for f in fields(self):
            setattr(self, f.name, 0)
        return out


def to_uint8_tensor(img: Image.Image, size: int, flip: bool = False) -> Tensor:
    """A PIL image -> uint8 (3, size, size): RGB, Resize + CenterCrop, optionally mirrored left-right."""
    return maybe_flip(to_uint8_chw(resize_center_crop(img, size)), flip)


@dataclass(frozen=True)
class CaptionedFile:
    path: Path
    caption: str
    where: str  # "captions.jsonl:<line>", for error messages


def _first_key(obj: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in obj), None)


def read_captions_jsonl(root: Path, counters: CaptionCounters) -> list[CaptionedFile]:
    """Parse ``<root>/captions.jsonl``; every listed image must exist (checked now, not mid-training)."""
    jsonl = root / CAPTIONS_FILE
    if not jsonl.is_file():
        raise UserError(f"{root}: no {CAPTIONS_FILE}; write one JSON object per line, e.g. {JSONL_EXAMPLE}")
    items = []
    for lineno, line in enumerate(jsonl.read_bytes().splitlines(), start=1):
        where = f"{jsonl}:{lineno}"
        text, flag = clean_caption(line)
        if flag == "empty":
            continue  # blank lines are layout, not samples
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}); write one object per line, e.g. {JSONL_EXAMPLE}") from None
        if not isinstance(obj, dict) or _first_key(obj, IMAGE_KEYS) is None:
            raise UserError(f"{where}: expected an object with one of the keys {', '.join(IMAGE_KEYS)}, e.g. {JSONL_EXAMPLE}")
        path = root / str(obj[_first_key(obj, IMAGE_KEYS)])
        if not path.is_file():
            raise UserError(f"{where}: image file {path} does not exist; fix the path (relative to {root}) or drop the line")
        cap_key = _first_key(obj, CAPTION_KEYS)
        raw = obj[cap_key] if cap_key else None
        if raw is not None and not isinstance(raw, str):
            raise UserError(f"{where}: the caption '{cap_key}' must be a string, got {type(raw).__name__}")
        caption, cap_flag = clean_caption(raw)
        counters.count(flag)  # a non-UTF-8 line: its caption may carry replacement characters
        counters.count(cap_flag)
        items.append(CaptionedFile(path, caption, where))
    if not items:
        raise UserError(f"{jsonl}: no samples; write one JSON object per line, e.g. {JSONL_EXAMPLE}")
    return items


class CaptionFolder(Dataset):
    """Map-style dataset over ``<root>/captions.jsonl``: item i -> (uint8 (3, S, S), caption).

    With ``flip``, item i is mirrored when the coin of (flip_seed, epoch, i) says so (``EpochFlips``, the same
    coins as ImageNet and latent shards): independent of the sampler, the workers and the batch size, so a
    resumed run repeats it."""

    def __init__(self, root: str | Path, image_size: int, flip: bool = False, flip_seed: int = 0):
        self.root = Path(root)
        self.image_size = image_size
        self.counters = CaptionCounters()
        self.items = read_captions_jsonl(self.root, self.counters)
        self.flips = EpochFlips(flip, flip_seed, len(self.items))

    @property
    def captions(self) -> list[str]:
        return [it.caption for it in self.items]

    def set_epoch(self, epoch: int) -> None:
        self.flips.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        item = self.items[i]
        try:
            with Image.open(item.path) as img:
                x = to_uint8_tensor(img, self.image_size, self.flips(i))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"{item.where}: cannot decode image {item.path} ({e}); replace the file or drop the line") from None
        return x, item.caption
