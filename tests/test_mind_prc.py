"""MIND (sliced Wasserstein) and k-NN precision/recall (spec evaluation.md §7.4 items 10 and 11): closed
forms, hand-computed radii, and independent numpy / scipy transcriptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from nanogen.errors import UserError
from nanogen.eval.mind import draw, mind, mind_from_projections, project
from nanogen.eval.prc import knn_sq_radii, precision_recall


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def mind_literal(x: np.ndarray, y: np.ndarray, m: int, seed: int) -> float:
    """The reference algorithm written out in float64 numpy; only the random draws come from torch."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(x), len(y))
    if len(x) > n:
        x = x[torch.randperm(len(x), generator=g)[:n].numpy()]
    if len(y) > n:
        y = y[torch.randperm(len(y), generator=g)[:n].numpy()]
    u = torch.randn(m, x.shape[1], generator=g, dtype=torch.float32).double().numpy()
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    px, py = np.sort(x @ u.T, axis=0), np.sort(y @ u.T, axis=0)
    return 3 * x.shape[1] * ((px - py) ** 2).mean()


# ---- MIND


def test_mind_of_a_set_with_itself_is_zero_and_mind_is_symmetric():
    x, y = gaussian(300, 16, 0), gaussian(300, 16, 1, shift=0.3)
    assert mind(x, x) == 0.0
    assert mind(x, y) > 0
    assert mind(x, y) == pytest.approx(mind(y, x), rel=1e-6)


def test_mind_is_seed_deterministic():
    x, y = gaussian(200, 8, 0), gaussian(250, 8, 1)
    assert mind(x, y, seed=7) == mind(x, y, seed=7)
    assert mind(x, y, seed=7) != mind(x, y, seed=8)


def test_mind_of_a_gaussian_mean_shift_is_3_d_mu_squared():
    # E[(u.1)^2] = 1 for a unit direction u, so the per-direction W2^2 is mu^2 up to sampling noise
    d, n, mu = 64, 4000, 0.25
    value = mind(gaussian(n, d, 0), gaussian(n, d, 1, shift=mu), num_projections=2000)
    assert value == pytest.approx(3 * d * mu**2, rel=0.10)


@pytest.mark.parametrize("n1, n2", [(500, 300), (300, 500), (300, 300)])
def test_mind_equals_the_literal_algorithm_including_the_subsampling(n1, n2):
    x, y = gaussian(n1, 24, 0), gaussian(n2, 24, 1, shift=0.2)
    expected = mind_literal(x.double().numpy(), y.double().numpy(), 100, 2020)
    assert mind(x, y, num_projections=100) == pytest.approx(expected, rel=1e-5)


def test_unequal_sets_subsample_the_larger_one_reproducibly():
    drawn = draw(10, 4, 3, num_projections=5, seed=2020)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(2020))[:4]
    assert drawn.keep2 is None and torch.equal(drawn.keep1, expected)
    assert len(set(drawn.keep1.tolist())) == 4
    assert torch.allclose(drawn.directions.norm(dim=1), torch.ones(5))
    # the larger set is cut to the smaller one's size, whichever side it is on
    swapped = draw(4, 10, 3, num_projections=5, seed=2020)
    assert swapped.keep1 is None and torch.equal(swapped.keep2, drawn.keep1)


def test_projections_gathered_from_shards_equal_the_single_process_value():
    x, y = gaussian(700, 32, 0), gaussian(450, 32, 1, shift=0.1)
    drawn = draw(len(x), len(y), 32, num_projections=300)
    # three "ranks" project their contiguous shards; rank 0 concatenates in global order
    p1 = torch.cat([project(s, drawn.directions) for s in x.split(250)])
    p2 = torch.cat([project(s, drawn.directions) for s in y.split(200)])
    assert mind_from_projections(p1, p2, drawn) == pytest.approx(mind(x, y, num_projections=300), rel=1e-6)


def test_mind_rejects_an_empty_set():
    with pytest.raises(UserError, match="non-empty"):
        mind(torch.zeros(0, 4), torch.zeros(3, 4))


# ---- precision / recall


def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. with scipy's cdist: k-th neighbour radius with self excluded, surface inside."""

    def radii(x):
        d = cdist(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    precision = (cdist(fake, real) <= radii(real)[None]).any(axis=1).mean()
    recall = (cdist(real, fake) <= radii(fake)[None]).any(axis=1).mean()
    return precision, recall


def test_k3_radii_by_hand_in_1d():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # distances from 0: 1 3 6 10 -> 6; from 1: 1 2 5 9 -> 5; from 3: 2 3 3 7 -> 3; from 6: 3 4 5 6 -> 5;
    # from 10: 4 7 9 10 -> 9
    assert knn_sq_radii(x, k=3).tolist() == [36.0, 25.0, 9.0, 25.0, 81.0]


def test_precision_recall_by_hand_in_1d():
    real = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    fake = torch.tensor([[-7.0], [3.5], [16.0], [20.0]])
    # -7 is 7 from 0 (radius 6); 20 is 10 from 10 (radius 9): out. 3.5 and 16 (6 from 10) are in.
    # fake radii: -7: 10.5 23 27 -> 27, so every real point (at most 17 from -7) is covered
    assert precision_recall(real, fake, k=3) == (0.5, 1.0)


def test_precision_recall_by_hand_in_2d():
    real = torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1], [5, 5]])
    # squared radii: each corner 2 (its neighbours at 1, 1, 2); (5, 5): 32 41 41 50 -> 41
    assert knn_sq_radii(real, k=3).tolist() == [2.0, 2.0, 2.0, 2.0, 41.0]
    fake = torch.tensor([[0.5, 0.5], [2, 2], [3, -3], [10, 10], [9, 5]])
    # (0.5, 0.5): 0.5 <= 2 in; (2, 2): 2 from (1, 1), on the surface: in; (3, -3): 13 to (1, 0), 68 to (5, 5):
    # out; (10, 10): 50 > 41 out; (9, 5): 16 <= 41 in
    # fake squared radii: a 92.5, b 58, c 100, d 180.5, e 92.5; every real point lies within 40.5 of a
    assert knn_sq_radii(fake, k=3).tolist() == [92.5, 58.0, 100.0, 180.5, 92.5]
    assert precision_recall(real, fake, k=3) == (0.6, 1.0)
    assert precision_recall(fake, real, k=3) == (1.0, 0.6)  # swapping the sets swaps the two numbers


def test_identical_sets_give_one_and_far_disjoint_sets_give_zero():
    x = gaussian(200, 10, 0)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x, gaussian(150, 10, 1, shift=100.0)) == (0.0, 0.0)


def test_precision_recall_matches_brute_force_cdist():
    real, fake = gaussian(240, 6, 0), gaussian(170, 6, 1, shift=1.0)
    expected = brute_force_pr(real.double().numpy(), fake.double().numpy(), 3)
    assert 0.1 < expected[0] < 0.95 and 0.1 < expected[1] < 0.95  # a case where both sides matter
    assert precision_recall(real, fake) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(real, fake, k=5) == pytest.approx(brute_force_pr(real.numpy(), fake.numpy(), 5))


@pytest.mark.parametrize("block", [1, 3, 7, 16, 10000])
def test_block_size_does_not_change_the_result(block):
    real, fake = gaussian(40, 5, 0), gaussian(30, 5, 1, shift=0.5)
    # tiles of other shapes may round the dot products differently in the last bit; the flags do not move
    assert torch.allclose(knn_sq_radii(real, block=block), knn_sq_radii(real, block=10000), rtol=1e-6)
    assert precision_recall(real, fake, block=block) == precision_recall(real, fake, block=10000)


def test_fp16_tiles_agree_on_well_scaled_data_and_fall_back_to_fp32_when_they_overflow():
    real, fake = gaussian(120, 8, 0), gaussian(100, 8, 1, shift=0.5)
    reference = brute_force_pr(real.numpy(), fake.numpy(), 3)
    assert precision_recall(real, fake, fp16=True) == pytest.approx(reference, abs=0.02)
    # squared norms near 1e6 overflow fp16 (max 65504): the fp32 fallback gives the exact answer
    big_real, big_fake = real * 300, fake * 300
    assert precision_recall(big_real, big_fake, fp16=True) == precision_recall(big_real, big_fake, fp16=False)
    assert precision_recall(big_real, big_fake, fp16=True) == pytest.approx(reference, abs=1e-12)


def test_too_few_samples_warn_with_the_counts():
    real = torch.tensor([[0.0], [1.0], [4.0]])  # 3 points: no 3rd neighbour
    with pytest.warns(UserWarning, match=r"real set has 3 samples, fewer than k\+1=4"):
        radii = knn_sq_radii(real, k=3, name="real")
    assert radii.tolist() == [16.0, 9.0, 16.0]  # the 2nd neighbour instead
    with pytest.warns(UserWarning) as caught:
        assert precision_recall(real, torch.tensor([[1.0]])) == (1.0, 1 / 3)  # radius 0 around the lone point
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "real set has 3 samples" in messages[0]
    assert "generated set has 1 samples, fewer than k+1=4" in messages[1] and "\n" not in messages[1]


def test_empty_sets_are_one_line_errors():
    with pytest.raises(UserError, match="0 real, 2 generated"):
        precision_recall(torch.zeros(0, 3), torch.zeros(2, 3))
