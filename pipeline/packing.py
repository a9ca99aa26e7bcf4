"""Batches packed around their mined negatives: an epoch's row order in which a query's hard negatives are, as far
as possible, queries or positives of the same batch.

Why: a hard negative that is no query or positive of its batch is one more image or caption to encode with
gradient, and at 32 negatives those are nearly all of a step (the teacher's gain enters through them:
`--frozen-negatives` loses it). When the batch already holds a negative's image (as a pair), the contrastive term
encodes it anyway, and the distillation term reads the same features for free.

The unit is a *group*: one image's i2t row and the t2i rows of its captions (a batch that holds the group encodes
the image and its captions once each). Groups are linked by the mined lists: a row of group g listing an item of
group h (a caption of image h, or image h itself) is one entry g -> h. Greedy packing, per batch: start from the
next unpacked group in a seeded random order, then keep adding the unpacked group with the most entries to and
from the batch so far (ties: the random order), until the batch has `batch_size` rows. Batches are consecutive
slices of the resulting row order, so a group may straddle two batches, and the number of batches is the same as
with shuffled rows (ceil(rows / batch_size)): the loop's length, dealing to ranks and resume are unchanged.

The order is a pure function of the rows' groups, their lists, the batch size, the seed and the epoch: every
process computes the same one, and a resumed epoch packs the same batches.

| input       | shape  | meaning                                                                   |
| ----------- | ------ | ------------------------------------------------------------------------- |
| row_group   | [R]    | the group (image index) of each training row                              |
| cand_group  | [R, N] | the group of each of the row's first N candidates, -1 where there is none |

Cost: O(E log E) for E = R x N list entries (a heap of candidate groups per batch), about a second for the
demo's 12,000 rows x 32; its memory is the [R, N] index table, small next to the images it saves encoding.
"""
from __future__ import annotations

import heapq

import numpy as np


def adjacency(row_group: np.ndarray, cand_group: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric group graph in CSR form: (indptr [G+1], neighbours, weights); weight(g, h) = entries g -> h plus
    entries h -> g, a group's links to itself left out."""
    src = np.repeat(row_group.astype(np.int64), cand_group.shape[1])
    dst = cand_group.reshape(-1).astype(np.int64)
    keep = (dst >= 0) & (dst != src)
    src, dst = src[keep], dst[keep]
    key = np.concatenate([src * groups + dst, dst * groups + src])
    key, weight = np.unique(key, return_counts=True)   # sorted: by source group, then neighbour
    a, b = key // groups, key % groups
    indptr = np.zeros(groups + 1, dtype=np.int64)
    np.add.at(indptr, a + 1, 1)
    return np.cumsum(indptr), b, weight


def pack(row_group: np.ndarray, cand_group: np.ndarray, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """[R] a permutation of the rows; batch b is rows order[b * batch_size : (b + 1) * batch_size]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if cand_group.ndim != 2 or len(cand_group) != len(row_group):
        raise ValueError(f"cand_group must be [R, N] with R = len(row_group) = {len(row_group)}, "
                         f"got shape {tuple(cand_group.shape)}")
    R = len(row_group)
    if R == 0:
        return np.zeros(0, dtype=np.int64)
    groups = int(max(row_group.max(), cand_group.max(initial=-1))) + 1
    members = np.argsort(row_group, kind="stable")                       # rows of group g: a contiguous run
    starts = np.searchsorted(row_group[members], np.arange(groups + 1))
    indptr, nbr, wgt = adjacency(row_group, cand_group, groups)
    rng = np.random.default_rng([seed, epoch, 0x9ACC])
    priority = rng.permutation(groups)                                   # seeds and tie-breaks
    seeds = iter(np.argsort(priority).tolist())
    size = np.diff(starts)
    packed = np.zeros(groups, dtype=bool)
    packed[size == 0] = True                                             # groups that own no row (only listed)

    order: list[np.ndarray] = []
    filled = 0                                   # rows in the current batch
    score: dict[int, int] = {}                   # unpacked group -> entries to and from the current batch
    heap: list[tuple[int, int, int]] = []        # (-score, priority, group), stale entries skipped

    def link(g: int) -> None:
        for h, w in zip(nbr[indptr[g]:indptr[g + 1]].tolist(), wgt[indptr[g]:indptr[g + 1]].tolist()):
            if not packed[h]:
                score[h] = score.get(h, 0) + w
                heapq.heappush(heap, (-score[h], int(priority[h]), h))

    def next_group() -> int:
        while heap:
            s, _, h = heapq.heappop(heap)
            if not packed[h] and score.get(h) == -s:
                return h
        for h in seeds:                          # nothing linked to the batch is left: a new seed
            if not packed[h]:
                return h
        raise AssertionError("no group left to pack")

    remaining = int(size.sum())
    while remaining:
        g = next_group()
        packed[g] = True
        order.append(members[starts[g]:starts[g + 1]])
        remaining -= int(size[g])
        filled += int(size[g])
        if filled >= batch_size:                 # the batch is full: the next starts from g's overflow, if any
            filled %= batch_size
            score.clear(), heap.clear()
            if filled:
                link(g)
        else:
            link(g)
    return np.concatenate(order).astype(np.int64)


def plan(row_group: np.ndarray, cand_group: np.ndarray, cluster_size: int, seed: int, epoch: int) -> np.ndarray:
    """[R] the epoch's row order: rows packed into clusters of `cluster_size` rows (`pack`), the clusters dealt in
    a seeded random order, so that a batch holds batch_size / cluster_size clusters unrelated to each other
    (cluster_size 1: shuffled rows)."""
    if cluster_size < 1:
        raise ValueError(f"cluster_size must be at least 1, got {cluster_size}")
    order = pack(row_group, cand_group, cluster_size, seed, epoch)
    clusters = (len(order) + cluster_size - 1) // cluster_size
    shuffled = np.random.default_rng([seed, epoch, 0xC1]).permutation(clusters)
    position = (shuffled[:, None] * cluster_size + np.arange(cluster_size)).reshape(-1)
    return order[position[position < len(order)]]


def in_batch_share(row_group: np.ndarray, cand_group: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    """The share of list entries whose group has a row in the listing row's own batch (the packing's objective)."""
    batch = np.empty(len(order), dtype=np.int64)
    batch[order] = np.arange(len(order)) // batch_size                 # [R] each row's batch
    batches = int(batch.max(initial=0)) + 1
    member = np.unique(row_group * batches + batch)                     # (group, batch) pairs present
    real = cand_group >= 0
    hits = np.isin(cand_group * batches + batch[:, None], member) & real
    return float(hits.sum() / real.sum()) if real.any() else 0.0
