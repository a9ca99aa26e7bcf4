"""evaluate against a brute-force numpy recall over the same embeddings, and the teacher re-rank."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, write_albef_corpus
from pipeline.models import DualEncoder


def brute_recall(img, txt, image_of_text):
    """Independent reference: full similarity matrix, argsort, hit if a positive is in the top K."""
    sims = img @ txt.T
    out = {"i2t": {}, "t2i": {}}
    i2t_order = np.argsort(-sims, axis=1, kind="stable")
    t2i_order = np.argsort(-sims.T, axis=1, kind="stable")
    for k in (1, 5, 10):
        out["i2t"][f"R@{k}"] = 100 * np.mean([any(image_of_text[t] == i for t in i2t_order[i, :k])
                                              for i in range(len(img))])
        out["t2i"][f"R@{k}"] = 100 * np.mean([image_of_text[t] in t2i_order[t, :k] for t in range(len(txt))])
    out["rsum"] = sum(out["i2t"].values()) + sum(out["t2i"].values())
    return out


def test_recall_equals_brute_force(tmp_path, tiny_clip):
    ann = write_albef_corpus(tmp_path / "test", n_images=30)
    cli("evaluate", "--data", ann, "--model", tiny_clip, "--out", tmp_path / "eval")
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    enc = DualEncoder(str(tiny_clip))
    records = json.loads(ann.read_text())
    paths = [str(ann.parent / r["image"]) for r in records]
    texts = [c for r in records for c in r["caption"]]
    image_of_text = np.repeat(np.arange(len(records)), 5)
    want = brute_recall(enc.encode_images(paths, progress=False), enc.encode_texts(texts, progress=False), image_of_text)
    for d in ("i2t", "t2i"):
        for k in ("R@1", "R@5", "R@10"):
            assert got[d][k] == pytest.approx(want[d][k], abs=1e-9), (d, k)
    assert got["rsum"] == pytest.approx(want["rsum"])
    assert 0 < got["rsum"] < 600
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| student |" in report and f"{got['rsum']:.1f}" in report


def test_rerank_reorders_only_the_top_k_by_teacher_score(tmp_path, tiny_clip, tiny_blip, monkeypatch):
    """With a teacher that knows the answer, re-ranking the top k puts every positive found there first."""
    ann = write_albef_corpus(tmp_path / "test", n_images=30)

    def scoring(teacher, corpus, img_rows, txt_rows, *a, **kw):
        truth = np.array([corpus.text_image_ids[t] == corpus.image_ids[i] for i, t in zip(img_rows, txt_rows)])
        return truth.astype(np.float32)

    monkeypatch.setattr("pipeline.retrieval.score_pairs", scoring)
    cli("evaluate", "--data", ann, "--model", tiny_clip, "--out", tmp_path / "eval", "--rerank-teacher", tiny_blip,
        "--k-test", "12")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rr = m["rerank"]
    # the oracle moves every hit within the top 12 to rank 1, and the student had no hit elsewhere in the top 10
    for d in ("i2t", "t2i"):
        assert rr[d]["R@1"] == rr[d]["R@5"] == rr[d]["R@10"] >= m[d]["R@10"] > m[d]["R@1"]
    assert rr["k_test"] == 12 and "teacher re-rank" in (tmp_path / "eval" / "report.md").read_text()

    # rank agreement, recomputed with scipy over the brute-force student top 12 and the oracle's scores
    from scipy import stats

    enc = DualEncoder(str(tiny_clip))
    records = json.loads(ann.read_text())
    img = enc.encode_images([str(ann.parent / r["image"]) for r in records], progress=False)
    txt = enc.encode_texts([c for r in records for c in r["caption"]], progress=False)
    image_of_text = np.repeat(np.arange(len(records)), 5)
    sims = img @ txt.T
    for d, s, truth in (("i2t", sims, lambda q, c: image_of_text[c] == q),
                        ("t2i", sims.T, lambda q, c: image_of_text[q] == c)):
        top = np.argsort(-s, axis=1, kind="stable")[:, :12]
        taus = [stats.kendalltau(s[q, top[q]], [float(truth(q, c)) for c in top[q]], variant="b").statistic
                for q in range(len(s))]
        assert m["agreement"][d]["kendall_tau"] == pytest.approx(np.nanmean(taus), abs=1e-4), d
    assert "rank agreement" in (tmp_path / "eval" / "report.md").read_text()


def test_missing_model_is_a_clear_error(tmp_path):
    ann = write_albef_corpus(tmp_path / "test", n_images=5)
    r = cli("evaluate", "--data", ann, "--model", tmp_path / "nope", "--out", tmp_path / "e", expect=2)
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"{tmp_path / 'nope'}: no such model folder" in line
    assert not (tmp_path / "e" / "metrics.json").exists()


@pytest.mark.parametrize("k", ["0", "-2", "1"])
def test_k_test_below_two_is_refused(tmp_path, tiny_clip, k):
    ann = write_albef_corpus(tmp_path / "test", n_images=5)
    r = cli("evaluate", "--data", ann, "--model", tiny_clip, "--out", tmp_path / "e", "--k-test", k, expect=2)
    assert r.output.strip().splitlines()[-1] == f"error: --k-test: must be >= 2, got {k}"


def test_evaluation_keeps_the_artifact_contract(tmp_path, tiny_clip, tiny_blip):
    """Up to date on a rerun; another model into the same folder is refused (nothing overwritten), --force replaces."""
    from conftest import save_tiny_clip

    ann = write_albef_corpus(tmp_path / "test", n_images=12)
    out = tmp_path / "eval"
    cli("evaluate", "--data", ann, "--model", tiny_clip, "--out", out, "--rerank-teacher", tiny_blip, "--k-test", "4")
    before = (out / "metrics.json").read_bytes()
    assert "up to date" in cli("evaluate", "--data", ann, "--model", tiny_clip, "--out", out,
                               "--rerank-teacher", tiny_blip, "--k-test", "4").output
    other = save_tiny_clip(tmp_path / "other-clip", seed=5)
    line = cli("evaluate", "--data", ann, "--model", other, "--out", out, expect=2).output.strip().splitlines()[-1]
    assert "made with different settings" in line and "use --force" in line
    assert (out / "metrics.json").read_bytes() == before  # the re-rank section did not vanish
    cli("evaluate", "--data", ann, "--model", other, "--out", out, "--force")
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == str(other) and "rerank" not in m and m["split"] == "test"


def test_teacher_cache_scores_each_pair_once_and_changes_nothing(tmp_path, tiny_clip, tiny_blip, monkeypatch):
    from pipeline import retrieval

    ann = write_albef_corpus(tmp_path / "test", n_images=12)
    plain = tmp_path / "plain"
    cli("evaluate", "--data", ann, "--model", tiny_clip, "--out", plain, "--rerank-teacher", tiny_blip, "--k-test", "6")
    scored = []
    original = retrieval.score_pairs

    def counting(teacher, corpus, img_rows, txt_rows, *a, **kw):
        scored.append(len(img_rows))
        return original(teacher, corpus, img_rows, txt_rows, *a, **kw)

    monkeypatch.setattr(retrieval, "score_pairs", counting)
    args = ("--data", ann, "--model", tiny_clip, "--rerank-teacher", tiny_blip, "--k-test", "6",
            "--teacher-cache", tmp_path / "cache")
    cli("evaluate", *args, "--out", tmp_path / "a")
    cli("evaluate", *args, "--out", tmp_path / "b")
    assert scored[0] > 0 and scored[1] == 0  # the second evaluation found every pair in the cache
    want, a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("plain", "a", "b"))
    for m in (a, b):
        assert m["rerank"]["rsum"] == want["rerank"]["rsum"]
        for d in ("i2t", "t2i"):
            assert m["agreement"][d]["kendall_tau"] == pytest.approx(want["agreement"][d]["kendall_tau"], abs=1e-6)


def test_test_images_from_the_training_corpus_are_refused_or_reported(tmp_path, scored_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(scored_run, run)
    cli("distill", "--run", run, "--max-steps", "1", "--batch-size", "16", "--num-negatives", "4", "--device", "cpu")
    train = json.loads((run / "mine" / "manifest.json").read_text())["config"]["data"]
    result = cli("evaluate", "--run", run, "--data", train, "--device", "cpu", expect=2)
    assert "24 of the 24 test images are in the corpus" in result.output and "--allow-overlap" in result.output
    assert not (run / "eval").exists()
    # through --model too: the distill output names its run
    result = cli("evaluate", "--model", run / "distill" / "final", "--data", train, "--out", tmp_path / "e",
                 "--device", "cpu", expect=2)
    assert "test images are in the corpus" in result.output
    cli("evaluate", "--run", run, "--data", train, "--allow-overlap", "--device", "cpu")
    overlap = json.loads((run / "eval" / "metrics.json").read_text())["overlap"]
    assert overlap["images"] == 24 and overlap["captions"] == 120
    # copies of 5 training images under other names, among 7 new ones: found by their bytes
    copies = tmp_path / "copies"
    (copies / "images").mkdir(parents=True)
    records = json.loads(Path(train).read_text())[:5]
    for i, r in enumerate(records):
        shutil.copy(Path(train).parent / r["image"], copies / "images" / f"copy{i}.png")
        r["image"] = f"images/copy{i}.png"
    fresh = write_albef_corpus(tmp_path / "fresh", n_images=7, seed=3)
    for r in json.loads(fresh.read_text()):
        shutil.copy(fresh.parent / r["image"], copies / "images" / Path(r["image"]).name)
        records.append(r)
    (copies / "ann.json").write_text(json.dumps(records))
    result = cli("evaluate", "--run", run, "--data", copies / "ann.json", "--out", tmp_path / "c", "--device", "cpu",
                 expect=2)
    assert "5 of the 12 test images are in the corpus" in result.output


def test_rerank_teacher_train_teacher_is_the_runs_fine_tuned_teacher(tmp_path, mined_run, tiny_clip, tiny_blip):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(mined_run, run)
    ann = write_albef_corpus(tmp_path / "test", n_images=6, seed=5)
    args = ("--data", ann, "--model", tiny_clip, "--rerank-teacher", "train-teacher", "--k-test", "4",
            "--device", "cpu")
    # before train-teacher has run, the shortcut says what to run (not that the hub cannot be reached)
    line = cli("evaluate", "--run", run, *args, "--out", tmp_path / "e", expect=2).output.strip().splitlines()[-1]
    assert "train-teacher" in line and "hub" not in line
    line = cli("evaluate", *args, "--out", tmp_path / "e", expect=2).output.strip().splitlines()[-1]
    assert line == "error: --rerank-teacher train-teacher is the fine-tuned teacher of --run; give --run"
    cli("train-teacher", "--run", run, "--teacher", tiny_blip, "--batch-size", "32", "--lr", "1e-3", "--device", "cpu",
        "--max-steps", "1", "--train", "head")
    cli("evaluate", "--run", run, *args, "--out", tmp_path / "e")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["rerank"]["teacher"] == str(run / "teacher-train" / "final")
    made = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert made["locations"]["teacher"] == str((run / "teacher-train" / "final").resolve())
    assert "model.safetensors" in made["identity"]["teacher"]["files"]
