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
