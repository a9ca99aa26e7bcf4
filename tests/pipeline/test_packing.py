"""Packing an epoch's rows around their mined negatives: a permutation, whole groups, determinism, the objective."""
import numpy as np
import pytest

from pipeline.packing import adjacency, in_batch_share, pack, plan


def _corpus(groups=60, per_group=6, n=8, cluster=10, seed=0):
    """Rows in groups of `per_group`; every list points into the row's own cluster of `cluster` groups (so a
    batch of one cluster's rows can hold every negative), in a random layout of the group numbers."""
    rng = np.random.default_rng(seed)
    label = rng.permutation(groups)                          # group number -> its place, clusters by place
    row_group = np.repeat(np.arange(groups), per_group)
    cand = np.empty((len(row_group), n), dtype=np.int64)
    for r, g in enumerate(row_group):
        place = label[g]
        mates = [h for h in range(groups) if label[h] // cluster == place // cluster and h != g]
        cand[r] = rng.choice(mates, size=n)
    return row_group, cand


def _naive_share(row_group, cand, order, batch_size):
    batch_of_row = {int(r): i // batch_size for i, r in enumerate(order)}
    hits = total = 0
    for r in range(len(row_group)):
        b = batch_of_row[r]
        present = {int(row_group[s]) for s, bb in batch_of_row.items() if bb == b}
        for h in cand[r]:
            if h >= 0:
                total += 1
                hits += int(h) in present
    return hits / total


def test_the_order_is_a_permutation_of_whole_groups():
    row_group, cand = _corpus()
    order = pack(row_group, cand, batch_size=60, seed=1, epoch=0)
    assert sorted(order.tolist()) == list(range(len(row_group)))
    # each group's rows are consecutive in the order
    seq = row_group[order]
    changes = [g for i, g in enumerate(seq.tolist()) if i == 0 or g != seq[i - 1]]
    assert len(changes) == len(set(changes)) == 60


def test_packing_finds_the_clusters_that_random_batches_miss():
    row_group, cand = _corpus()
    order = pack(row_group, cand, batch_size=60, seed=0, epoch=0)        # one cluster = 10 groups x 6 rows
    packed = in_batch_share(row_group, cand, order, 60)
    shuffled = np.random.default_rng(0).permutation(len(row_group))
    grouped = np.concatenate([np.flatnonzero(row_group == g) for g in np.random.default_rng(0).permutation(60)])
    assert packed == pytest.approx(_naive_share(row_group, cand, order, 60))
    assert in_batch_share(row_group, cand, shuffled, 60) == pytest.approx(_naive_share(row_group, cand, shuffled, 60))
    assert packed == 1.0                                                  # every list entry in its own batch
    assert in_batch_share(row_group, cand, grouped, 60) < 0.3             # whole groups in random order


def test_the_order_is_a_function_of_seed_and_epoch():
    row_group, cand = _corpus(seed=3)
    a = pack(row_group, cand, 64, seed=0, epoch=0)
    assert np.array_equal(a, pack(row_group.copy(), cand.copy(), 64, seed=0, epoch=0))
    assert not np.array_equal(a, pack(row_group, cand, 64, seed=0, epoch=1))
    assert not np.array_equal(a, pack(row_group, cand, 64, seed=1, epoch=0))


@pytest.mark.parametrize("batch_size", [1, 4, 7, 1000])
def test_any_batch_size_covers_every_row_once(batch_size):
    row_group, cand = _corpus(groups=20, cluster=5)
    order = pack(row_group, cand, batch_size, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(len(row_group)))


def test_padding_unlisted_groups_and_empty_input():
    row_group = np.array([0, 0, 2, 2, 2])                 # group 1 owns no row, only appears in lists
    cand = np.array([[1, 2, -1], [-1, -1, -1], [0, 1, -1], [1, -1, -1], [0, 0, 0]])
    assert sorted(pack(row_group, cand, 2, 0, 0).tolist()) == [0, 1, 2, 3, 4]
    assert pack(np.zeros(0, dtype=np.int64), np.zeros((0, 3), dtype=np.int64), 4, 0, 0).tolist() == []


def test_adjacency_counts_entries_both_ways_without_self_links():
    row_group = np.array([0, 0, 1, 2])
    cand = np.array([[1, 1], [0, 2], [0, -1], [2, 1]])   # 0->1 twice, 0->0 (self), 0->2, 1->0, 2->2 (self), 2->1
    indptr, nbr, wgt = adjacency(row_group, cand, 3)
    weights = {(a, int(b)): int(w) for a in range(3) for b, w in zip(nbr[indptr[a]:indptr[a + 1]],
                                                                       wgt[indptr[a]:indptr[a + 1]])}
    assert weights == {(0, 1): 3, (1, 0): 3, (0, 2): 1, (2, 0): 1, (1, 2): 1, (2, 1): 1}


def test_a_plan_deals_whole_clusters_in_a_seeded_order():
    row_group, cand = _corpus(groups=60, per_group=1, cluster=10)    # one row per group: rows are the units
    packed = pack(row_group, cand, 10, seed=2, epoch=1)
    order = plan(row_group, cand, cluster_size=10, seed=2, epoch=1)
    assert sorted(order.tolist()) == list(range(60))
    chunks = [tuple(packed[i:i + 10].tolist()) for i in range(0, 60, 10)]
    dealt = [tuple(order[i:i + 10].tolist()) for i in range(0, 60, 10)]
    assert sorted(dealt) == sorted(chunks) and dealt != chunks        # the same clusters, in another order
    assert np.array_equal(plan(row_group, cand, 10, seed=2, epoch=1), order)
    assert not np.array_equal(plan(row_group, cand, 10, seed=2, epoch=2), order)
    assert in_batch_share(row_group, cand, order, 30) >= in_batch_share(row_group, cand, packed, 10) == 1.0
    shuffled = plan(row_group, cand, 1, seed=2, epoch=1)                # clusters of one row: shuffled rows
    assert in_batch_share(row_group, cand, shuffled, 30) < 0.8
    with pytest.raises(ValueError, match="cluster_size must be at least 1"):
        plan(row_group, cand, 0, 0, 0)


def test_shape_errors_say_what_is_expected():
    with pytest.raises(ValueError, match=r"cand_group must be \[R, N\] with R = len\(row_group\) = 3"):
        pack(np.zeros(3, dtype=np.int64), np.zeros((2, 4), dtype=np.int64), 4, 0, 0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        pack(np.zeros(3, dtype=np.int64), np.zeros((3, 4), dtype=np.int64), 0, 0, 0)
