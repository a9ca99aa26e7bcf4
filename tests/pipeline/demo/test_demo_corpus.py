import json

from pipeline.demo.corpus import (TYPES, DemoCorpusSpec, captions, combinations, confusable, generate,
                                  split_combinations)


def test_generation_is_deterministic(tmp_path):
    spec = DemoCorpusSpec(seed=3, train_images=30)
    a, b = generate(spec, tmp_path / "a"), generate(spec, tmp_path / "b")
    for split in ("train", "test"):
        assert a[split].read_text() == b[split].read_text()
        for rec in json.loads(a[split].read_text()):
            assert (tmp_path / "a" / rec["image"]).read_bytes() == (tmp_path / "b" / rec["image"]).read_bytes()
    other = generate(DemoCorpusSpec(seed=4, train_images=30), tmp_path / "c")
    assert other["train"].read_text() != a["train"].read_text()


def test_splits_are_clean(tmp_path):
    spec = DemoCorpusSpec(seed=0, train_images=400, pretrain_images=400)
    seen, held = split_combinations(spec)
    assert len(held) == 40 and len(seen) == 224 and not set(seen) & set(held)
    paths = generate(spec, tmp_path, splits=("pretrain", "train", "test", "val"))
    for split in ("pretrain", "train"):
        used = {r["combination"] for r in json.loads(paths[split].read_text())}
        assert not used & set(held), f"{split} leaks held-out combinations"
    for split in ("test", "val"):
        recs = json.loads(paths[split].read_text())
        assert sorted(r["combination"] for r in recs) == list(range(264))  # every combination exactly once
    # test and val draw different images of the same combinations
    t, v = (json.loads(paths[s].read_text()) for s in ("test", "val"))
    assert (tmp_path / t[0]["image"]).read_bytes() != (tmp_path / v[0]["image"]).read_bytes()


def test_captions_bind_attributes_and_relations():
    combos = combinations()
    assert len(combos) == 264
    all_caps = [c for combo in combos for c in captions(combo)]
    assert len(set(all_caps)) == len(all_caps)  # no caption is shared by two combinations
    a_left = captions((0, 4, "horizontal"))  # red circle, green square
    assert a_left[0] == "a red circle left of a green square" and a_left[1] == "a green square right of a red circle"
    swapped = captions((4, 0, "horizontal"))
    assert swapped[0] == "a green square left of a red circle"  # same words, other binding: a hard negative
    assert all(len(captions(c)) == 5 for c in combos)


def test_confusable_are_the_one_edit_neighbours():
    combos = combinations()

    def parts(c):  # sorted colours and shapes of a combination's two objects
        a, b, _ = combos[c]
        return sorted([TYPES[a][0], TYPES[b][0]]), sorted([TYPES[a][1], TYPES[b][1]])

    for c in range(len(combos)):
        a, b, axis = combos[c]
        # brute force: same colours and shapes, and either the same axis or the same ordered objects
        expected = sorted(d for d in range(len(combos)) if d != c and parts(d) == parts(c)
                          and (combos[d][2] == axis or combos[d][:2] == (a, b)))
        assert confusable(c) == expected
    red_circle, red_square, green_square = TYPES.index(("red", "circle")), TYPES.index(("red", "square")), \
        TYPES.index(("green", "square"))
    assert len(confusable(combos.index((red_circle, green_square, "horizontal")))) == 4
    # one colour for both objects: exchanging colours changes nothing and exchanging shapes swaps the objects
    assert len(confusable(combos.index((red_circle, red_square, "vertical")))) == 2


def test_further_galleries_hold_every_combination_in_new_images(tmp_path):
    spec = DemoCorpusSpec(seed=0, train_images=10, pretrain_images=10)
    paths = generate(spec, tmp_path, splits=("test", "test-1", "test-2", "val-1"))
    recs = {s: json.loads(p.read_text()) for s, p in paths.items()}
    for s, r in recs.items():
        assert sorted(x["combination"] for x in r) == list(range(264)), s
        assert len({x["image_id"] for x in r}) == 264
    ids = [x["image_id"] for r in recs.values() for x in r]
    assert len(set(ids)) == len(ids)  # galleries never share an id
    pixels = lambda s, i: (tmp_path / recs[s][i]["image"]).read_bytes()
    assert len({pixels(s, 0) for s in recs}) == 4  # four different draws of combination 0
    # a gallery does not depend on which others are generated beside it
    again = generate(spec, tmp_path / "again", splits=("test",))
    assert json.loads(again["test"].read_text()) == recs["test"]
