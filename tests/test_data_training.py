"""Every data source trains end to end through ``nanogen train`` (tiny CPU model, real file formats built here):
ImageNet Arrow with labels and as T2I captions, raw ImageNet folders, a caption folder, BLIP3o WebDataset shards,
and the nano T2I scenes with the real MiniLM text encoder; the T2I run resumes exactly."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, one_line_error
from nanogen.config import load_config
from nanogen.train import train

pytestmark = pytest.mark.slow


def photo(i: int, size: tuple[int, int] = (40, 36)) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def tiny(tmp_path, *ov):
    return load_config(TINY, [f"run.results_dir={tmp_path}", "eval=null", "training.batch_size=4", *ov])


def read_metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def arrow_imagenet(tmp_path_factory):
    import datasets

    d = tmp_path_factory.mktemp("imagenet")
    ds = datasets.Dataset.from_dict({"image": [photo(i, (32, 32)) for i in range(12)], "label": [i % 10 for i in range(12)]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(d / "imagenet-latents-images"))
    return d


def test_imagenet_arrow_labels_and_as_t2i(tmp_path, arrow_imagenet):
    data = f"dataset={{target: imagenet, type: hf, data_dir: {arrow_imagenet}, split: train, condition_type: label}}"
    res = train(tiny(tmp_path, "run.name=lab", data))
    assert res.step == 6 and np.isfinite(res.final_loss)
    # the same data as text-to-image: "a photo of a {class}" through the text encoder (§7.1)
    text = data.replace("condition_type: label", "condition_type: text")
    res = train(tiny(tmp_path, "run.name=txt", "task=nano-t2i", text, "eval=null"))
    assert res.step == 6 and np.isfinite(res.final_loss)
    assert (res.run_dir / "samples.png").is_file()


def test_raw_imagenet_folders_with_flip(tmp_path):
    for i in range(8):
        d = tmp_path / "raw" / "train" / f"n0144076{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        photo(i, (60, 45)).save(d / f"x{i}.JPEG")
    data = f"dataset={{target: imagenet, type: folder, data_dir: {tmp_path / 'raw'}, split: train, flip: true}}"
    res = train(tiny(tmp_path, "run.name=raw", data, "training.max_steps=4", "training.checkpoint_every_steps=2"))
    assert res.step == 4


def test_caption_folder_t2i_and_exact_resume(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    lines = []
    for i in range(8):
        photo(i).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo number {i}" if i != 3 else ""}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    data = f"dataset={{target: mine, type: folder, data_dir: {root}, condition_type: text}}"
    straight = train(tiny(tmp_path, "run.name=s", "task=nano-t2i", data, "eval=null"))
    train(tiny(tmp_path, "run.name=r", "task=nano-t2i", data, "eval=null", "training.max_steps=3"))
    resumed = train(tiny(tmp_path, "run.name=r", "task=nano-t2i", data, "eval=null"))
    assert resumed.steps_this_run == 3
    a = torch.load(straight.run_dir / "checkpoints" / "step-0000006.pt", weights_only=False)
    b = torch.load(resumed.run_dir / "checkpoints" / "step-0000006.pt", weights_only=False)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


def shard(path, items):
    with tarfile.open(path, "w") as tar:
        for key, files in items:
            for suffix, data in files.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def jpeg(i):
    buf = io.BytesIO()
    photo(i).save(buf, format="JPEG")
    return buf.getvalue()


def test_blip3o_webdataset_counts_damage_in_the_log(tmp_path):
    split = tmp_path / "blip3o" / "short-caption"
    split.mkdir(parents=True)
    shard(split / "00000.tar", [(f"{i:04d}", {"jpg": jpeg(i), "txt": f"caption {i}".encode()}) for i in range(10)]
          + [("bad0", {"jpg": b"not a jpeg", "txt": b"broken"})])  # fmt: skip
    shard(split / "00001.tar", [(f"x{i:03d}", {"png": jpeg(i), "txt": b"\xff\xfe caption"}) for i in range(6)])
    data = (f"dataset={{target: blip3o, type: wds, data_dir: {tmp_path / 'blip3o'}, split: [short-caption], "
            f"condition_type: text, shuffle_buffer: 8}}")  # fmt: skip
    res = train(tiny(tmp_path, "run.name=w", "task=nano-t2i", data, "eval=null", "training.virtual_epoch_steps=3"))
    assert res.step == 6
    counters = [r for r in read_metrics(res.run_dir) if "corrupt_skipped" in r]
    assert counters and counters[-1]["corrupt_skipped"] >= 1 and counters[-1]["non_utf8"] >= 1


def test_nano_t2i_trains_samples_and_scores(tmp_path):
    res = train(load_config(TINY, [f"run.results_dir={tmp_path}", "run.name=n", "task=nano-t2i"]))
    scores = {k: v for k, v in res.evals[6].items() if k.startswith("nano_geneval")}
    assert res.evals[6]["num_samples_nano-geneval"] == 6  # bookkeeping recorded with the scores
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    assert set(scores) == {f"nano_geneval_nano-geneval/{t}" for t in tags} | {
        "nano_geneval_nano-geneval/overall", "nano_geneval_nano-geneval/per_image"}  # fmt: skip
    assert all(0 <= v <= 1 for v in scores.values())
    assert (res.run_dir / "samples.png").is_file()
    with Image.open(res.run_dir / "samples.png") as grid:
        assert grid.width > grid.height  # prompts written to the left of the rows
    # sampling a text model from the CLI: prompts in, one captioned row per prompt out
    from nanogen.cli import main

    ckpt = res.run_dir / "checkpoints" / "step-0000006.pt"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of three fives\n")
    out = tmp_path / "s.png"
    assert main(["sample", "-c", TINY, "task=nano-t2i", "--ckpt", str(ckpt), "--prompt", "a photo of a red seven",
                 "--prompts", str(prompts), "--nrow", "2", "--out", str(out)]) == 0  # fmt: skip
    with Image.open(out) as img:
        assert img.height == 2 * (2 * (32 + 2) + 2)  # two rows (two prompts) of 32 px images, padding 2, scale 2


def test_data_errors_are_one_line(capsys, tmp_path):
    one_line_error(capsys, ["train", "-c", TINY, "eval=null", f"dataset={{target: imagenet, type: hf, data_dir: {tmp_path}}}"],
                   "nanogen prepare --data imagenet")  # fmt: skip
    one_line_error(capsys, ["train", "-c", TINY, "task=nano-t2i", "eval=null",
                            f"dataset={{target: blip3o, type: wds, data_dir: {tmp_path}, split: [journeydb], condition_type: text}}"],
                   "nanogen prepare --data t2i")  # fmt: skip
    one_line_error(capsys, ["train", "-c", TINY, "task=nano-t2i", "eval=null",
                            f"dataset={{target: mine, type: folder, data_dir: {tmp_path}, condition_type: text}}"], "captions.jsonl")
    one_line_error(capsys, ["train", "-c", TINY, "task=nano-t2i", "dataset.target=mnist", "eval=null"],
                   "use task=nano (labels) or task=nano-t2i (text)")
    one_line_error(capsys, ["sample", "-c", TINY, "task=nano-t2i", "--labels", "3"], "this model is text-conditioned")
    one_line_error(capsys, ["train", "-c", TINY, "task=nano-t2i", f"dataset.latents_dir={tmp_path}"],
                   "latent shards store class labels, not captions")
    one_line_error(capsys, ["eval", "-c", TINY, "task=nano-t2i", "eval.datasets.nano-geneval.condition_type=label"],
                   "but the model is text-conditioned")
