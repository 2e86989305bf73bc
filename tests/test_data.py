"""The nano tier data and the resumable loader."""

import torch

from nanogen.data.loader import TensorLoader
from nanogen.data.nano import load_mnist_5k, load_nano


def test_mnist_5k_is_real_and_balanced():
    x, y = load_mnist_5k()
    assert x.shape == (5000, 28, 28) and x.dtype.name == "uint8"
    assert (torch.bincount(torch.from_numpy(y)) == 500).all()
    assert 25 < x.mean() < 45  # MNIST's mean intensity is about 33


def test_split_is_deterministic_disjoint_and_framed():
    tr, ho = load_nano("train"), load_nano("heldout")
    assert (len(tr), len(ho)) == (4500, 500)
    assert (torch.bincount(ho.labels) == 50).all()
    flat = lambda s: {img.numpy().tobytes() for img in s.images[:, 0]}
    assert not flat(tr) & flat(ho)
    assert torch.equal(load_nano("heldout").images, ho.images)
    assert tr.images.shape[1:] == (3, 32, 32) and tr.images.min() == -1 and tr.images.max() == 1
    assert torch.all(tr.images[:, :, :2] == -1) and torch.equal(tr.images[:, 0], tr.images[:, 2])  # padding, grey RGB
    assert load_nano("train", image_size=16).images.shape[-1] == 16


def test_loader_resumes_exactly_and_shards():
    data = torch.arange(20)
    full = TensorLoader(data, batch_size=3, seed=1)
    it = iter(full)
    seq = [next(it)[0].tolist() for _ in range(14)]  # crosses two epochs (6 batches each)
    part = TensorLoader(data, batch_size=3, seed=1)
    it = iter(part)
    for _ in range(5):
        next(it)
    resumed = TensorLoader(data, batch_size=3, seed=1)
    resumed.load_state_dict(part.state_dict())
    it = iter(resumed)
    assert [next(it)[0].tolist() for _ in range(9)] == seq[5:]
    r0 = next(iter(TensorLoader(data, batch_size=3, seed=1, rank=0, world_size=2)))[0]
    r1 = next(iter(TensorLoader(data, batch_size=3, seed=1, rank=1, world_size=2)))[0]
    assert not set(r0.tolist()) & set(r1.tolist())
