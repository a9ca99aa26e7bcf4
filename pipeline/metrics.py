"""Retrieval metrics: Recall@K in both directions and RSUM, from ranked candidate rows."""
from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def recall_at(ranked: np.ndarray, positives: list[np.ndarray], ks=KS) -> dict[str, float]:
    """Percent of queries with a positive among their top K.

    ranked:    [Q, >= max(ks)] candidate rows, best first
    positives: Q arrays of the rows that count as a hit
    """
    first_hit = np.full(len(ranked), np.inf)
    for q, pos in enumerate(positives):
        where = np.flatnonzero(np.isin(ranked[q], pos))
        if len(where):
            first_hit[q] = where[0]
    return {f"R@{k}": float(100.0 * np.mean(first_hit < k)) for k in ks}


def retrieval_metrics(i2t_ranked: np.ndarray, t2i_ranked: np.ndarray, image_texts: list[np.ndarray],
                      text_image: np.ndarray) -> dict:
    i2t = recall_at(i2t_ranked, image_texts)
    t2i = recall_at(t2i_ranked, [np.array([i]) for i in text_image])
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t.values()) + sum(t2i.values())}


def kendall_tau(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between rows of a and b ([Q, k] each): NaN where a row has no untied pair."""
    iu = np.triu_indices(a.shape[1], 1)
    da = np.sign(a[:, :, None] - a[:, None, :])[:, iu[0], iu[1]]     # [Q, k(k-1)/2]
    db = np.sign(b[:, :, None] - b[:, None, :])[:, iu[0], iu[1]]
    denom = np.sqrt((da != 0).sum(1).astype(float) * (db != 0).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (da * db).sum(1) / np.where(denom > 0, denom, 1), np.nan)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..k along rows, ties given their average rank."""
    order = np.argsort(x, axis=1, kind="stable")
    ranks = np.empty_like(x, dtype=float)
    sorted_x = np.take_along_axis(x, order, 1)
    for q in range(x.shape[0]):
        _, first, counts = np.unique(sorted_x[q], return_index=True, return_counts=True)
        avg = first + (counts + 1) / 2.0                        # average of positions first+1 .. first+count
        ranks[q, order[q]] = np.repeat(avg, counts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between rows of a and b ([Q, k] each): Pearson on average ranks; NaN for constant rows."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denom = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1), np.nan)


def ndcg(teacher: np.ndarray, k: int = 10) -> np.ndarray:
    """NDCG@k of lists already in the student's order ([Q, n], best first), the teacher's scores as gains.

    Gains are each row's teacher scores shifted so that its lowest is 0 (log-odds can be negative);
    NaN where every gain is 0.
    """
    gains = teacher - teacher.min(1, keepdims=True)
    k = min(k, teacher.shape[1])
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (gains[:, :k] * discount).sum(1)
    ideal = (-np.sort(-gains, axis=1)[:, :k] * discount).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg / np.where(ideal > 0, ideal, 1), np.nan)


def rank_agreement(student: np.ndarray, teacher: np.ndarray, k: int = 10) -> dict[str, float]:
    """How well the student orders each query's candidates like the teacher does, averaged over queries.

    student, teacher: [Q, n] scores of the same candidates, in the student's order (best first).
    """
    mean = lambda x: float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")
    return {"kendall_tau": mean(kendall_tau(student, teacher)), "spearman": mean(spearman(student, teacher)),
            f"ndcg@{min(k, teacher.shape[1])}": mean(ndcg(teacher, k))}
