"""Retrieval evaluation: rank a corpus with a dual encoder, optionally re-rank with a cross-encoder.

Used by the `evaluate` stage and by the demo-asset builder (which chooses its settings on a validation split).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm.auto import tqdm

from . import layout
from .corpus import Corpus
from .index import build_index
from .metrics import KS, rank_agreement, retrieval_metrics
from .teachers import CrossEncoder, score_pairs


def rank(query: np.ndarray, cands: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`depth` candidate rows and scores per query (exact inner product, in batches)."""
    index = build_index(cands, "flat", log=lambda *_: None)
    scores, rows = index.search(np.ascontiguousarray(query), min(depth, len(cands)))
    return rows, scores


class ScoreCache:
    """Teacher scores of (image, text) pairs of one corpus under one teacher and score, kept across evaluations.

    Evaluating several students of one teacher on one test set scores mostly the same pairs; with a cache only
    the pairs not seen before reach the teacher. The file is `.npz` of sorted pair keys and their scores
    (loaded without pickle), replaced atomically. Scores computed in other batches can differ from a fresh
    computation in the last float bits.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.keys, self.scores = np.empty(0, np.int64), np.empty(0, np.float32)
        if self.path.exists():
            with np.load(self.path, allow_pickle=False) as f:
                self.keys, self.scores = f["keys"], f["scores"]

    def missing(self, keys: np.ndarray) -> np.ndarray:
        return keys[~np.isin(keys, self.keys)]

    def add(self, keys: np.ndarray, scores: np.ndarray) -> None:
        if len(keys) == 0:
            return
        all_keys = np.concatenate([self.keys, keys])
        order = np.argsort(all_keys, kind="stable")
        self.keys, self.scores = all_keys[order], np.concatenate([self.scores, scores])[order]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, keys=self.keys, scores=self.scores)
        os.replace(tmp, self.path)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        return self.scores[np.searchsorted(self.keys, keys)]


def rerank(corpus: Corpus, teacher, i2t_rows: np.ndarray, t2i_rows: np.ndarray, k: int, itc_weight: float,
           progress: bool, cache: Optional[ScoreCache] = None, image_batch: int = 64
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Re-order each query's first k candidates by teacher score (the rest keep the student's order).

    Returns ([i2t, t2i] re-ranked rows, [i2t, t2i] teacher scores [Q, k] of the first k in the student's order).
    With a cache, only pairs it does not hold are scored (and then added to it). The teacher scores
    `image_batch` images and 4 x that many pairs at a time.
    """
    # all (image, text) pairs of both directions, deduplicated and sorted by image: one vision pass per image
    n_t = corpus.num_texts
    i2t_keys = layout.pair_key(np.arange(len(i2t_rows))[:, None], i2t_rows[:, :k], n_t)
    t2i_keys = layout.pair_key(t2i_rows[:, :k], np.arange(len(t2i_rows))[:, None], n_t)
    keys = np.unique(np.concatenate([i2t_keys.ravel(), t2i_keys.ravel()]))
    todo = keys if cache is None else cache.missing(keys)
    with tqdm(total=len(todo), desc="re-rank", unit="pair", disable=not progress, leave=False) as bar:
        fresh = score_pairs(teacher, corpus, *layout.split_key(todo, n_t), batch_size=4 * image_batch,
                            image_batch_size=image_batch, itc_weight=itc_weight, bar=bar)
    if cache is None:
        scores = fresh
    else:
        cache.add(todo, fresh)
        scores = cache.lookup(keys)
    out, teacher_scores = [], []
    for rows, qkeys in ((i2t_rows, i2t_keys), (t2i_rows, t2i_keys)):
        t = scores[np.searchsorted(keys, qkeys)]                        # [Q, k]
        order = np.argsort(-t, axis=1, kind="stable")
        out.append(np.concatenate([np.take_along_axis(rows[:, :k], order, axis=1), rows[:, k:]], axis=1))
        teacher_scores.append(t)
    return out, teacher_scores


def evaluate_retrieval(corpus: Corpus, encoder: Any, teacher: Optional[CrossEncoder] = None, k_test: int = 16,
                       itc_weight: float = 0.0, batch_size: int = 64, num_workers: int = 0,
                       progress: bool = True, cache: Optional[ScoreCache] = None,
                       teacher_image_batch: int = 64) -> dict:
    """Recall@1/5/10 both ways and RSUM of `encoder` (a DualEncoder) on `corpus`; with a teacher, the same after
    the teacher re-ranks each query's top `k_test` (`rerank`), and the student-teacher rank agreement over
    those candidates (`agreement`, per direction)."""
    img = encoder.encode_images(corpus.image_paths, batch_size, num_workers, progress=progress)
    txt = encoder.encode_texts(corpus.texts, 4 * batch_size, progress=progress)
    depth = max(max(KS), k_test)
    i2t_rows, i2t_scores = rank(img, txt, depth)
    t2i_rows, t2i_scores = rank(txt, img, depth)
    image_texts, text_image = corpus.image_text_rows(), corpus.text_image_rows()
    metrics = retrieval_metrics(i2t_rows, t2i_rows, image_texts, text_image)
    metrics.update(num_images=corpus.num_images, num_texts=corpus.num_texts)
    if teacher is not None:
        (r_i2t, r_t2i), (t_i2t, t_t2i) = rerank(corpus, teacher, i2t_rows, t2i_rows, k_test, itc_weight, progress,
                                                cache, teacher_image_batch)
        metrics["rerank"] = {**retrieval_metrics(r_i2t, r_t2i, image_texts, text_image), "k_test": k_test}
        k = t_i2t.shape[1]
        metrics["agreement"] = {"i2t": rank_agreement(i2t_scores[:, :k], t_i2t),
                                "t2i": rank_agreement(t2i_scores[:, :k], t_t2i)}
    return metrics
