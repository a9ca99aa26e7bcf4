import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.index import build_index, search_excluding


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries, cands, positives, k):
    """Independent reference: full similarity matrix, positives set to -inf, stable argsort."""
    sims = queries @ cands.T
    for q, pos in enumerate(positives):
        sims[q, pos] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


@pytest.mark.parametrize("batch_size", [7, 1000])
def test_flat_equals_brute_force_with_positives_excluded(batch_size):
    rng = np.random.default_rng(0)
    cands, queries = _unit(rng, 300, 16), _unit(rng, 50, 16)
    # positives: several per query, chosen among each query's nearest so that exclusion matters
    near = np.argsort(-(queries @ cands.T), axis=1)
    positives = [near[q, : 1 + q % 6] for q in range(50)]
    rows, scores = search_excluding(build_index(cands, log=lambda *_: None), queries, positives, k=10,
                                    batch_size=batch_size)
    ref_rows, ref_scores = brute_force(queries, cands, positives, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert not any(np.isin(rows[q], positives[q]).any() for q in range(50))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_recall(kind):
    rng = np.random.default_rng(1)
    cands, queries = _unit(rng, 4000, 16), _unit(rng, 100, 16)
    positives = [np.array([q]) for q in range(100)]
    rows, _ = search_excluding(build_index(cands, kind, nprobe=64, log=lambda *_: None), queries, positives, k=10)
    ref, _ = brute_force(queries, cands, positives, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, ref)])
    assert recall > 0.9
    assert not any(q in rows[q] for q in range(100))


def test_too_few_candidates_is_an_error():
    rng = np.random.default_rng(2)
    cands = _unit(rng, 5, 4)
    with pytest.raises(PipelineError, match="fewer than k=5"):
        search_excluding(build_index(cands, log=lambda *_: None), cands[:1], [np.array([0])], k=5)
