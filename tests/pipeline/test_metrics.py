"""Rank agreement against independent computations (scipy, and a plain loop for NDCG)."""
import math

import numpy as np
from scipy import stats

from pipeline.metrics import kendall_tau, ndcg, rank_agreement, recall_at, spearman


def _cases(seed=0, Q=20, k=8):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(Q, k))
    b = a * rng.uniform(-1, 1, size=(Q, 1)) + rng.normal(size=(Q, k))
    b[:5] = np.round(b[:5])       # ties in the teacher
    a[5:8] = np.round(a[5:8] * 2)  # ties in the student
    return a, b


def test_kendall_tau_b_matches_scipy():
    a, b = _cases()
    want = [stats.kendalltau(x, y, variant="b").statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(kendall_tau(a, b), want, atol=1e-12)


def test_spearman_matches_scipy():
    a, b = _cases(1)
    want = [stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman(a, b), want, atol=1e-12)


def test_constant_rows_are_nan_and_skipped_in_the_mean():
    a = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    b = np.array([[5.0, 5.0, 5.0], [1.0, 2.0, 3.0]])
    assert np.isnan(kendall_tau(a, b)[0]) and np.isnan(spearman(a, b)[0])
    assert rank_agreement(a, b)["kendall_tau"] == 1.0


def test_ndcg_matches_a_plain_loop():
    _, t = _cases(2, k=12)
    for k in (3, 10, 12):
        want = []
        for row in t:
            gains = row - row.min()
            dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
            ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(gains, reverse=True)[:k]))
            want.append(dcg / ideal)
        np.testing.assert_allclose(ndcg(t, k), want, atol=1e-12)


def test_perfect_and_reversed_orders():
    t = np.array([[4.0, 3.0, 2.0, 1.0]])
    s = np.array([[0.9, 0.8, 0.7, 0.6]])  # the student's list is in its own order: scores descending
    agree = rank_agreement(s, t, k=10)
    assert agree == {"kendall_tau": 1.0, "spearman": 1.0, "ndcg@4": 1.0}
    worse = rank_agreement(s, t[:, ::-1].copy(), k=10)
    assert worse["kendall_tau"] == -1.0 and worse["ndcg@4"] < 1.0


def test_recall_counts_the_first_hit():
    ranked = np.array([[3, 1, 2], [0, 2, 1]])
    assert recall_at(ranked, [np.array([1]), np.array([5])], ks=(1, 2)) == {"R@1": 0.0, "R@2": 50.0}
