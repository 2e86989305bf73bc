"""ImageNet pixel data (Arrow and raw folders), the image transforms and the resumable MapLoader (§7.1, §7.3).

Crops are checked against step-by-step PIL recomputations with hand-derived sizes and against torchvision;
datasets are real files (Arrow via ``datasets.save_to_disk``, JPEG / PNG folders) built in tmp_path.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nanogen.data.imagenet import (
    ImageFolderImageNet,
    ImageNetArrow,
    imagenet_caption,
    imagenet_class_names,
    open_imagenet,
)
from nanogen.data.loader import MapLoader, TensorLoader, collate
from nanogen.data.transforms import adm_center_crop, flip_mask, maybe_flip, resize_center_crop, to_uint8_chw
from nanogen.errors import ConfigError, UserError

BOX, BICUBIC = Image.Resampling.BOX, Image.Resampling.BICUBIC


def noise_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(pixels(img).copy()).permute(2, 0, 1)


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


# ---------------------------------------------------------------------------------------------- transforms


def test_adm_crop_halves_with_box_then_bicubic_then_crops():
    big = noise_image(1200, 800, 0)
    # 800 >= 128 three times: 1200x800 -> 600x400 -> 300x200 -> 150x100; scale 64/100 -> 96x64;
    # left offset (96-64)//2 = 16
    want = big.resize((600, 400), BOX).resize((300, 200), BOX).resize((150, 100), BOX)
    want = want.resize((96, 64), BICUBIC).crop((16, 0, 80, 64))
    assert np.array_equal(pixels(adm_center_crop(big, 64)), pixels(want))
    # the box halving of even sizes is the 2x2 mean (up to PIL's 8-bit fixed-point rounding)
    a = pixels(big).astype(np.float64)
    mean = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4
    assert np.abs(pixels(big.resize((600, 400), BOX)) - mean).max() <= 1


@pytest.mark.parametrize(
    ("w", "h", "size", "steps"),
    [
        # 100 < 128: no halving; 64/100 -> 64x320; top (320-64)//2 = 128
        (100, 500, 64, [((64, 320), BICUBIC), (0, 128, 64, 192)]),
        # odd sizes: 203 >= 200 -> 150x101; 100/101 * 301//2 = 148.51 -> 149x100; left (149-100)//2 = 24
        (301, 203, 100, [((150, 101), BOX), ((149, 100), BICUBIC), (24, 0, 124, 100)]),
        # 300x200 at 64: halve once to 150x100 (200 >= 128), then as the big image
        (300, 200, 64, [((150, 100), BOX), ((96, 64), BICUBIC), (16, 0, 80, 64)]),
    ],
)
def test_adm_crop_sizes(w, h, size, steps):
    img = noise_image(w, h, 1, mode="L")  # grey input: converted to RGB first
    want = img.convert("RGB")
    for step in steps:
        want = want.crop(step) if len(step) == 4 else want.resize(*step)
    got = adm_center_crop(img, size)
    assert got.mode == "RGB" and got.size == (size, size)
    assert np.array_equal(pixels(got), pixels(want))


@pytest.mark.parametrize(
    ("w", "h", "size", "resized", "box"),
    [
        # torchvision's rules written out: the long side is int(size * long / short) (truncated), the crop
        # offsets are round((side - size) / 2) with Python's half-to-even rounding.
        (300, 200, 64, (96, 64), (16, 0, 80, 64)),
        (330, 200, 64, (105, 64), (20, 0, 84, 64)),  # 105.6 -> 105; offset 20.5 -> 20
        (120, 250, 48, (48, 100), (0, 26, 48, 74)),
        (64, 67, 64, (64, 67), (0, 2, 64, 66)),  # offset 1.5 -> 2
        (31, 50, 32, (32, 51), (0, 10, 32, 42)),  # 51.6 -> 51; offset 9.5 -> 10
    ],
)
def test_resize_center_crop_follows_torchvision(w, h, size, resized, box):
    img = noise_image(w, h, 2)
    want = img.resize(resized, BICUBIC).crop(box)
    assert np.array_equal(pixels(resize_center_crop(img, size)), pixels(want))


def test_resize_center_crop_is_a_copy_on_square_images_and_tensors_are_uint8_chw():
    img = noise_image(32, 32, 3)
    out = resize_center_crop(img, 32)
    assert out is not img and np.array_equal(pixels(out), pixels(img))
    x = to_uint8_chw(img)
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert np.array_equal(x.permute(1, 2, 0).numpy(), pixels(img))
    assert torch.equal(maybe_flip(x, True), torch.from_numpy(pixels(img)[:, ::-1].copy()).permute(2, 0, 1))
    assert maybe_flip(x, False) is x


def test_flip_coins_are_deterministic_fair_and_match_latent_shards():
    from nanogen.data.latent_shards import LatentBatches

    m = flip_mask(7, 3, 20000)
    assert torch.equal(m, flip_mask(7, 3, 20000)) and not torch.equal(m, flip_mask(7, 4, 20000))
    assert abs(m.float().mean().item() - 0.5) < 0.015  # 4.2 standard deviations
    data = {"latents": torch.zeros(20, 1, 1, 1), "labels": torch.zeros(20, dtype=torch.long)}
    data["index"] = torch.arange(20)
    shards = LatentBatches(data, batch_size=2, seed=7)
    assert torch.equal(shards.flip_mask(3), flip_mask(7, 3, 20))  # pixel and latent training flip alike


# ---------------------------------------------------------------------------------------------- class names


def test_class_names_are_1000_distinct_wordnet_names():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert (names[0], names[1], names[207]) == ("tench", "goldfish", "golden retriever")
    # the repeated first lemmas: the bird and the machine, the tights and the bathing suit
    repeated = ["crane bird", "construction crane", "maillot", "tank suit"]
    assert [names[i] for i in (134, 517, 638, 639)] == repeated
    assert imagenet_caption(207) == "a photo of a golden retriever"
    assert imagenet_caption(999) == "a photo of a toilet tissue"


# ---------------------------------------------------------------------------------------------- Arrow


TRAIN_LABELS = [5, 0, 207, 1, 999, 3, 4, 2]
VAL_LABELS = [9, 8]


def train_images() -> list[Image.Image]:
    return [noise_image(32, 32, 10 + i) for i in range(7)] + [noise_image(40, 32, 17)]  # one non-square


def val_images() -> list[Image.Image]:
    return [noise_image(32, 32, 30), noise_image(32, 32, 31)]


def save_arrow(images: list[Image.Image], labels: list[int], path: Path) -> None:
    import datasets

    table = datasets.Dataset.from_dict({"image": images, "label": labels})
    table.cast_column("image", datasets.Image()).save_to_disk(str(path))


@pytest.fixture(scope="module")
def arrow_dir(tmp_path_factory) -> Path:
    """The §7.1 layout: train in imagenet-latents-images, val in its val/ subfolder."""
    root = tmp_path_factory.mktemp("imagenet-arrow")
    save_arrow(train_images(), TRAIN_LABELS, root / "imagenet-latents-images")
    save_arrow(val_images(), VAL_LABELS, root / "imagenet-latents-images" / "val")
    return root


def test_arrow_train_and_val_read_back_exactly(arrow_dir):
    train, val = train_images(), val_images()
    ds = open_imagenet(arrow_dir, "train", 32, "label", False, "hf")
    assert isinstance(ds, ImageNetArrow) and len(ds) == 8
    for i in range(7):  # 32² at 32: the resize is a no-op, pixels are exact
        x, y = ds[i]
        assert x.dtype == torch.uint8 and torch.equal(x, chw(train[i])) and y == TRAIN_LABELS[i]
    x, _ = ds[7]  # 40x32 -> center crop, as torchvision would
    assert torch.equal(x, chw(resize_center_crop(train[7], 32)))
    v = ImageNetArrow(arrow_dir, "val", 32)
    assert len(v) == 2 and torch.equal(v[1][0], chw(val[1])) and v[1][1] == 8
    assert torch.equal(ImageNetArrow(arrow_dir, "train", 16)[0][0], chw(resize_center_crop(train[0], 16)))
    text = ImageNetArrow(arrow_dir, "train", 32, condition_type="text")
    assert [text[i][1] for i in (1, 2)] == ["a photo of a tench", "a photo of a golden retriever"]


def test_arrow_pickles_without_its_table_and_reopens(arrow_dir):
    ds = ImageNetArrow(arrow_dir, "train", 32)
    assert pickle.loads(pickle.dumps(ds))._ds is None
    again = pickle.loads(pickle.dumps(ds))
    assert torch.equal(again[3][0], ds[3][0]) and again[3][1] == 1


def test_arrow_flips_half_the_positions_by_seed_and_epoch(arrow_dir):
    plain = ImageNetArrow(arrow_dir, "train", 32)
    flipped = ImageNetArrow(arrow_dir, "train", 32, flip=True, flip_seed=5)
    seen = []
    for epoch in range(4):
        flipped.set_epoch(epoch)
        mask = flip_mask(5, epoch, 8)
        for i in range(8):
            assert torch.equal(flipped[i][0], maybe_flip(plain[i][0], bool(mask[i])))
        seen.append(mask)
    assert len({tuple(m.tolist()) for m in seen}) > 1  # the coins change with the epoch


def test_arrow_missing_data_errors(tmp_path, arrow_dir):
    with pytest.raises(UserError) as err:
        ImageNetArrow(tmp_path, "train", 32)
    assert_one_line(err, str(tmp_path / "imagenet-latents-images"), "nanogen prepare --data imagenet")
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(UserError) as err:
        open_imagenet(tmp_path, "val", 32, type="hf")
    assert_one_line(err, "imagenet-latents-images/val", "dataset.type=folder")
    with pytest.raises(ConfigError) as err:
        open_imagenet(arrow_dir, "train", 32, type="zip")
    assert_one_line(err, "dataset.type='zip'", "'hf'", "'folder'")
    with pytest.raises(ConfigError):
        ImageNetArrow(arrow_dir, "test", 32)
    with pytest.raises(ConfigError):
        ImageNetArrow(arrow_dir, "train", 32, condition_type="caption")


# ---------------------------------------------------------------------------------------------- raw folders


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet-folders")
    files = {  # created out of order: labels must come from the sorted wnids
        "n02099601": [("b.JPEG", (300, 200)), ("a.png", (64, 64))],
        "n01440764": [("x.jpg", (100, 500)), ("y.JPG", (33, 47)), ("notes.txt", None)],
        "n01443537": [("z.PNG", (1200, 800))],
    }
    for seed, (wnid, entries) in enumerate(files.items()):
        (root / "train" / wnid).mkdir(parents=True)
        for name, size in entries:
            if size is None:
                (root / "train" / wnid / name).write_text("not an image")
            else:
                fmt = "PNG" if name.lower().endswith("png") else "JPEG"
                noise_image(*size, seed).save(root / "train" / wnid / name, format=fmt)
    (root / "train" / "n01443537" / ".hidden").mkdir()  # not a class
    return root


def test_folder_labels_files_and_adm_crop(folder_dir):
    ds = open_imagenet(folder_dir, "train", 24, "label", False, "folder")
    assert isinstance(ds, ImageFolderImageNet)
    assert ds.classes == ["n01440764", "n01443537", "n02099601"] and len(ds) == 5
    want = [("n01440764/x.jpg", 0), ("n01440764/y.JPG", 0), ("n01443537/z.PNG", 1),
            ("n02099601/a.png", 2), ("n02099601/b.JPEG", 2)]  # fmt: skip
    for i, (rel, label) in enumerate(want):
        x, y = ds[i]
        with Image.open(folder_dir / "train" / rel) as img:
            assert torch.equal(x, chw(adm_center_crop(img, 24))), rel
        assert y == label and x.shape == (3, 24, 24)
    text = ImageFolderImageNet(folder_dir, "train", 24, condition_type="text")
    assert [text[i][1] for i in (0, 2, 4)] == [
        "a photo of a tench",
        "a photo of a goldfish",
        "a photo of a golden retriever",
    ]


def test_folder_captions_name_unknown_folders_by_themselves(tmp_path):
    (tmp_path / "val" / "my_cats").mkdir(parents=True)
    noise_image(40, 30, 0).save(tmp_path / "val" / "my_cats" / "a.png")
    ds = ImageFolderImageNet(tmp_path, "val", 16, condition_type="text")
    assert ds[0][1] == "a photo of a my cats"


def test_folder_errors(tmp_path):
    with pytest.raises(UserError) as err:
        ImageFolderImageNet(tmp_path, "train", 32)
    assert_one_line(err, str(tmp_path / "train"), "<wnid>/*.JPEG")
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "train" / "n01440764" / "readme.txt").write_text("x")
    with pytest.raises(UserError) as err:
        open_imagenet(tmp_path, "train", 32, type="folder")
    assert_one_line(err, "no .JPEG/.jpg/.png images", str(tmp_path / "train"))


# ---------------------------------------------------------------------------------------------- loaders


class Indexed(torch.utils.data.Dataset):
    """Item i = (uint8 image filled with i, i); records decoded indices and set_epoch calls."""

    def __init__(self, n: int):
        self.n, self.decoded, self.epochs = n, [], []

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __getitem__(self, i: int):
        self.decoded.append(i)
        return torch.full((3, 2, 2), i, dtype=torch.uint8), i


def labels_of(loader, count: int) -> list[list[int]]:
    it = iter(loader)
    return [next(it)[1].tolist() for _ in range(count)]


def test_map_loader_matches_tensor_loader_and_shards_an_epoch():
    ds = Indexed(20)
    loader = MapLoader(ds, batch_size=3, seed=1)
    assert len(loader) == 6
    ref = TensorLoader(torch.arange(20), batch_size=3, seed=1)
    it = iter(ref)
    assert labels_of(loader, 14) == [next(it)[0].tolist() for _ in range(14)]  # crosses two epochs
    assert ds.epochs == [0, 1, 2]  # set_epoch as each epoch starts
    epoch = []
    for rank in range(3):
        epoch += sum(labels_of(MapLoader(Indexed(20), batch_size=2, seed=4, rank=rank, world_size=3), 3), [])
    assert len(epoch) == 18 and len(set(epoch)) == 18 and set(epoch) <= set(range(20))
    assert labels_of(MapLoader(Indexed(20), 3, seed=1), 6) != labels_of(MapLoader(Indexed(20), 3, seed=2), 6)


def test_map_loader_resumes_mid_epoch_without_decoding_the_past():
    seq = labels_of(MapLoader(Indexed(20), batch_size=3, seed=1), 14)
    part = MapLoader(Indexed(20), batch_size=3, seed=1)
    labels_of(part, 5)
    assert part.state_dict() == {"epoch": 0, "batch": 5}
    ds = Indexed(20)
    resumed = MapLoader(ds, batch_size=3, seed=1)
    resumed.load_state_dict(part.state_dict())
    rest = labels_of(resumed, 9)
    assert rest == seq[5:]
    assert ds.decoded == sum(rest, [])  # the first five batches were never decoded
    assert resumed.state_dict() == {"epoch": 2, "batch": 2}
    end = MapLoader(Indexed(20), batch_size=3, seed=1)
    end.load_state_dict({"epoch": 0, "batch": 6})  # the state right after an epoch's last batch
    assert labels_of(end, 2) == seq[6:8]


def test_map_loader_eval_order_keeps_the_last_partial_batch():
    assert labels_of(MapLoader(Indexed(7), 3, seed=0, shuffle=False), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    r0 = MapLoader(Indexed(7), 3, seed=0, rank=0, world_size=2, shuffle=False)
    r1 = MapLoader(Indexed(7), 3, seed=0, rank=1, world_size=2, shuffle=False)
    assert (len(r0), len(r1)) == (2, 1)
    assert labels_of(r0, 2) == [[0, 1, 2], [6]] and labels_of(r1, 1) == [[3, 4, 5]]


def test_map_loader_too_small_and_stats():
    with pytest.raises(UserError) as err:
        MapLoader(Indexed(5), batch_size=3, seed=0, rank=0, world_size=2)
    assert_one_line(err, "5 items", "batch of 3", "2 process")
    assert MapLoader(Indexed(6), batch_size=3, seed=0).stats() == {}


def test_workers_give_the_same_batches_with_flips_across_epochs(arrow_dir):
    def run(workers: int) -> list[tuple]:
        ds = ImageNetArrow(arrow_dir, "train", 16, condition_type="text", flip=True, flip_seed=3)
        it = iter(MapLoader(ds, batch_size=3, seed=2, num_workers=workers))
        return [next(it) for _ in range(5)]  # two batches per epoch: three epochs

    serial, parallel = run(0), run(2)
    for (xs, cs), (xp, cp) in zip(serial, parallel, strict=True):
        assert xs.dtype == torch.uint8 and xs.shape == (3, 3, 16, 16)
        assert torch.equal(xs, xp) and cs == cp and isinstance(cs, list)
    # the serial run's images are the dataset's own items with the epoch's flips
    plain = ImageNetArrow(arrow_dir, "train", 16)
    loader = MapLoader(plain, batch_size=3, seed=2)
    for k, (xs, _) in enumerate(serial):
        epoch, b = divmod(k, 2)
        idx = loader.batch_indices(epoch, b)
        mask = flip_mask(3, epoch, 8)
        assert torch.equal(xs, torch.stack([maybe_flip(plain[i][0], bool(mask[i])) for i in idx]))


def test_collate_and_tensor_loader_lists():
    zeros, ones = torch.zeros(3, 2, 2, dtype=torch.uint8), torch.ones(3, 2, 2, dtype=torch.uint8)
    x, y, c = collate([(zeros, 4, "a"), (ones, 7, "b")])
    assert x.dtype == torch.uint8 and torch.equal(x, torch.stack([zeros, ones])) and y.dtype == torch.long
    assert y.tolist() == [4, 7] and c == ["a", "b"]
    captions = [f"caption {i}" for i in range(10)]
    idx, caps = next(iter(TensorLoader(torch.arange(10), captions, batch_size=4, seed=3)))
    assert caps == [f"caption {i}" for i in idx.tolist()] and sorted(idx.tolist()) != idx.tolist()
