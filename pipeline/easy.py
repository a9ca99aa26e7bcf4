"""Easy candidates: lists of the same length as the mined hard negatives, drawn from beyond the top (mine --easy).

CPRD teaches the order among the top hard negatives; run over easy negatives on otherwise equal terms (the same
number per query, their teacher scores, the same loss), it shows what the hard ones add. Two ways to draw them:

- `random`: uniformly from the whole candidate side of the corpus, positives excluded, without repetition
  within a query; a pure function of (direction, the shard's first query, the shard's queries), so a rerun or
  another process draws the same.
- `bottom`: the K least similar under the student (the far end of its ranking): the top K of the negated query,
  through the same index and positive exclusion as the hard negatives.

Either list is stored most similar first (the candidate shards' order), with the student's cosine.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from .index import search_excluding

EASY_FROM = ("random", "bottom")


def random_rows(n: int, positives: Sequence[np.ndarray], k: int, seed: Sequence[int]) -> np.ndarray:
    """[Q, k] int64: per query, k distinct rows of range(n), none of its positives (k + positives <= n)."""
    rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
    out = np.empty((len(positives), k), dtype=np.int64)
    for q, pos in enumerate(positives):
        drawn = rng.choice(n, size=min(n, k + len(pos)), replace=False)
        out[q] = drawn[~np.isin(drawn, pos)][:k]
    return out


def easy_candidates(how: str, index, cand_emb: np.ndarray, queries: np.ndarray, positives: Sequence[np.ndarray],
                    k: int, direction: str, start: int, search_batch: int = 4096
                    ) -> tuple[np.ndarray, np.ndarray]:
    """rows [Q, k] into the candidate side and their student cosines [Q, k], most similar first.

    queries: [Q, D] L2-normalised query embeddings (the shard's, its first query numbered `start`); cand_emb:
    [C, D] the candidate side, indexed by `index`; positives: Q arrays of candidate rows never drawn."""
    if how == "bottom":
        rows, neg = search_excluding(index, -queries, positives, k, search_batch)   # the top of -cos: the bottom
        rows, scores = rows[:, ::-1], -neg[:, ::-1]                                   # most similar first
        return np.ascontiguousarray(rows), np.ascontiguousarray(scores, dtype=np.float32)
    if how != "random":
        raise ValueError(f"easy candidates come from one of {', '.join(EASY_FROM)}, got {how!r}")
    rows = random_rows(len(cand_emb), positives, k, (zlib.crc32(direction.encode()), start, len(queries)))
    scores = np.einsum("qd,qkd->qk", queries, cand_emb[rows]).astype(np.float32)       # [Q, k] cosines
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
