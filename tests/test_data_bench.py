"""``nanogen benchmark-data``: it runs the real loaders on real JPEG files and tar shards (tiny sizes here); its
synthetic photos decode like photos; bad arguments are one line."""

import json

import numpy as np
from PIL import Image

from conftest import one_line_error
from nanogen.cli import main
from nanogen.data.bench import synthetic_photo, write_folder_tree


def test_synthetic_photos_are_photo_like(tmp_path):
    img = synthetic_photo(np.random.default_rng(0), (500, 375))
    assert img.size == (500, 375)
    a = np.asarray(img, dtype=np.float64)
    assert 20 < a.std() < 120  # varied, not flat
    assert np.abs(np.diff(a, axis=1)).mean() < 30  # locally smooth, unlike white noise (~85)
    root = write_folder_tree(tmp_path, 5, classes=2)
    files = sorted((root / "train").rglob("*.JPEG"))
    assert len(files) == 5 and {f.parent.name for f in files} == {"n00000000", "n00000001"}
    with Image.open(files[0]) as f:
        assert f.format == "JPEG"


def test_benchmark_data_cli_json(capsys):
    code = main(["benchmark-data", "--image-size", "32", "--images", "16", "--batch-size", "4", "--workers", "0,1",
                 "--text-encoder", "", "--json"])  # fmt: skip
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("decode_crop", "stream"):
        assert set(res[key]) == {"0", "1"}
        assert all(r["images_per_s"] > 0 and r["per_worker"] > 0 for r in res[key].values())
    assert "captions" not in res


def test_benchmark_data_bad_arguments(capsys):
    one_line_error(capsys, ["benchmark-data", "--workers", "two"], "--workers: 'two' is not a comma-separated list")
    one_line_error(capsys, ["benchmark-data", "--workers", "0,-1"], "counts must be >= 0")
    one_line_error(capsys, ["benchmark-data", "--images", "8", "--batch-size", "8"], "--images must be at least 2 x --batch-size")
