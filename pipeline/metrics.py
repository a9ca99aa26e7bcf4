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
