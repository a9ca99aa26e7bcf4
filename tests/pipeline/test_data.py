"""Training batches: every index points at the right image or caption, the positive mask, the image cache."""
import json

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.corpus import load_tables
from pipeline.data import DistillBatches, pick
from pipeline.models import load_image, load_processors


def _dataset(run, **kw):
    student = json.loads((run / "mine" / "manifest.json").read_text())["config"]["student"]
    proc, tok = load_processors(student)
    files = sorted((run / "teacher").glob("part-*.parquet"))
    args = dict(batch_size=12, num_negatives=4, batches=100, seed=3, epoch=1, shuffle_buffer=0)
    args.update(kw)
    return DistillBatches(files, load_tables(run / "mine" / "corpus"), proc, tok, 32, **args), proc, tok


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
        torch.testing.assert_close(small.pixels(rows), none.pixels(rows))
        assert small._cached <= small.cache_bytes and len(small._cache) <= 3
    assert len(none._cache) == 0


def test_rank_and_worker_dealing_covers_every_batch_once(scored_run):
    whole, _, _ = _dataset(scored_run, batches=6)
    ranks = [_dataset(scored_run, batches=3, rank=r, world_size=2)[0] for r in range(2)]
    ids = lambda ds: [tuple(b["query"].tolist()) + tuple(b["positive"].tolist()) for b in ds]
    a, b = ids(ranks[0]), ids(ranks[1])
    assert len(a) == len(b) == 3
    assert sorted(a + b) == sorted(ids(whole))
