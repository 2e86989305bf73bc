"""FID math against closed forms and scipy; preprocessing; the shipped Inception weights (spec evaluation.md §1)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanogen.eval.fid import GaussianMoments, fid_from_moments, frechet_distance
from nanogen.eval.images import to_uint8
from nanogen.eval.inception import InceptionFeatures, _tf1_axis_weights, tf1_bilinear_resize


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 64), rng.uniform(0.1, 3, 64)
    m1, m2 = rng.normal(size=64), rng.normal(size=64)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(5, 60))
def test_matches_scipy_sqrtm(seed, n):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 16)), rng.normal(size=(n, 16)) * 1.5 + 0.3
    m1, s1, m2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_moments_merge_and_match_numpy():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(50, 8))
    whole = GaussianMoments.empty(8)
    whole.update(torch.from_numpy(f))
    a, b = GaussianMoments.empty(8), GaussianMoments.empty(8)
    a.update(torch.from_numpy(f[:17]))
    b.update(torch.from_numpy(f[17:]))
    mu, cov = a.merge(b).mean_cov()
    np.testing.assert_allclose(mu, f.mean(0), atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f, rowvar=False), atol=1e-12)  # unbiased, divisor n - 1
    assert fid_from_moments(whole, a.merge(b)) == pytest.approx(0.0, abs=1e-8)


def test_to_uint8_rounds():
    levels = torch.arange(256).float()
    x = levels / 127.5 - 1  # exact float images of every level
    assert torch.equal(to_uint8(x), levels.to(torch.uint8))  # truncation would lose 1 level on many of them
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_tf1_resize_matches_direct_definition():
    """TF1 legacy bilinear: source = dst * in / out, weights from the fractional part, edge clamped."""
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, size=(5, 7))
    out_h, out_w = 11, 9
    ref = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            sy, sx = i * 5 / out_h, j * 7 / out_w
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            dy, dx = sy - y0, sx - x0
            top = img[y0, x0] * (1 - dx) + img[y0, x1] * dx
            bot = img[y1, x0] * (1 - dx) + img[y1, x1] * dx
            ref[i, j] = top * (1 - dy) + bot * dy
    rows = _tf1_axis_weights(5, out_h, torch.float64)
    cols = _tf1_axis_weights(7, out_w, torch.float64)
    got = torch.einsum("oh,hw,pw->op", rows, torch.from_numpy(img), cols).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-9)
    x = torch.from_numpy(img)[None, None].float()
    assert tf1_bilinear_resize(x, 299).shape == (1, 1, 299, 299)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures("cpu")


def test_inception_features_shape_and_batch_invariance(inception):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    both = inception(imgs)
    assert both.shape == (2, 2048) and both.dtype == torch.float64
    one = inception(imgs[:1])
    torch.testing.assert_close(both[:1], one, atol=1e-4, rtol=1e-4)  # eval mode: no batch statistics
    with pytest.raises(TypeError, match="uint8"):
        inception(imgs.float())


# ---------------------------------------------------------------------------------------- spec §7.4 items 1-6


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("d", [1, 8, 2048])
def test_diagonal_closed_form_every_size(d):
    rng = np.random.default_rng(d)
    a, b = rng.uniform(0.01, 2, d), rng.uniform(0.01, 2, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", ["auto", "cholesky", "eigh", "sqrtm", "eig"])
def test_rotated_commuting_closed_form_all_methods(method):
    d = 64
    rng = np.random.default_rng(3)
    q = _rotation(d, 4)
    a, b = rng.uniform(0.05, 3, d), rng.uniform(0.05, 3, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # commuting, not diagonal
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, s1, m2, s2, method=method) == pytest.approx(expected, rel=1e-9)


def test_methods_agree_on_sample_covariances_and_rank_deficient():
    rng = np.random.default_rng(5)
    for n in (300, 40):  # full rank, then rank 39 < d = 64 (the eigh fallback)
        x, y = rng.normal(size=(n, 64)), rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.2 + 0.1
        args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
        values = {m: frechet_distance(*args, method=m) for m in ("auto", "eigh", "sqrtm", "eig")}
        assert all(np.isfinite(v) for v in values.values())
        for v in values.values():
            assert v == pytest.approx(values["sqrtm"], rel=1e-6)


def test_zero_symmetric_and_singular():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(10, 32))  # rank 9 covariance: Cholesky must not be trusted
    m, s = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(m, s, m, s) <= 1e-8 * np.trace(s)
    y = rng.normal(size=(12, 32)) + 0.5
    m2, s2 = y.mean(0), np.cov(y, rowvar=False)
    assert frechet_distance(m, s, m2, s2) == pytest.approx(frechet_distance(m2, s2, m, s), rel=1e-9)
    with pytest.raises(ValueError, match="positive definite"):
        frechet_distance(m, s, m2, s2, method="cholesky")


def test_sqrtm_disp_argument_is_never_used():
    """SciPy 1.18 removes sqrtm(..., disp=); code copied from ADM / pytorch-fid passes it."""
    import pathlib

    import nanogen

    root = pathlib.Path(nanogen.__file__).parent
    offenders = [p for p in root.rglob("*.py") if "disp=" in p.read_text()]
    assert offenders == []


def test_moments_partitions_orders_and_shift_stability():
    rng = np.random.default_rng(7)
    f = rng.normal(size=(203, 6)).astype(np.float32) + 1e3  # large offset: a raw sum-of-squares would cancel
    ref_mu, ref_cov = f.astype(np.float64).mean(0), np.cov(f.astype(np.float64), rowvar=False)
    for seed in range(3):
        cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, 203), 5, replace=False))
        parts = [GaussianMoments.empty(6) for _ in range(6)]
        for p, chunk in zip(parts, np.split(f, cuts), strict=True):
            p.update(torch.from_numpy(chunk))  # float32 input is upcast
        order = np.random.default_rng(seed + 10).permutation(6)
        total = GaussianMoments.empty(6)
        for i in order:
            total = total.merge(parts[i])
        mu, cov = total.mean_cov()
        np.testing.assert_allclose(mu, ref_mu, rtol=0, atol=1e-10)
        np.testing.assert_allclose(cov, ref_cov, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        one = GaussianMoments.empty(6)
        one.update(torch.from_numpy(f[:1]))
        one.mean_cov()


def _threaded_all_reduce(world):
    """An in-process stand-in for dist.all_reduce(SUM) across ``world`` threads."""
    import threading

    barrier = threading.Barrier(world)
    slots: list = [None] * world

    def make(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            t.copy_(total)
            return t

        return reduce

    return make


def test_moments_reduce_across_ranks_equals_one_process():
    import threading

    rng = np.random.default_rng(8)
    f = rng.normal(size=(90, 5)) * 3 + 50
    shards = [f[:7], f[7:60], f[60:]]
    make = _threaded_all_reduce(3)
    out: list = [None] * 3

    def work(r):
        m = GaussianMoments.empty(5)
        m.update(torch.from_numpy(shards[r]))
        out[r] = m.reduce(make(r))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for m in out:
        assert m.n == 90
        np.testing.assert_allclose(m.mean_cov()[0], f.mean(0), atol=1e-12)
        np.testing.assert_allclose(m.mean_cov()[1], np.cov(f, rowvar=False), atol=1e-10)
