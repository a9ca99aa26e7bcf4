"""FAISS inner-product search for hard negatives, positives excluded, in batches.

The index holds the candidate embeddings (L2-normalised, so inner product = cosine). Queries are searched in
batches of `batch_size`, each asking for k + (the batch's largest positive count) neighbours so that k remain
after the positives are dropped: memory is O(batch x (k + p)), never queries x corpus.
"""
from __future__ import annotations

from typing import Callable, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from .errors import PipelineError

INDEX_KINDS = ("flat", "ivf", "hnsw")


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(emb: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int = 16,
                hnsw_m: int = 32, ef_search: int = 128, use_gpu: bool = True,
                log: Callable[[str], None] = print) -> faiss.Index:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))  # FAISS wants >= 39 points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise PipelineError(f"--index: unknown index '{kind}' (choose from {', '.join(INDEX_KINDS)})")
    gpus = gpu_count() if use_gpu else 0
    if gpus and kind != "hnsw":  # FAISS has no GPU HNSW
        index = faiss.index_cpu_to_all_gpus(index)
        log(f"[index] {kind} index on {gpus} GPU(s), {n} x {d}")
    else:
        log(f"[index] {kind} index on CPU ({faiss.omp_get_max_threads()} threads), {n} x {d}")
    index.add(emb)
    return index


def search_excluding(index: faiss.Index, queries: np.ndarray, positives: Sequence[np.ndarray], k: int,
                     batch_size: int = 4096, progress: bool = False, desc: str = "search"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k candidate rows per query, excluding each query's positive rows.

    queries:   [Q, D] float32, L2-normalised
    positives: Q arrays of candidate rows to exclude
    returns:   rows [Q, k] int64 and scores [Q, k] float32, most similar first
    """
    q = len(queries)
    rows = np.empty((q, k), dtype=np.int64)
    scores = np.empty((q, k), dtype=np.float32)
    with tqdm(total=q, desc=desc, unit="q", disable=not progress, leave=False) as bar:
        for s in range(0, q, batch_size):
            e = min(q, s + batch_size)
            extra = max((len(p) for p in positives[s:e]), default=0)
            want = min(k + extra, index.ntotal)
            sc, ix = index.search(np.ascontiguousarray(queries[s:e], dtype=np.float32), want)
            # [B, want, P] comparison against the batch's positives, padded with -2 (never a row id)
            pad = np.full((e - s, max(extra, 1)), -2, dtype=np.int64)
            for r, p in enumerate(positives[s:e]):
                pad[r, : len(p)] = p
            keep = (ix >= 0) & ~(ix[:, :, None] == pad[:, None, :]).any(-1)
            short = np.flatnonzero(keep.sum(1) < k)
            if len(short):
                raise PipelineError(
                    f"index returned fewer than k={k} non-positive candidates for query {s + short[0]}; "
                    "raise --nprobe or use --index flat"
                )
            # stable sort moves kept columns to the front in their original (descending-score) order
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
            rows[s:e] = np.take_along_axis(ix, order, axis=1)
            scores[s:e] = np.take_along_axis(sc, order, axis=1)
            bar.update(e - s)
    return rows, scores
