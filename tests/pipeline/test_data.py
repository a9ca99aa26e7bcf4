"""Training batches: every index points at the right image or caption, the positive mask, the image cache."""
import json

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.corpus import load_tables
from pipeline.data import BatchSpec, DistillBatches, Processors, pick
from pipeline.models import load_image, load_processors


def _dataset(run, corpus=None, batches=100, **kw):
    student = json.loads((run / "mine" / "manifest.json").read_text())["config"]["student"]
    proc, tok = load_processors(student)
    files = sorted((run / "teacher").glob("part-*.parquet"))
    spec = BatchSpec(**{**dict(batch_size=12, num_negatives=4, seed=3, shuffle_buffer=0), **kw})
    corpus = corpus or load_tables(run / "mine" / "corpus")
    return DistillBatches(spec, files, corpus, Processors(proc, tok, 32), epoch=1, batches=batches), proc, tok


def test_batch_indices_decode_to_the_rows(scored_run):
    data, proc, tok = _dataset(scored_run)
    corpus = data.corpus
    import pyarrow as pa
    shards = sorted((scored_run / "teacher").glob("part-*.parquet"))[3:6]  # the i2t/t2i boundary: both directions
    rows = pa.concat_tables([pq.read_table(f) for f in shards]).slice(0, 12).to_pydict()
    assert set(rows["direction"]) == {"i2t", "t2i"}
    batch = data.build(rows)
    texts = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
    text_of = {tid: t for tid, t in zip(corpus.text_ids, corpus.texts)}
    path_of = dict(zip(corpus.image_ids, corpus.image_paths))
    image_px = lambda iid: proc(images=load_image(path_of[iid]), return_tensors="pt")["pixel_values"][0]
    for r in range(12):
        i2t = rows["direction"][r] == "i2t"
        assert bool(batch["query_is_image"][r]) == i2t
        p = pick(3, 1, rows["query_id"][r], len(rows["positive_ids"][r]))
        pos_id = rows["positive_ids"][r][p]
        for n, cid in enumerate(rows["candidate_ids"][r][:4]):
            idx = int(batch["candidates"][r, n])
            if i2t:
                assert texts[idx] == text_of[cid].lower()
            else:
                torch.testing.assert_close(batch["pixel_values"][idx], image_px(cid))
        assert batch["teacher"][r].tolist() == pytest.approx(rows["teacher_scores"][r][:4])
        assert float(batch["teacher_positive"][r]) == pytest.approx(rows["positive_teacher_scores"][r][p])
        if i2t:
            torch.testing.assert_close(batch["pixel_values"][int(batch["query"][r])], image_px(rows["query_id"][r]))
            assert texts[int(batch["positive"][r])] == text_of[pos_id].lower()
    assert batch["candidate_mask"].all()
    # the positive mask: pairs sharing an image (or an identical caption) are positives of each other
    pi, pt = batch["pair_image"], batch["pair_text"]
    for a in range(12):
        for b in range(12):
            assert bool(batch["pair_positive_mask"][a, b]) == (bool(pi[a] == pi[b]) or bool(pt[a] == pt[b]))


def test_positive_choice_is_a_pure_function():
    assert pick(0, 0, "q", 5) == pick(0, 0, "q", 5)
    assert len({pick(0, e, "q", 5) for e in range(20)}) > 1


def test_image_cache_is_bounded_and_transparent(scored_run):
    small, _, _ = _dataset(scored_run, image_cache_mb=0.03)  # room for two or three 32x32 images
    none, _, _ = _dataset(scored_run, image_cache_mb=0)
    for rows in ([0, 1, 2, 3], [2, 3, 4, 0], [5, 0, 1, 2]):
        torch.testing.assert_close(small.images.pixels(rows), none.images.pixels(rows))
        assert small.images._cached <= small.images.cache_bytes and len(small.images._cache) <= 3
    assert len(none.images._cache) == 0


@pytest.mark.parametrize("budget", [None, 3])
def test_rank_and_worker_dealing_covers_every_batch_once(scored_run, budget):
    """Each batch dealt to one rank, whole; under a budget (distill's default lists) a batch's encoded items are a
    function of the batch alone, so a rank builds what one process builds."""
    lists = dict(outside="encode", outside_budget=budget)
    whole, _, _ = _dataset(scored_run, batches=6, **lists)
    ranks = [_dataset(scored_run, batches=3, rank=r, world_size=2, **lists)[0] for r in range(2)]
    ids = lambda ds: [tuple(b["query"].tolist()) + tuple(b["positive"].tolist()) +
                      tuple(map(tuple, b["candidates"].tolist())) + tuple(map(tuple, b["candidate_mask"].tolist())) +
                      (len(b["pixel_values"]), len(b["input_ids"]))
                      for b in ds]
    a, b = ids(ranks[0]), ids(ranks[1])
    assert len(a) == len(b) == 3
    assert sorted(a + b) == sorted(ids(whole))


def _rows(run, n=12):
    import pyarrow as pa
    shards = sorted((run / "teacher").glob("part-*.parquet"))[3:6]  # the i2t/t2i boundary: both directions
    return pa.concat_tables([pq.read_table(f) for f in shards]).slice(0, n).to_pydict()


def test_false_negatives_are_never_negatives(scored_run):
    """Captions identical to a positive's, and images that are the same file, are masked out of the lists."""
    import copy
    corpus = copy.deepcopy(load_tables(scored_run / "mine" / "corpus"))
    rows = _rows(scored_run)
    text_row = {t: i for i, t in enumerate(corpus.text_ids)}
    image_row = {t: i for i, t in enumerate(corpus.image_ids)}
    planted = 0
    for r in range(12):
        cands = rows["candidate_ids"][r][:4]
        if rows["direction"][r] == "i2t":   # candidate caption 1 := one of the query image's own captions
            own = [corpus.texts[text_row[p]] for p in rows["positive_ids"][r]]
            corpus.texts[text_row[cands[1]]] = own[0]
        else:                               # candidate image 2 := the positive image's file
            corpus.image_paths[image_row[cands[2]]] = corpus.image_paths[image_row[rows["positive_ids"][r][0]]]
        planted += 1
    data, _, _ = _dataset(scored_run, corpus=corpus)
    batch = data.build(rows)

    # brute force, from the definition, over the edited corpus
    captions_of = {}
    for tid, iid, text in zip(corpus.text_ids, corpus.text_image_ids, corpus.texts):
        captions_of.setdefault(iid, set()).add(text)
    path = dict(zip(corpus.image_ids, corpus.image_paths))
    text = dict(zip(corpus.text_ids, corpus.texts))
    image_of_text = dict(zip(corpus.text_ids, corpus.text_image_ids))
    expected_false = 0
    for r in range(12):
        q, pos = rows["query_id"][r], rows["positive_ids"][r][pick(3, 1, rows["query_id"][r], len(rows["positive_ids"][r]))]
        keep = []
        for c in rows["candidate_ids"][r][:4]:
            if rows["direction"][r] == "i2t":
                false = text[c] in captions_of[q] or path[image_of_text[c]] == path[q]
            else:
                false = path[c] == path[pos] or text[q] in captions_of[c]
            expected_false += false
            keep.append(not false)
        n = sum(keep)
        assert batch["candidate_mask"][r].tolist() == [True] * n + [False] * (4 - n), r
        kept_scores = [s for s, k in zip(rows["teacher_scores"][r][:4], keep) if k]
        assert batch["teacher"][r, :n].tolist() == pytest.approx(kept_scores)
    assert expected_false >= planted and int(batch["false_negatives"]) == expected_false
    # the contrastive term: two ids of one image file are one image of the batch
    assert len(set(corpus.image_paths)) < len(corpus.image_paths)


def test_max_teacher_margin_drops_candidates_far_above_the_positive(scored_run):
    rows = _rows(scored_run)
    data, _, _ = _dataset(scored_run, max_teacher_margin=0.0)
    batch = data.build(rows)
    dropped = 0
    for r in range(12):
        p = pick(3, 1, rows["query_id"][r], len(rows["positive_ids"][r]))
        tp = rows["positive_teacher_scores"][r][p]
        keep = [s <= tp for s in rows["teacher_scores"][r][:4]]
        dropped += keep.count(False)
        assert int(batch["candidate_mask"][r].sum()) == sum(keep)
    assert int(batch["dropped_by_margin"]) == dropped
    assert 0 < dropped < 48  # the tiny teacher is random: some candidates score above the positive, not all


def _packed(run, batch_size=48, batches=100, cluster_size=8, **kw):
    from pipeline.data import Matches, list_rows
    from pipeline.packing import plan

    files = sorted((run / "teacher").glob("part-*.parquet"))
    corpus = load_tables(run / "mine" / "corpus")
    order = plan(*list_rows(files, Matches(corpus), 4), cluster_size, 3, 1)
    data, proc, tok = _dataset(run, corpus, batches=batches, batch_size=batch_size, **kw)
    data.rows.order = order
    return data, order, files


def test_packed_batch_b_holds_rows_b_of_the_order(scored_run):
    import pyarrow as pa
    data, order, files = _packed(scored_run)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    for b, batch in enumerate(data):
        rows = order[b * 48:(b + 1) * 48]
        got = data.build(table.take(rows).to_pydict())
        assert batch["query"].tolist() == got["query"].tolist() and len(batch["query"]) == len(rows)
    assert b == len(order) // 48 - (len(order) % 48 == 0)


def test_packed_dealing_covers_every_batch_once_and_holds_no_table_before_it_iterates(scored_run):
    import pickle
    whole, _, _ = _packed(scored_run, batch_size=24, batches=6)
    ranks = [_packed(scored_run, batch_size=24, batches=3, rank=r, world_size=2)[0] for r in range(2)]
    ids = lambda ds: [tuple(b["query"].tolist()) + tuple(b["positive"].tolist()) for b in ds]
    a, b = ids(ranks[0]), ids(ranks[1])
    assert len(a) == len(b) == 3
    assert sorted(a + b) == sorted(ids(whole))
    # what a loader worker receives: the order ([R] ints) and the corpus tables, not the teacher rows, which
    # each worker reads itself; the processed-image cache stays within its bound while packed batches stream
    assert len(pickle.dumps(whole.rows.order)) < 8 * len(whole.rows.order) + 1000
    assert not any("Table" in type(v).__name__ for part in (whole, whole.rows) for v in vars(part).values())
    small, _, _ = _packed(scored_run, batch_size=24, batches=6, image_cache_mb=0.03)
    for _ in small:
        assert small.images._cached <= small.images.cache_bytes


@pytest.mark.parametrize("outside,budget,priority", [("drop", None, "listed"), ("encode", None, "listed"),
                                                     ("encode", 3, "listed"), ("encode", 7, "teacher-rank"),
                                                     ("encode", 7, "teacher-rank-steep")])
def test_list_entries_outside_the_batch_are_counted_and_dropped_or_kept(scored_run, outside, budget, priority):
    """Brute force from the definition: an entry is in-batch when its caption text or image file is that of a
    query or (chosen) positive of the batch; with a budget, only the `budget` outside items of most weight (ties:
    the first listed) keep their entries: a listing weighs 1 (listed), 1 / sqrt(1 + its rank by teacher score
    in its row) (teacher-rank) or 1 / (1 + that rank) (teacher-rank-steep)."""
    rows = _rows(scored_run, n=24)
    n = len(rows["query_id"])
    data, _, _ = _dataset(scored_run, outside=outside, outside_budget=budget, outside_priority=priority)
    batch = data.build(rows)
    corpus = data.corpus
    path = dict(zip(corpus.image_ids, corpus.image_paths))
    text = dict(zip(corpus.text_ids, corpus.texts))
    chosen = [rows["positive_ids"][r][pick(3, 1, rows["query_id"][r], len(rows["positive_ids"][r]))]
              for r in range(n)]
    i2t = [d == "i2t" for d in rows["direction"]]
    pair_paths = {path[q if i else p] for q, p, i in zip(rows["query_id"], chosen, i2t)}
    pair_texts = {text[p if i else q] for q, p, i in zip(rows["query_id"], chosen, i2t)}
    item = lambda r, c: ("t", text[c]) if i2t[r] else ("i", path[c])
    weights = {"listed": {}, "teacher-rank": {}, "teacher-rank-steep": {}}
    first = {}
    for r in range(n):
        scores = rows["teacher_scores"][r][:4]
        for j, c in enumerate(rows["candidate_ids"][r][:4]):
            if not (text[c] in pair_texts if i2t[r] else path[c] in pair_paths):
                above = sum(s > scores[j] for s in scores) + sum(s == scores[j] for s in scores[:j])
                for how, w in (("listed", 1.0), ("teacher-rank", (1 + above) ** -0.5),
                               ("teacher-rank-steep", 1 / (1 + above))):
                    weights[how][item(r, c)] = weights[how].get(item(r, c), 0.0) + w
                first.setdefault(item(r, c), len(first))
    counts = weights[priority]
    ranked = {how: sorted(w, key=lambda k: (-w[k], first[k])) for how, w in weights.items()}
    if budget is not None and priority != "listed":   # the batch tells a rank rule from the count
        assert set(ranked[priority][:budget]) != set(ranked["listed"][:budget])
    ranked = ranked[priority]
    allowed = set(ranked if budget is None else ranked[:budget]) if outside == "encode" else set()
    listed = inside = 0
    for r in range(n):
        keep = []
        for c, s in zip(rows["candidate_ids"][r][:4], rows["teacher_scores"][r][:4]):
            here = text[c] in pair_texts if i2t[r] else path[c] in pair_paths
            listed, inside = listed + 1, inside + here   # the test corpus has no false negatives
            if here or item(r, c) in allowed:
                keep.append(s)
        assert int(batch["candidate_mask"][r].sum()) == len(keep)
        assert batch["teacher"][r, :len(keep)].tolist() == pytest.approx(keep)
    assert int(batch["negatives"]) == listed and int(batch["negatives_in_batch"]) == inside
    assert 0 < inside < listed
    # what is encoded: the pairs, and the outside items allowed
    assert (len(batch["pixel_values"]) + len(batch["input_ids"]) == len(set(batch["pair_image"].tolist()))
            + len(set(batch["pair_text"].tolist())) + len(allowed))
    assert budget is None or len(allowed) == budget < len(counts)


@pytest.mark.parametrize("priority,chosen", [("listed", "shared"), ("teacher-rank", "shared"),
                                              ("teacher-rank-steep", "hardest")])
def test_the_steep_rank_rule_takes_one_hardest_negative_over_two_third_ranked_listings(scored_run, priority,
                                                                                       chosen):
    """Budget 1. Two caption queries list images (teacher scores 5, 4, 3 in list order): `hardest` at rank 0 of
    the first, `shared` at rank 2 of both. Weights: listed 1 against 2; teacher-rank 1 against 2 / sqrt(3) =
    1.15; teacher-rank-steep 1 against 2 / 3."""
    data, _, _ = _dataset(scored_run, outside="encode", outside_budget=1, outside_priority=priority)
    rows = {"direction": ["t2i", "t2i"], "teacher_scores": [[5.0, 4.0, 3.0], [5.0, 4.0, 3.0]]}
    entries = [[(0, "a", "hardest", False), (1, "b", "second", False), (2, "c", "shared", False)],
               [(0, "d", "other", False), (1, "e", "another", False), (2, "c", "shared", False)]]
    assert data._outside_encoded(entries, rows) == {(False, chosen)}


def test_the_contrastive_positives_are_every_caption_of_each_image_file(scored_run):
    """Captions shared between images (as in the demo, where every image of a combination has the same five):
    pair a's image matches pair b's caption whenever that text is one of the image's captions, even when the
    two pairs share neither image nor caption, and the packing graph leaves such false negatives out."""
    import copy

    from pipeline.data import Matches, list_rows

    corpus = copy.deepcopy(load_tables(scored_run / "mine" / "corpus"))
    image_row = {iid: i for i, iid in enumerate(corpus.image_ids)}
    for t, iid in enumerate(corpus.text_image_ids):       # 3 kinds of image, each kind's captions alike
        corpus.texts[t] = f"shape {image_row[iid] % 3} phrasing {t % 5}"
    rows = _rows(scored_run, n=24)
    n = len(rows["query_id"])
    data, _, _ = _dataset(scored_run, corpus=corpus)
    batch = data.build(rows)
    path = dict(zip(corpus.image_ids, corpus.image_paths))
    text = dict(zip(corpus.text_ids, corpus.texts))
    captions = {}
    for tid, iid in zip(corpus.text_ids, corpus.text_image_ids):
        captions.setdefault(path[iid], set()).add(text[tid])
    pairs = []
    for r in range(n):
        pos = rows["positive_ids"][r][pick(3, 1, rows["query_id"][r], len(rows["positive_ids"][r]))]
        q = rows["query_id"][r]
        pairs.append((path[q], text[pos]) if rows["direction"][r] == "i2t" else (path[pos], text[q]))
    want = [[pairs[b][1] in captions[pairs[a][0]] for b in range(n)] for a in range(n)]
    assert batch["pair_positive_mask"].tolist() == want
    old = [[pairs[a][0] == pairs[b][0] or pairs[a][1] == pairs[b][1] for b in range(n)] for a in range(n)]
    assert sum(map(sum, want)) > sum(map(sum, old))      # pairs that share nothing yet match

    files = sorted((scored_run / "teacher").glob("part-*.parquet"))
    rows_, cand = list_rows(files, Matches(corpus), 4)
    import pyarrow as pa
    table = pa.concat_tables([pq.read_table(f) for f in files]).to_pydict()
    assert rows_.tolist() == list(range(len(table["query_id"])))
    row_of = {(d, q): r for r, (d, q) in enumerate(zip(table["direction"], table["query_id"]))}
    left_out = 0
    for r, (d, q, pos, cs) in enumerate(zip(table["direction"], table["query_id"], table["positive_ids"],
                                            table["candidate_ids"])):
        for j, c in enumerate(cs[:4]):
            if d == "i2t":
                false = text[c] in captions[path[q]]
            else:
                false = path[c] == path[pos[0]] or text[q] in captions[path[c]]
            left_out += false
            # an entry points at the row whose query it is (its caption's t2i row, its image's i2t row)
            assert cand[r, j] == (-1 if false else row_of[("t2i" if d == "i2t" else "i2t", c)])
    assert left_out > 0


def test_the_positive_table_of_a_batchs_pairs_follows_the_corpus(scored_run):
    """BatchItems.positives (built for the pairs' own images and captions only, repeats included) against the
    definition: caption j is a positive of image i when its text is among the texts of image i's file."""
    from pipeline.data import BatchItems, Matches

    corpus = load_tables(scored_run / "mine" / "corpus")
    items = BatchItems(Matches(corpus))
    images = [items.image(i) for i in corpus.image_ids[:6]]
    texts = [items.text(t) for t in corpus.text_ids[::3]]
    gen = torch.Generator().manual_seed(0)
    pi = torch.tensor(images)[torch.randint(len(images), (9,), generator=gen)]
    pt = torch.tensor(texts)[torch.randint(len(texts), (11,), generator=gen)]
    paths, captions = list(items.images), list(items.texts)
    of_file = {}
    for text, row in zip(corpus.texts, corpus.text_image_rows()):
        of_file.setdefault(corpus.image_paths[row], set()).add(text)
    want = [[captions[j] in of_file.get(paths[i], set()) for j in pt.tolist()] for i in pi.tolist()]
    got = items.positives(pi, pt)
    assert got.tolist() == want
    assert 0 < int(got.sum()) < got.numel()   # both kinds of cell
