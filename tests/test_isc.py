"""Inception Score from mergeable per-split statistics (spec evaluation.md §1.6, §7.3, §7.4 items 8-9)."""

import threading

import numpy as np
import pytest
import torch

from nanogen.eval.isc import InceptionScoreState, split_assignment


def _score(logits, convention="diffusionbench", shards=1):
    n = len(logits)
    st = InceptionScoreState.create(n, logits.shape[1], convention)
    for chunk in np.array_split(np.arange(n), shards):
        st.update(torch.as_tensor(logits[chunk]), chunk.tolist())
    return st.compute()


def _one_hot_logits(labels, k):
    out = np.full((len(labels), k), -1e4)
    out[np.arange(len(labels)), labels] = 0.0
    return out


def test_uniform_predictions_score_one():
    assert _score(np.zeros((200, 17)))[0] == pytest.approx(1.0, abs=1e-12)


def test_balanced_one_hot_scores_the_class_count():
    """Class i mod 1000 (the harness's balanced labels): every consecutive 5k split holds 5 of each class."""
    labels = np.arange(50_000) % 1000
    assert _score(_one_hot_logits(labels, 1000), "adm")[0] == pytest.approx(1000, abs=1e-6)


def test_class_sorted_input_unshuffled_vs_shuffled():
    """The documented order trap: ADM's consecutive 5k splits of a class-sorted set see 100 classes each."""
    logits = _one_hot_logits(np.repeat(np.arange(1000), 50), 1000)
    assert _score(logits, "adm")[0] == pytest.approx(100, rel=1e-9)
    shuffled = _score(logits, "diffusionbench")[0]
    assert shuffled == pytest.approx(909.6, abs=0.5)


# Literal transcriptions of the three published formulas (spec §1.6), to compare against.
def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _adm(logits):
    preds = _softmax(logits).astype(np.float32)
    scores = []
    for i in range(0, len(preds), 5000):
        part = preds[i : i + 5000]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _torch_fidelity(logits, splits=10):
    n = len(logits)
    x = torch.from_numpy(logits).double()[np.random.RandomState(2020).permutation(n)]
    p, logp = x.softmax(1), x.log_softmax(1)
    scores = []
    for i in range(splits):
        pp, lp = p[i * n // splits : (i + 1) * n // splits], logp[i * n // splits : (i + 1) * n // splits]
        kl = pp * (lp - pp.mean(0, keepdim=True).log())
        scores.append(kl.sum(1).mean().exp())
    return float(torch.stack(scores).mean()), float(torch.stack(scores).std(unbiased=False))


def _diffusionbench(logits, splits=10, eps=1e-10):
    n = len(logits)
    p = _softmax(logits).astype(np.float32)[np.random.RandomState(0).permutation(n)]
    size = n // splits
    scores = []
    for i in range(splits):
        part = p[i * size : (i + 1) * size]
        py = part.mean(0, keepdims=True)
        kl = part * (np.log(part + eps) - np.log(py + eps))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


@pytest.mark.parametrize("n", [10_007, 1_234])
def test_matches_literal_transcriptions(n):
    logits = np.random.default_rng(n).normal(size=(n, 40)) * 3
    assert _score(logits, "diffusionbench", shards=4)[0] == pytest.approx(_diffusionbench(logits), rel=1e-5)
    mean, std = _score(logits, "torch-fidelity", shards=3)
    ref_mean, ref_std = _torch_fidelity(logits)
    assert mean == pytest.approx(ref_mean, rel=1e-12) and std == pytest.approx(ref_std, rel=1e-9)
    assert _score(logits, "adm", shards=5)[0] == pytest.approx(_adm(logits), rel=1e-5)


def test_split_plan_drops_remainder_only_for_diffusionbench():
    a = split_assignment(1005, "diffusionbench")
    assert (a == -1).sum() == 5 and np.bincount(a[a >= 0]).tolist() == [100] * 10
    b = split_assignment(1005, "torch-fidelity")
    assert (b >= 0).all() and sorted(np.bincount(b).tolist()) == [100] * 5 + [101] * 5
    with pytest.raises(ValueError, match="convention"):
        split_assignment(10, "tf")


def test_incomplete_splits_are_refused():
    st = InceptionScoreState.create(100, 5)
    st.update(torch.zeros(50, 5), list(range(50)))
    with pytest.raises(ValueError, match="split counts"):
        st.compute()


def test_reduce_over_ranks_equals_one_process():
    logits = np.random.default_rng(1).normal(size=(600, 12)) * 2
    expected = _score(logits)
    world = 3
    barrier, slots, got = threading.Barrier(world), [None] * world, [None] * world

    def work(r):
        def all_reduce(t):
            slots[r] = t.clone()
            barrier.wait()
            t.copy_(sum(slots))
            barrier.wait()
            return t

        st = InceptionScoreState.create(600, 12)
        idx = list(range(r, 600, world))  # strided, like the harness's shards
        st.update(torch.from_numpy(logits[idx]), idx)
        st.reduce(all_reduce)
        got[r] = st.compute()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in got:
        assert g[0] == pytest.approx(expected[0], rel=1e-12)
