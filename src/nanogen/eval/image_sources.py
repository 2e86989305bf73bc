"""Image sets for the metric tools (``nanogen fid``, ``nanogen ref-stats``): a folder of image files, an
``.npz`` of uint8 images (``arr_0``, the ADM / DiffusionBench sample format) or a folder of nanogen's sample
shards (``shard-*.npz``, eval/harness.py). Every source yields uint8 (B, 3, H, W) batches, in a fixed order.

npz files are streamed: the ``arr_0`` member is read row block by row block straight out of the zip, so a
50,000 x 256 x 256 x 3 sample file (9.8 GB) never has to fit in memory.

Problems are one line each (spec ``evaluation.md`` §7.4, issue 7 "Bad input"): an empty folder, images of
different sizes, a float or wrongly shaped ``arr_0``. JPEG files are read but warned about: JPEG compression
moves FID noticeably (§1.3), so samples should be PNG or npz.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nanogen.errors import UserError
from nanogen.log import print0

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class _NpzPart:
    path: Path
    count: int
    shape: tuple[int, int, int]  # H, W, C
    header_offset: int


def _npz_part(path: Path) -> _NpzPart:
    """Shape and data offset of ``arr_0`` inside an npz, without reading the images."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"'{path}' is not a readable .npz ({e})") from None
    with zf:
        if "arr_0.npy" not in zf.namelist():
            keys = ", ".join(n.removesuffix(".npy") for n in zf.namelist())
            raise UserError(f"'{path}' has no 'arr_0' image array (keys: {keys}); save samples as np.savez(path, images_uint8_nhwc)")
        with zf.open("arr_0.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    if dtype != np.uint8:
        raise UserError(f"'{path}': arr_0 is {dtype}, expected uint8 images in [0, 255]; quantise once with round(clip(x, 0, 1) * 255)")
    if fortran:
        raise UserError(f"'{path}': arr_0 is stored in Fortran order; re-save it with np.savez(path, np.ascontiguousarray(images))")
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise UserError(f"'{path}': arr_0 has shape {shape}, expected (N, H, W, 3) uint8 images (NHWC)")
    return _NpzPart(path, shape[0], tuple(shape[1:]), offset)


def _iter_rows(part: _NpzPart, start: int, stop: int, block: int) -> Iterator[np.ndarray]:
    """Rows start..stop of ``arr_0`` in blocks, read sequentially (cheap for compressed members too)."""
    h, w, c = part.shape
    row = h * w * c
    with zipfile.ZipFile(part.path) as zf, zf.open("arr_0.npy") as f:
        f.seek(part.header_offset + start * row)
        for lo in range(start, stop, block):
            n = min(block, stop - lo)
            yield np.frombuffer(f.read(n * row), dtype=np.uint8).reshape(n, h, w, c)


def _to_nchw(batch_nhwc: np.ndarray) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(batch_nhwc)).permute(0, 3, 1, 2)
    return t.expand(-1, 3, -1, -1).contiguous() if t.shape[1] == 1 else t.contiguous()


class ImageSource:
    """A fixed, ordered set of uint8 RGB images of one size."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._files: list[Path] = []
        self._parts: list[_NpzPart] = []
        if not self.path.exists():
            raise UserError(f"'{path}' not found; pass an image folder, a .npz of uint8 images (arr_0) or a statistics .npz")
        if self.path.is_file():
            if self.path.suffix != ".npz":
                raise UserError(f"'{path}' is a file but not a .npz; pass an image folder or an .npz of uint8 images (arr_0)")
            self._parts = [_npz_part(self.path)]
        else:
            shards = sorted(self.path.glob("shard-*.npz"))
            if shards:
                self._parts = [_npz_part(p) for p in shards]
            else:
                self._files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                if not self._files:
                    raise UserError(f"'{path}' contains no images ({', '.join(IMAGE_SUFFIXES)}) and no sample shards; check the path")
        self.size = self._check_size()

    def __len__(self) -> int:
        return sum(p.count for p in self._parts) if self._parts else len(self._files)

    def _check_size(self) -> tuple[int, int]:
        if self._parts:
            sizes = {p.shape[:2] for p in self._parts}
            if len(sizes) > 1:
                raise UserError(f"'{self.path}': shards hold images of different sizes {sorted(sizes)}; evaluate one size at a time")
            if len(self) == 0:
                raise UserError(f"'{self.path}' holds 0 images")
            return next(iter(sizes))
        if any(p.suffix.lower() in JPEG_SUFFIXES for p in self._files):
            print0(f"warning: '{self.path}' holds JPEG files; JPEG compression shifts FID (save samples as PNG or npz)")
        with Image.open(self._files[0]) as im:
            return im.size[1], im.size[0]

    def _load_file(self, p: Path) -> np.ndarray:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise UserError(f"'{p}' is not a readable image ({e}); remove or replace it") from None
        if arr.shape[:2] != self.size:
            raise UserError(
                f"'{p}' is {arr.shape[1]}x{arr.shape[0]} but '{self._files[0].name}' is {self.size[1]}x{self.size[0]}; "
                f"all images of a set must have one size"
            )
        return arr

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[Tensor]:
        """uint8 (B, 3, H, W) batches of images ``start .. stop - 1``, in order."""
        stop = len(self) if stop is None else min(stop, len(self))
        if self._files:
            for i in range(start, stop, batch_size):
                yield _to_nchw(np.stack([self._load_file(p) for p in self._files[i : min(i + batch_size, stop)]]))
            return
        pending: list[np.ndarray] = []
        have, base = 0, 0
        for part in self._parts:  # batches may span shard boundaries
            lo, hi = max(start - base, 0), min(stop - base, part.count)
            base += part.count
            if lo >= hi:
                continue
            for rows in _iter_rows(part, lo, hi, batch_size):
                pending.append(rows)
                have += len(rows)
                while have >= batch_size:
                    flat = np.concatenate(pending)
                    yield _to_nchw(flat[:batch_size])
                    pending, have = [flat[batch_size:]], have - batch_size
        if have:
            yield _to_nchw(np.concatenate(pending))

    def describe(self) -> str:
        kind = "npz" if self.path.is_file() else ("sample shards" if self._parts else "image folder")
        return f"{self.path} ({kind}, {len(self)} images, {self.size[1]}x{self.size[0]})"
