"""Easy candidates (mine --easy): random draws and the bottom of the student's ranking, against numpy."""
import numpy as np
import pytest

from pipeline.easy import easy_candidates, random_rows
from pipeline.index import build_index


def _embeddings(seed, n, d=8):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_random_rows_are_distinct_never_positive_and_a_function_of_the_seed():
    positives = [np.array([0, 1, 2]), np.array([5]), np.array([], dtype=np.int64)] * 20
    rows = random_rows(12, positives, 8, (1, 0, 60))
    for r, p in zip(rows, positives):
        assert len(set(r.tolist())) == 8 and not set(r.tolist()) & set(p.tolist()) and (0 <= r).all() and (r < 12).all()
    assert np.array_equal(rows, random_rows(12, positives, 8, (1, 0, 60)))
    assert not np.array_equal(rows, random_rows(12, positives, 8, (2, 0, 60)))
    # every non-positive row is drawn sometimes: uniform over the corpus, not a fixed subset
    assert set(rows[1::3].ravel().tolist()) == set(range(12)) - {5}


def test_random_candidates_carry_their_cosine_most_similar_first():
    cand, queries = _embeddings(0, 30), _embeddings(1, 5)
    positives = [np.array([q]) for q in range(5)]
    rows, scores = easy_candidates("random", None, cand, queries, positives, 6, "i2t", 0)
    assert rows.shape == scores.shape == (5, 6) and scores.dtype == np.float32
    for q in range(5):
        np.testing.assert_allclose(scores[q], [float(queries[q] @ cand[r]) for r in rows[q]], atol=1e-6)
        assert (np.diff(scores[q]) <= 0).all() and q not in rows[q]


def test_bottom_candidates_are_the_least_similar_but_positives():
    cand, queries = _embeddings(2, 40), _embeddings(3, 6)
    index = build_index(cand, "flat", use_gpu=False, log=lambda m: None)
    sims = queries @ cand.T                                           # [6, 40]
    positives = [np.array([int(np.argmin(sims[q])), q]) for q in range(6)]   # the least similar one is a positive
    rows, scores = easy_candidates("bottom", index, cand, queries, positives, 4, "t2i", 0)
    for q in range(6):
        allowed = [c for c in range(40) if c not in positives[q]]
        want = sorted(allowed, key=lambda c: sims[q, c])[:4][::-1]    # the 4 least similar, most similar first
        assert rows[q].tolist() == want
        np.testing.assert_allclose(scores[q], sims[q, want], atol=1e-6)


def test_an_unknown_source_is_an_error():
    with pytest.raises(ValueError, match="one of random, bottom, got 'far'"):
        easy_candidates("far", None, _embeddings(0, 4), _embeddings(1, 1), [np.array([0])], 2, "i2t", 0)
