"""train-teacher: a fine-tuned tiny BLIP re-ranks held-out queries better than the untouched one; resume after a
kill gives the same weights; score-teacher takes it and records the lineage; bad models are refused."""
import json
import math
import shutil
import signal
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, cli_subprocess
from pipeline.artifacts import SUCCESS
from pipeline.corpus import load_tables
from pipeline.data import BatchSpec, MatchingBatches, Processors
from pipeline.demo.corpus import DemoCorpusSpec, generate
from pipeline.teachers import load_teacher

FAST = ("--batch-size", "32", "--lr", "1e-3", "--device", "cpu")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, tiny_clip):
    """The demo's shapes corpus (300 training images; 40 held-out validation images), mined by the tiny CLIP."""
    root = tmp_path_factory.mktemp("shapes")
    paths = generate(DemoCorpusSpec(seed=0, train_images=300), root / "data", splits=("train", "val"))
    held_out = root / "data" / "held-out.json"
    held_out.write_text(json.dumps(json.loads(paths["val"].read_text())[:40]))
    cli("mine", "--run", root / "run", "--data", paths["train"], "--student", tiny_clip, "--k", "8", "--device", "cpu")
    return root / "run", held_out


@pytest.fixture
def run(shapes, tmp_path):
    shutil.copytree(shapes[0], tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def rerank_rsum(model, data, teacher, out):
    """The teacher re-ranking all 40 held-out images (k_test = the gallery): its own ranking quality."""
    cli("evaluate", "--model", model, "--data", data, "--rerank-teacher", teacher, "--k-test", "40", "--out", out,
        "--device", "cpu")
    return json.loads((out / "metrics.json").read_text())["rerank"]["rsum"]


def test_fine_tuned_teacher_beats_the_untouched_one_on_held_out_queries(run, shapes, tiny_clip, tiny_blip, tmp_path):
    cli("train-teacher", "--run", run, "--teacher", tiny_blip, *FAST, "--epochs", "3")
    final = run / "teacher-train" / "final"
    rows = [json.loads(l) for l in (run / "teacher-train" / "metrics.jsonl").read_text().splitlines()]
    assert {"itm", "accuracy", "loss", "lr", "false_negatives"} <= set(rows[0])
    assert len(rows) == 3 * math.ceil((300 + 1500) / 32)                 # 3 epochs of every mined query
    before = rerank_rsum(tiny_clip, shapes[1], tiny_blip, tmp_path / "before")
    after = rerank_rsum(tiny_clip, shapes[1], final, tmp_path / "after")
    assert after > before + 10, (before, after)
    # it loads as a teacher, with its processor and tokenizer
    assert type(load_teacher(str(final)).model).__name__ == "BlipForImageTextRetrieval"


def test_killed_run_resumes_to_the_same_weights(run, tiny_blip, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(run, ref, symlinks=True)
    args = ("--teacher", tiny_blip, *FAST, "--max-steps", "6", "--save-every", "2", "--grad-accum", "2")
    cli("train-teacher", "--run", ref, *args)
    proc = cli_subprocess("train-teacher", "--run", run, *args, env={"CPRD_FAULT": "step:3"})
    assert proc.returncode == -signal.SIGKILL and not (run / "teacher-train" / SUCCESS).exists()
    out = cli("train-teacher", "--run", run, *args).output
    assert "resuming from step-2: step 2" in out
    a, b = (load_file(r / "teacher-train" / "final" / "model.safetensors") for r in (run, ref))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert "up to date" in cli("train-teacher", "--run", run, *args).output
    # a longer run continues from the last checkpoint (step 6) instead of asking for --force
    longer = [a if a != "6" else "8" for a in args]
    assert "extending: 6 steps trained, continuing to 8" in cli("train-teacher", "--run", run, *longer).output
    rows = [json.loads(l) for l in (run / "teacher-train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_score_teacher_takes_the_fine_tuned_teacher_and_records_its_lineage(run, tiny_blip):
    cli("train-teacher", "--run", run, "--teacher", tiny_blip, *FAST, "--max-steps", "1", "--train", "head")
    trained = json.loads((run / "teacher-train" / "manifest.json").read_text())
    out = cli("score-teacher", "--run", run, "--teacher", "train-teacher", "--device", "cpu").output
    assert "fine-tuned teacher" in out
    identity = json.loads((run / "teacher" / "manifest.json").read_text())["identity"]
    assert identity["lineage"]["fingerprint"] == trained["fingerprint"]
    assert identity["lineage"]["base"] == trained["identity"]["teacher"]
    manifest = json.loads((run / "teacher" / "manifest.json").read_text())
    assert manifest["locations"]["teacher"] == str((run / "teacher-train" / "final").resolve())
    assert "model.safetensors" in identity["teacher"]["files"] and "path" not in identity["teacher"]


def test_head_only_trains_the_head(run, tiny_blip):
    cli("train-teacher", "--run", run, "--teacher", tiny_blip, *FAST, "--max-steps", "2", "--train", "head")
    a = load_file(run / "teacher-train" / "final" / "model.safetensors")
    b = load_file(tiny_blip / "model.safetensors")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("itm_head.") for k in changed), changed


def test_vilt_and_blip_itc_run(run, tiny_vilt, tiny_blip, tmp_path):
    cli("train-teacher", "--run", run, "--teacher", tiny_vilt, *FAST, "--max-steps", "1", "--out", tmp_path / "vilt")
    cli("train-teacher", "--run", run, "--teacher", tiny_blip, *FAST, "--max-steps", "1", "--itc-weight", "0.5",
        "--out", tmp_path / "itc")
    row = json.loads((tmp_path / "itc" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == pytest.approx(row["itm"] + 0.5 * row["itc"], rel=1e-5)


@pytest.mark.parametrize("flags, message", [
    (("--itc-weight", "1"), "--itc-weight: the ITC term trains BLIP's contrastive towers; ViltForImageAndTextRetrieval is trained on ITM only"),
    (("--lr", "0"), "--lr: must be > 0, got 0.0"),
    (("--max-steps", "0"), "--max-steps: must be >= 1, got 0"),
    (("--itc-weight", "-1"), "--itc-weight: must be >= 0, got -1.0"),
])
def test_bad_options_are_refused(run, tiny_vilt, flags, message):
    result = cli("train-teacher", "--run", run, "--teacher", tiny_vilt, "--device", "cpu", *flags, expect=2)
    assert message in result.output and not (run / "teacher-train").exists()


def test_a_model_without_a_matching_head_is_refused(run, tiny_clip):
    result = cli("train-teacher", "--run", run, "--teacher", tiny_clip, "--device", "cpu", expect=2)
    assert "model type 'clip' is not a supported cross-encoder" in result.output
    assert len(result.output.strip().splitlines()[-1]) < 300 and not (run / "teacher-train").exists()


def test_negatives_are_drawn_by_student_similarity_and_never_match(shapes, tiny_blip):
    """Over many epochs, a query's drawn hard negative follows softmax(cosine / T) over its non-matching
    candidates (computed here from the shard row); a matching caption is never drawn."""
    run, _ = shapes
    manifest = json.loads((run / "mine" / "manifest.json").read_text())
    files = [run / "mine" / p["file"] for p in manifest["shard_plan"]]
    corpus = load_tables(run / "mine" / "corpus")
    teacher = load_teacher(str(tiny_blip))
    tok = teacher.tokenizer
    norm = lambda text: tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
    procs = Processors(teacher.image_processor, tok, teacher.max_length)
    spec = BatchSpec(batch_size=4, num_negatives=5, seed=0, shuffle_buffer=0)
    rows = pq.read_table(files[0]).slice(0, 4).to_pydict()
    assert rows["direction"][0] == "i2t"                   # the first query is an image
    T, counts = 0.05, Counter()
    for epoch in range(400):
        b = MatchingBatches(spec, files, corpus, procs, epoch, batches=1, temperature=T).build(rows)
        assert b["label"].tolist().count(1.0) == 4           # one positive pair per query
        hard = int(b["positive_pairs"][0]) + 1              # the pair after a query's positive: its hard negative
        assert b["label"][hard] == 0 and int(b["positive_pairs"][1]) == hard + 1
        counts[tok.decode(b["input_ids"][b["pair_text"][hard]], skip_special_tokens=True)] += 1
    text_of = dict(zip(corpus.text_ids, corpus.texts))
    image_row = list(corpus.image_ids).index(rows["query_id"][0])
    own = {norm(t) for t, i in zip(corpus.texts, corpus.text_image_rows()) if i == image_row}
    cands = [(norm(text_of[c]), s) for c, s in zip(rows["candidate_ids"][0][:5], rows["student_scores"][0][:5])]
    top = max(s for t, s in cands if t not in own)
    weights = Counter()
    for text, s in cands:
        if text not in own:
            weights[text] += math.exp((s - top) / T)
    assert set(counts) <= set(weights)                      # never one of the image's own captions
    for text, w in weights.items():
        assert counts[text] / 400 == pytest.approx(w / sum(weights.values()), abs=0.08), text
