"""Caption cleaning, the BLIP3o tar-shard streamer, caption folders and prompt-set files, on real files
built in tmp_path (tar shards with PIL-encoded images, Arrow, jsonl, csv, json, txt)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from nanogen.data.captions import CaptionCounters, CaptionFolder, clean_caption, to_uint8_tensor
from nanogen.data.prompts import PromptItem, load_prompts
from nanogen.data.webdataset import Blip3oStream, BrokenShard, StreamLoader, read_groups, shuffled
from nanogen.errors import UserError

S = 4  # stream tests: 4x4 solid-colour PNGs, no resize, so a pixel identifies its sample


def reference_transform(data: bytes, size: int) -> torch.Tensor:
    """An independent Resize(bicubic) + CenterCrop: torchvision's."""
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.PILToTensor()])
    return tf(Image.open(io.BytesIO(data)).convert("RGB"))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def solid_png(i: int) -> bytes:
    return encode(Image.new("RGB", (S, S), (i, 255 - i, 7)), "PNG")


def noise_image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def good(i: int) -> list[tuple[str, bytes]]:
    return [(f"{i:04d}.png", solid_png(i)), (f"{i:04d}.txt", f" caption {i} \n".encode())]


def ident(image: torch.Tensor) -> int:
    return int(image[0, 0, 0])


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, set[int]]:
    """<root>/toy/: 7 shards with 20 good samples (ids 0..19) and every kind of damage.

    shard-0..4: ids 0..14, three each; shard-0 adds 100 (undecodable image) and 101 (no image); shard-1 adds
    18 (non-UTF-8 caption) and 19 (blank caption). shard-5: ids 15..17, then cut inside 102's image data.
    shard-6 is not a tar at all."""
    root = tmp_path / "data"
    d = root / "toy"
    d.mkdir(parents=True)
    for s in range(5):
        members = [m for i in range(3 * s, 3 * s + 3) for m in good(i)]
        if s == 0:
            members += [("0100.jpg", b"\xff\xd8 not a jpeg"), ("0100.txt", b"bad image"), ("0101.txt", b"no image")]
        if s == 1:
            members += [("0018.png", solid_png(18)), ("0018.txt", b"caf\xe9 au lait"), ("0019.png", solid_png(19)),
                        ("0019.txt", b"   ")]
        write_tar(d / f"shard-{s}.tar", members)
    full = write_tar(tmp_path / "full.tar", [m for i in (15, 16, 17) for m in good(i)] + [("0102.png", solid_png(102) * 9)])
    with tarfile.open(full) as tf:
        cut = tf.getmember("0102.png").offset_data + 100
    (d / "shard-5.tar").write_bytes(full.read_bytes()[:cut])
    (d / "shard-6.tar").write_bytes(b"this is not a tar file" * 40)
    return root, set(range(20))


# --- captions -------------------------------------------------------------------------------------------


def test_clean_caption_flags():
    assert clean_caption(b"  a cat \n") == ("a cat", None)
    assert clean_caption("  a dog") == ("a dog", None)
    assert clean_caption(b"caf\xe9") == ("caf\ufffd", "non_utf8")
    assert clean_caption(b" \t\n") == ("", "empty")
    assert clean_caption("") == ("", "empty")
    assert clean_caption(None) == ("", "empty")


def test_counters_count_merge_take():
    c = CaptionCounters()
    for flag in ("empty", "non_utf8", "empty", None):
        c.count(flag)
    c.merge({"corrupt_skipped": 2})
    c.merge(CaptionCounters(shards_failed=1, empty=1))
    assert c.as_dict() == {"corrupt_skipped": 2, "non_utf8": 1, "empty": 3, "shards_failed": 1}
    assert c.take()["empty"] == 3 and c.as_dict() == dict.fromkeys(c.as_dict(), 0)


@pytest.mark.parametrize("w,h", [(37, 23), (19, 41), (16, 16)])
def test_resize_center_crop_matches_torchvision(w, h):
    data = encode(noise_image(w * h, w, h), "PNG")
    ours = to_uint8_tensor(Image.open(io.BytesIO(data)), 16)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 16, 16)
    assert torch.equal(ours, reference_transform(data, 16))
    assert torch.equal(to_uint8_tensor(Image.open(io.BytesIO(data)), 16, flip=True), ours.flip(-1))


# --- tar reading ------------------------------------------------------------------------------------------


def test_read_groups_and_shuffle_buffer(shards):
    root, _ = shards
    groups = list(read_groups(root / "toy" / "shard-0.tar"))
    assert [k for k, _ in groups] == ["0000", "0001", "0002", "0100", "0101"]
    assert groups[0][1]["txt"] == b" caption 0 \n" and set(groups[4][1]) == {"txt"}
    items = list(range(50))
    out = list(shuffled(items, 8, random.Random(0)))
    assert sorted(out) == items and out != items
    assert list(shuffled(items, 1, random.Random(0))) == items == list(shuffled(items, 0, random.Random(0)))


def test_read_groups_detects_truncation_at_a_header(tmp_path):
    """tarfile reads a tar cut inside (or right before) a header as a clean end; read_groups does not."""
    full = write_tar(tmp_path / "full.tar", good(0) + good(1))
    assert [k for k, _ in read_groups(full)] == ["0000", "0001"]
    with tarfile.open(full) as tf:
        header, data_end = tf.getmember("0001.txt").offset, tf.getmember("0001.txt").offset_data + 512
    for cut in (header + 100, data_end):
        path = tmp_path / f"cut-{cut}.tar"
        path.write_bytes(full.read_bytes()[:cut])
        with pytest.raises(BrokenShard) as e:
            list(read_groups(path))
        assert e.value.lost and [k for k, _ in _safe_groups(path)] == ["0000"]


def slot_pass(stream: Blip3oStream, worker: int, workers: int) -> list[str]:
    """The first pass of one slot, after its shuffle buffer."""
    counters = CaptionCounters()
    n = sum(1 for _ in stream.pass_samples(0, worker, workers, counters))
    it = stream.samples(worker, workers, CaptionCounters())
    return [next(it).key for _ in range(n)]


@pytest.mark.parametrize("num_shards", [7, 2])  # 2 < 4 slots: samples are dealt instead of shards
def test_every_sample_once_per_pass_over_ranks_and_workers(shards, num_shards):
    root, good_ids = shards
    tars = sorted((root / "toy").glob("*.tar"))[:num_shards]
    expected = {k for t in tars for k, files in _safe_groups(t) if {"png", "jpg"} & set(files)}
    seen: list[str] = []
    for rank in range(2):
        stream = Blip3oStream(tars, S, 2, seed=3, rank=rank, world_size=2, shuffle_buffer=4, steps=1, flip=False)
        for worker in range(2):
            seen += slot_pass(stream, worker, 2)
    assert Counter(seen) == Counter(expected)  # union is everything readable, and nothing twice
    if num_shards == 7:
        assert {f"{i:04d}" for i in good_ids} | {"0100"} == expected


def _safe_groups(path: Path):
    try:
        yield from read_groups(path)
    except Exception:
        return


# --- the loader ---------------------------------------------------------------------------------------------

READABLE = 21  # 20 good + the undecodable one, per pass


def loader(root: Path, **kw) -> StreamLoader:
    args = dict(data_dir=root, splits=["toy"], image_size=S, batch_size=3, seed=0, rank=0, world_size=1,
                num_workers=0, shuffle_buffer=8, virtual_epoch_steps=7)
    return StreamLoader(**(args | kw))


def take(it, n: int) -> list[tuple[torch.Tensor, list[str]]]:
    return [next(it) for _ in range(n)]


def test_one_pass_yields_every_good_sample_and_counts_damage(shards):
    root, good_ids = shards
    ld = loader(root)  # 7 batches of 3 = one pass of the 21 readable samples
    batches = take(iter(ld), 7)
    ids = [ident(img) for images, _ in batches for img in images]
    assert all(images.dtype == torch.uint8 and images.shape == (3, 3, S, S) for images, _ in batches)
    counts = Counter(ids)
    assert set(counts) == good_ids and sum(counts.values()) == 21  # the undecodable image is replaced by a good one
    assert sorted(counts.values())[-1] == 2 and sorted(counts.values())[-2] == 1
    captions = {ident(img): c for images, caps in batches for img, c in zip(images, caps, strict=True)}
    assert captions[5] == "caption 5" and captions[18] == "caf\ufffd au lait" and captions[19] == ""
    # 100 undecodable, 101 without image, 102 cut off; shard-5 truncated, shard-6 not a tar
    assert ld.stats() == {"corrupt_skipped": 3, "non_utf8": 1, "empty": 1, "shards_failed": 2}


def test_virtual_epoch_length_and_passes(shards):
    root, good_ids = shards
    ld = loader(root, virtual_epoch_steps=15)  # 45 samples: two full passes and 3 samples more
    assert len(ld) == 15
    it = iter(ld)
    batches = take(it, 15)
    assert ld.state_dict() == {"epoch": 0, "batch": 15}
    ids = [ident(img) for images, _ in batches for img in images]
    assert set(ids[:21]) == good_ids and set(ids[21:42]) == good_ids and ids[:21] != ids[21:42]
    next(it)
    assert ld.state_dict() == {"epoch": 1, "batch": 1}
    # without virtual_epoch_steps: the estimate, 3,500 per shard of an unknown split, or the §7.2 figure
    assert len(loader(root, virtual_epoch_steps=None, world_size=2, batch_size=5)) == 3500 * 7 // 10
    (root / "journeydb").mkdir()
    (root / "toy" / "shard-0.tar").rename(root / "journeydb" / "a.tar")
    assert len(loader(root, splits=["journeydb"], virtual_epoch_steps=None, batch_size=8)) == 4_280_000 // 8


def epoch_ids(ld: StreamLoader, n: int) -> list[list[int]]:
    return [[ident(img) for img in images] for images, _ in take(iter(ld), n)]


def test_determinism_per_seed_and_order_per_epoch(shards):
    root, good_ids = shards
    a, b, c = epoch_ids(loader(root), 14), epoch_ids(loader(root), 14), epoch_ids(loader(root, seed=1), 14)
    assert a == b and a != c
    first, second = sum(a[:7], []), sum(a[7:], [])
    assert set(first) == set(second) == good_ids and first != second


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_is_exact(shards, workers):
    root, _ = shards
    full = take(iter(loader(root, num_workers=workers, virtual_epoch_steps=5, flip=True)), 12)
    for done in (3, 6):  # mid-epoch 0 (odd offset: the round robin restarts at worker 0), and mid-epoch 1
        ld = loader(root, num_workers=workers, virtual_epoch_steps=5, flip=True)
        ld.load_state_dict({"epoch": done // 5, "batch": done % 5})
        for (x, cx), (y, cy) in zip(take(iter(ld), 12 - done), full[done:], strict=True):
            assert torch.equal(x, y) and cx == cy


def test_images_match_independent_pil_resize_and_crop(tmp_path):
    d = tmp_path / "orig"
    d.mkdir()
    imgs = {f"{i:03d}": noise_image(i, 20 + 3 * i, 31 - 2 * i) for i in range(8)}
    members = []
    for k, img in imgs.items():
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("JPEG", "jpeg")][int(k) % 4]
        members += [(f"{k}.{ext}", encode(img, fmt)), (f"{k}.txt", k.encode())]
    write_tar(d / "0.tar", members)
    data = dict(members)
    for flip in (False, True):
        ld = StreamLoader(tmp_path, "orig", 12, 1, seed=0, rank=0, world_size=1, num_workers=0, shuffle_buffer=1,
                          virtual_epoch_steps=8, flip=flip)
        flipped = []
        for images, (key,) in take(iter(ld), 8):
            name = next(n for n in data if n.startswith(key + ".") and not n.endswith(".txt"))
            ref = reference_transform(data[name], 12)
            assert torch.equal(images[0], ref) or (flip and torch.equal(images[0], ref.flip(-1)))
            flipped.append(not torch.equal(images[0], ref))
        assert any(flipped) == flip and (not flip or not all(flipped))


def test_missing_split_is_one_line(tmp_path):
    (tmp_path / "toy").mkdir()
    with pytest.raises(UserError) as e:
        loader(tmp_path, splits=["journeydb"])
    msg = str(e.value)
    assert "\n" not in msg and "'journeydb'" in msg and "nanogen prepare --data t2i" in msg
    with pytest.raises(UserError, match="no \\*.tar shards"):
        loader(tmp_path, splits=["toy"])


# --- caption folders -----------------------------------------------------------------------------------------


def caption_folder(tmp_path: Path, lines: list[bytes]) -> Path:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for i, (w, h) in enumerate([(30, 20), (17, 25), (12, 12)]):
        noise_image(i, w, h).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return tmp_path


def test_caption_folder_items_and_pixels(tmp_path):
    root = caption_folder(tmp_path, [
        b'{"file_name": "imgs/0.png", "caption": "  zero "}',
        b"",
        b'{"file": "imgs/1.png", "text": "caf\xe9"}',
        b'{"image": "imgs/2.png", "prompt": "   "}',
    ])
    ds = CaptionFolder(root, 8)
    assert len(ds) == 3 and ds.captions == ["zero", "caf\ufffd", ""]
    assert ds.counters.as_dict() == {"corrupt_skipped": 0, "non_utf8": 1, "empty": 1, "shards_failed": 0}
    for i in range(3):
        x, cap = ds[i]
        assert cap == ds.captions[i]
        assert torch.equal(x, reference_transform((root / "imgs" / f"{i}.png").read_bytes(), 8))
    flips = CaptionFolder(root, 8, flip=True)
    assert all(torch.equal(flips[i][0], ds[i][0]) or torch.equal(flips[i][0], ds[i][0].flip(-1)) for i in range(3))


@pytest.mark.parametrize("line,fragment", [
    (b'{"file_name": "imgs/0.png", "caption": "x"', "captions.jsonl:2: not valid JSON"),
    (b'{"caption": "x"}', "captions.jsonl:2: expected an object with one of the keys file_name"),
    (b'{"file_name": "imgs/9.png", "caption": "x"}', "captions.jsonl:2: image file"),
])
def test_caption_folder_errors_name_file_and_line(tmp_path, line, fragment):
    root = caption_folder(tmp_path, [b'{"file_name": "imgs/0.png", "caption": "ok"}', line])
    with pytest.raises(UserError) as e:
        CaptionFolder(root, 8)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    (root / "captions.jsonl").unlink()
    with pytest.raises(UserError, match="no captions.jsonl"):
        CaptionFolder(root, 8)


# --- prompt sets ------------------------------------------------------------------------------------------------


def test_prompts_arrow_layout(tmp_path):
    import datasets

    img = {"bytes": encode(noise_image(0, 4, 4), "PNG"), "path": None}
    ds = datasets.Dataset.from_dict({"text": ["a cat", " a dog ", ""], "tag": ["x", "y", "z"], "image": [img] * 3})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "mscoco" / "val"))
    items = load_prompts("mscoco", tmp_path)
    assert items == [PromptItem("a cat", {"tag": "x"}), PromptItem("a dog", {"tag": "y"}), PromptItem("", {"tag": "z"})]
    assert load_prompts("whatever", tmp_path / "mscoco" / "val") == items  # data_dir is the split folder itself


def test_prompts_geneval_jsonl(tmp_path, capsys):
    rows = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
            {"tag": "two_object", "include": [], "prompt": ""}]
    path = tmp_path / "geneval" / "prompts" / "evaluation_metadata.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_prompts("geneval", tmp_path)
    assert [i.prompt for i in items] == ["a photo of a bench", ""] and items[0].metadata == rows[0]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 empty prompts" in err and "0 non-UTF-8" in err
    path.write_text(json.dumps(rows[0]) + "\n{broken\n")
    with pytest.raises(UserError, match="evaluation_metadata.jsonl:2: not valid JSON"):
        load_prompts("geneval", tmp_path)


def test_prompts_dpgbench_csv_and_folder(tmp_path):
    d = tmp_path / "dpgbench"
    d.mkdir()
    (d / "dpg_bench.csv").write_text(
        "item_id,text,proposition_id,question_natural_language\n"
        'a1,"a red cube, on a table",1,Is there a cube?\n'
        'a1,"a red cube, on a table",2,Is the cube red?\n'
        "b2,two birds,1,Are there birds?\n"
    )
    items = load_prompts("dpgbench", tmp_path)
    assert [i.prompt for i in items] == ["a red cube, on a table", "two birds"]
    assert items[0].metadata["item_id"] == "a1" and [r["proposition_id"] for r in items[0].metadata["rows"]] == ["1", "2"]
    (d / "dpg_bench.csv").unlink()
    (d / "prompts").mkdir()
    (d / "prompts" / "b2.txt").write_bytes(b"two birds\n")
    (d / "prompts" / "a1.txt").write_bytes(b"caf\xe9 scene")
    items = load_prompts("dpgbench", tmp_path)
    assert items == [PromptItem("caf\ufffd scene", {"item_id": "a1"}), PromptItem("two birds", {"item_id": "b2"})]


def test_prompts_genaibench_json(tmp_path):
    d = tmp_path / "genaibench"
    d.mkdir()
    (d / "genai_image.json").write_text(json.dumps({"00000": {"prompt": "a fox", "basic_skills": ["Object"]},
                                                    "00001": {"prompt": "two owls"}}))
    items = load_prompts("genaibench", tmp_path)
    assert items[0] == PromptItem("a fox", {"id": "00000", "prompt": "a fox", "basic_skills": ["Object"]})
    assert items[1].prompt == "two owls"
    (d / "genai_image.json").write_text(json.dumps([{"text": "x"}, {"caption": "y"}]))
    assert [i.prompt for i in load_prompts("genaibench", tmp_path)] == ["x", "y"]


def test_prompts_generic_files_and_direct_paths(tmp_path, capsys):
    (tmp_path / "mine.txt").write_bytes(b"first\n\n second \nbad \xff byte\n")
    assert [i.prompt for i in load_prompts("mine", tmp_path)] == ["first", "second", "bad \ufffd byte"]
    assert "1 non-UTF-8" in capsys.readouterr().err
    jl = tmp_path / "other" / "prompts.jsonl"
    jl.parent.mkdir()
    jl.write_text('{"caption": "c1", "id": 4}\n')
    assert load_prompts("other", tmp_path) == [PromptItem("c1", {"caption": "c1", "id": 4})]
    csv_path = tmp_path / "set.csv"
    csv_path.write_text("id,prompt\n7,a boat\n8,a car\n")
    assert load_prompts("mjhq", csv_path) == [PromptItem("a boat", {"id": "7"}), PromptItem("a car", {"id": "8"})]
    csv_path.write_text("id,words\n7,a boat\n")
    with pytest.raises(UserError, match="no prompt field"):
        load_prompts("mjhq", csv_path)


def test_prompts_not_found_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        load_prompts("geneval", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("prompt set 'geneval' not found: looked for ")
    assert f"{tmp_path}/geneval/{{val,evaluation_metadata.jsonl" in msg
    assert msg.endswith("run `nanogen prepare --data eval` or set eval.datasets.geneval.data_dir")
