"""The generation harness: sharding over ranks, per-sample seeds, uint8 shards, resume after a crash, the
background consumer (spec evaluation.md §7.4 item 28, issue 7 item 1)."""

import numpy as np
import pytest
import torch

from nanogen.errors import UserError
from nanogen.eval import harness
from nanogen.eval.generate import balanced_labels, per_sample_noise
from nanogen.eval.image_sources import ImageSource
from nanogen.parallel import DistInfo


def _fake_generate(idx):
    """A deterministic 'model': image i depends only on i (per-sample noise), like the real sampler."""
    noise = per_sample_noise(idx, (3, 4, 5), seed=7, device=torch.device("cpu"))
    return ((noise.tanh() + 1) * 127.5).round().to(torch.uint8)


class _Collect:
    def __init__(self):
        self.seen: dict[int, torch.Tensor] = {}

    def __call__(self, images, idx):
        for i, im in zip(idx, images, strict=True):
            assert i not in self.seen, f"index {i} consumed twice"
            self.seen[i] = im.clone()


@pytest.mark.parametrize("world", range(1, 9))
def test_every_index_once_for_any_world_size(world):
    n, batch = 53, 4  # n not divisible by the world size or the batch
    plan = harness.Plan(n, batch, harness.default_shard_size(n, batch), {})
    seen = _Collect()
    for rank in range(world):  # ranks run one after another here; they share nothing but the plan
        harness.run(plan, _fake_generate, [seen], DistInfo(rank, world))
    assert sorted(seen.seen) == list(range(n))


def test_same_image_for_same_index_whatever_batch_and_world():
    a, b = _Collect(), _Collect()
    harness.run(harness.Plan(20, 3, 6, {}), _fake_generate, [a], DistInfo(0, 1))
    for rank in range(3):
        harness.run(harness.Plan(20, 5, 5, {}), _fake_generate, [b], DistInfo(rank, 3))
    assert all(torch.equal(a.seen[i], b.seen[i]) for i in range(20))


def test_shards_on_disk_are_uint8_npz_and_readable_by_the_fid_tool(tmp_path):
    plan = harness.Plan(10, 4, 4, {"weights": "abc"})
    harness.run(plan, _fake_generate, [], DistInfo(), shard_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.glob("shard-*.npz"))
    assert files == ["shard-0000000.npz", "shard-0000004.npz", "shard-0000008.npz"]
    with np.load(tmp_path / "shard-0000004.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (4, 4, 5, 3)
        assert f["index"].tolist() == [4, 5, 6, 7]
    src = ImageSource(tmp_path)
    assert len(src) == 10
    got = torch.cat(list(src.batches(3)))
    assert torch.equal(got, _fake_generate(list(range(10))))


def test_resume_regenerates_only_unfinished_shards(tmp_path):
    plan = harness.Plan(12, 2, 4, {"weights": "abc"})
    calls = []

    def crashing(idx):
        if idx[0] >= 6:
            raise RuntimeError("preempted")
        calls.append(idx)
        return _fake_generate(idx)

    with pytest.raises(RuntimeError, match="preempted"):
        harness.run(plan, crashing, [], DistInfo(), shard_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("shard-*.npz")) == ["shard-0000000.npz"]  # shard 4..7 was cut short
    seen = _Collect()
    made = harness.run(plan, _fake_generate, [seen], DistInfo(), shard_dir=tmp_path)
    assert made == 8  # shards 4 and 8; shard 0 was read back
    assert sorted(seen.seen) == list(range(12))
    assert all(torch.equal(seen.seen[i], _fake_generate([i])[0]) for i in range(12))


def test_damaged_shard_is_regenerated(tmp_path):
    plan = harness.Plan(4, 2, 2, {})
    harness.run(plan, _fake_generate, [], DistInfo(), shard_dir=tmp_path)
    (tmp_path / "shard-0000002.npz").write_bytes(b"truncated")
    assert harness.run(plan, _fake_generate, [], DistInfo(), shard_dir=tmp_path) == 2


def test_samples_of_another_plan_are_never_mixed_in(tmp_path):
    harness.run(harness.Plan(4, 2, 2, {"weights": "abc"}), _fake_generate, [], DistInfo(), shard_dir=tmp_path)
    with pytest.raises(UserError, match="different weights"):
        harness.run(harness.Plan(4, 2, 2, {"weights": "xyz"}), _fake_generate, [], DistInfo(), shard_dir=tmp_path)


def test_consumer_errors_reach_the_caller():
    def broken(images, idx):
        raise ZeroDivisionError("in the worker")

    with pytest.raises(ZeroDivisionError, match="in the worker"):
        harness.run(harness.Plan(8, 2, 4, {}), _fake_generate, [broken], DistInfo())


def test_balanced_labels_fifty_per_class_for_imagenet():
    labels = balanced_labels(list(range(50_000)), 1000)
    assert torch.bincount(labels).tolist() == [50] * 1000


def test_default_shard_size_whole_batches():
    assert harness.default_shard_size(50_000, 64) == 1024  # ~1000, rounded up to whole batches
    assert harness.default_shard_size(50_000, 125) == 1000
    assert harness.default_shard_size(10, 4) == 4
    assert harness.default_shard_size(640, 10) == 20  # 32 shards


def test_resume_on_another_process_count(tmp_path):
    plan = harness.Plan(12, 2, harness.default_shard_size(12, 2), {"weights": "abc"})
    harness.run(plan, _fake_generate, [], DistInfo(0, 3), shard_dir=tmp_path)  # rank 0 of 3 finished, then a crash
    seen, made = _Collect(), 0
    for rank in range(2):  # resumed on 2 processes
        made += harness.run(plan, _fake_generate, [seen], DistInfo(rank, 2), shard_dir=tmp_path)
    assert sorted(seen.seen) == list(range(12)) and made == 12 - 4
