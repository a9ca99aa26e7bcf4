"""score-teacher: equivalence with each model's own forward, one vision pass per image, the contract, bad input."""
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import assert_rows_match, cli, cli_subprocess, save_tiny_blip, torchrun
from pipeline.artifacts import SUCCESS


def corpus_images(run):
    """RUN/mine's image table with absolute paths (stored relative to the image root it records)."""
    from pipeline.corpus import load_tables

    c = load_tables(run / "mine" / "corpus")
    return {"image_id": c.image_ids, "path": c.image_paths}


@pytest.fixture
def run(tmp_path, mined_run) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(mined_run, dst)
    shutil.rmtree(dst / "teacher", ignore_errors=True)
    return dst


def score(run, teacher, *extra, expect=0):
    return cli("score-teacher", "--run", run, "--teacher", teacher, "--images-per-shard", "5",
               "--batch-size", "16", "--image-batch-size", "3", *extra, expect=expect)


def teacher_rows(run: Path) -> list[dict]:
    return [r for f in sorted((run / "teacher").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def reference_scores(kind: str, model_dir: Path, run: Path, pairs: list[tuple[str, str]]) -> np.ndarray:
    """Each pair through the model's own standard forward, one pair at a time, image processed alone."""
    from PIL import Image
    from transformers import (AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval,
                              ViltForImageAndTextRetrieval)

    images = corpus_images(run)
    texts = pq.read_table(run / "mine" / "corpus" / "texts.parquet").to_pydict()
    path = dict(zip(images["image_id"], images["path"]))
    text = dict(zip(texts["text_id"], texts["text"]))
    proc, tok = AutoImageProcessor.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    cls = BlipForImageTextRetrieval if kind == "blip" else ViltForImageAndTextRetrieval
    model = cls.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for iid, tid in pairs:
            px = proc(images=Image.open(path[iid]).convert("RGB"), return_tensors="pt")
            t = tok([text[tid]], return_tensors="pt")
            if kind == "blip":
                logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                               pixel_values=px["pixel_values"], use_itm_head=True).itm_score
                out.append(float(logits[0, 1] - logits[0, 0]))
            else:
                out.append(float(model(**t, pixel_values=px["pixel_values"],
                                       pixel_mask=px.get("pixel_mask")).logits[0, 0]))
    return np.array(out)


@pytest.mark.parametrize("kind", ["blip", "blip-no-kv-cache", "vilt"])
def test_scores_equal_the_models_own_forward(run, kind, tiny_blip, tiny_vilt):
    model_dir = tiny_vilt if kind == "vilt" else tiny_blip
    score(run, model_dir, *(["--no-kv-cache"] if kind == "blip-no-kv-cache" else []))
    kind = kind.split("-")[0]
    rows = teacher_rows(run)
    candidates = [r for f in sorted((run / "mine" / "candidates").glob("*.parquet"))
                  for r in pq.read_table(f).to_pylist()]
    assert [{k: r[k] for k in c} for r, c in zip(rows, candidates)] == candidates  # the candidate columns pass through unchanged

    # every stored score (both directions, candidates and positives) against a per-pair forward
    pairs, stored = [], []
    for r in rows[::3]:
        for ids, scores in ((r["candidate_ids"], r["teacher_scores"]), (r["positive_ids"], r["positive_teacher_scores"])):
            assert len(ids) == len(scores)
            for other, s in zip(ids, scores):
                pairs.append((r["query_id"], other) if r["direction"] == "i2t" else (other, r["query_id"]))
                stored.append(s)
    ref = reference_scores(kind, model_dir, run, pairs)
    np.testing.assert_allclose(stored, ref, atol=1e-4, rtol=0)
    assert np.std(ref) > 0  # the comparison is not between constants


def test_vision_tower_runs_once_per_unique_image(run, tiny_blip, monkeypatch):
    from transformers.models.blip import modeling_blip

    seen = []
    original = modeling_blip.BlipVisionModel.forward

    def counting(self, pixel_values=None, **kw):
        seen.append(pixel_values.shape[0])
        return original(self, pixel_values=pixel_values, **kw)

    monkeypatch.setattr(modeling_blip.BlipVisionModel, "forward", counting)
    score(run, tiny_blip)
    pairs = pq.read_table(run / "teacher" / "pairs" / "part-00000.parquet")
    all_pairs = [pq.read_table(f) for f in sorted((run / "teacher" / "pairs").glob("*.parquet"))]
    unique_images = {i for t in all_pairs for i in t["image_id"].to_pylist()}
    assert sum(seen) == len(unique_images) == 24
    assert pairs.num_rows > 24  # far more pairs than images: the reuse is real
    keys = [(i, t) for tab in all_pairs for i, t in zip(tab["image_id"].to_pylist(), tab["text_id"].to_pylist())]
    assert len(keys) == len(set(keys))  # deduplicated across directions


def test_itc_encodes_each_caption_once_per_pair_shard(run, tiny_blip, monkeypatch):
    """ITC's caption side does not see the image: a caption in many pairs is encoded once per pair shard, not
    once per pair (the scores themselves are checked against BLIP's forward below)."""
    from pipeline.teachers import BlipITM

    seen = []
    original = BlipITM.itc_text_features

    def counting(self, tokens):
        seen.append(tokens["input_ids"].shape[0])
        return original(self, tokens)

    monkeypatch.setattr(BlipITM, "itc_text_features", counting)
    score(run, tiny_blip, "--score", "itm+itc", "--itc-weight", "2")
    shards = [pq.read_table(f).to_pydict() for f in sorted((run / "teacher" / "pairs").glob("*.parquet"))]
    pairs = sum(len(t["text_id"]) for t in shards)
    assert sum(seen) == sum(len(set(t["text_id"])) for t in shards) < pairs


def test_itm_plus_itc_adds_the_contrastive_cosine(run, tiny_blip, tmp_path):
    score(run, tiny_blip)
    itm = teacher_rows(run)
    run2 = tmp_path / "run2"
    shutil.copytree(run, run2)
    score(run2, tiny_blip, "--score", "itm+itc", "--itc-weight", "2", "--force")
    both = teacher_rows(run2)
    # independent ITC: BLIP's own forward with use_itm_head=False returns the cosine
    from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval
    from PIL import Image
    images = corpus_images(run)
    texts = pq.read_table(run / "mine" / "corpus" / "texts.parquet").to_pydict()
    path, text = dict(zip(images["image_id"], images["path"])), dict(zip(texts["text_id"], texts["text"]))
    model = BlipForImageTextRetrieval.from_pretrained(tiny_blip).eval()
    proc, tok = AutoImageProcessor.from_pretrained(tiny_blip), AutoTokenizer.from_pretrained(tiny_blip)
    r_itm, r_both = itm[0], both[0]
    assert r_itm["direction"] == "i2t"
    with torch.no_grad():
        px = proc(images=Image.open(path[r_itm["query_id"]]).convert("RGB"), return_tensors="pt")["pixel_values"]
        for tid, s_itm, s_both in zip(r_itm["candidate_ids"], r_itm["teacher_scores"], r_both["teacher_scores"]):
            t = tok([text[tid]], return_tensors="pt")
            cos = float(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=px,
                              use_itm_head=False).itm_score[0])
            assert s_both == pytest.approx(s_itm + 2 * cos, abs=1e-4)


def test_rerun_no_op_and_kill_resume(run, tiny_blip, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    score(ref, tiny_blip)
    assert "up to date" in score(ref, tiny_blip).output

    # the killed process runs with the same batch flags as the reference: then the output is bit-identical
    proc = cli_subprocess("score-teacher", "--run", run, "--teacher", tiny_blip, "--images-per-shard", "5",
                          "--batch-size", "16", "--image-batch-size", "3", "--device", "cpu",
                          env={"CPRD_FAULT": "shard:3"})
    assert proc.returncode == -signal.SIGKILL and not (run / "teacher" / SUCCESS).exists()
    assert "partial" in cli("status", "--run", run).output
    out = score(run, tiny_blip).output
    assert "resuming" in out
    assert teacher_rows(run) == teacher_rows(ref)


def test_other_batch_sizes_give_the_same_scores_within_rounding(run, tiny_blip, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    score(ref, tiny_blip)
    cli("score-teacher", "--run", run, "--teacher", tiny_blip, "--images-per-shard", "5", "--batch-size", "7",
        "--image-batch-size", "2", "--device", "cpu")
    assert_rows_match(teacher_rows(run), teacher_rows(ref), ("student_scores", "teacher_scores",
                                                            "positive_teacher_scores"), atol=1e-5)


def test_two_processes_score_like_one(run, tiny_blip, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    score(ref, tiny_blip)
    cli_subprocess("score-teacher", "--run-dir", run, "--teacher", tiny_blip, "--images-per-shard", "5",
                   "--device", "cpu", launcher=torchrun(2), check=True)
    assert_rows_match(teacher_rows(run), teacher_rows(ref), ("student_scores", "teacher_scores",
                                                            "positive_teacher_scores"), atol=1e-5)


# ------------------------------------------------------------------ bad input
def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    return result.output.strip().splitlines()[-1]


def test_mine_incomplete(run, tiny_blip):
    (run / "mine" / SUCCESS).unlink()
    assert "mine is incomplete" in _error_line(score(run, tiny_blip, expect=None))
    shutil.rmtree(run / "mine")
    assert "no mine output here" in _error_line(score(run, tiny_blip, expect=None))


def test_teacher_without_itm_head(run, tmp_path, tiny_blip, tiny_clip):
    from transformers import BlipModel
    plain = tmp_path / "blip-plain"
    shutil.copytree(tiny_blip, plain)
    BlipModel.from_pretrained(tiny_blip).save_pretrained(plain)  # same config family, no ITM head
    assert "no trained matching head (itm_head missing)" in _error_line(score(run, plain, expect=None))
    assert "is not a supported cross-encoder" in _error_line(score(run, tiny_clip, expect=None))
    assert not (run / "teacher" / SUCCESS).exists()


def test_missing_or_changed_image_file_is_refused_before_scoring(run, tiny_blip):
    """What score-teacher reads is what mine recorded: a missing or edited image is named, nothing is scored."""
    path = Path(corpus_images(run)["path"][7])
    original = path.read_bytes()
    try:
        path.unlink()
        line = _error_line(score(run, tiny_blip, expect=None))
        assert "1 image file(s) not found" in line and "images/img0007.png" in line and "--image-root" in line
        edited = bytearray(original)
        edited[-5] ^= 0xFF                        # same size, other bytes
        path.write_bytes(bytes(edited))
        line = _error_line(score(run, tiny_blip, expect=None))
        assert "1 image file(s) changed since mine read them (images/img0007.png); run mine again" in line, line
        assert not (run / "teacher" / SUCCESS).exists()
    finally:
        path.write_bytes(original)


def test_mismatched_tokenizer(run, tmp_path):
    model = save_tiny_blip(tmp_path / "small-vocab", vocab_size=1000)  # saved with the 30522-token BERT tokenizer
    line = _error_line(cli("score-teacher", "--run", run, "--teacher", model, expect=None))
    assert "tokenizer has 30522 tokens but the model's text embeddings have 1000" in line


def test_non_finite_score_names_the_pair(run, tiny_blip, monkeypatch):
    from pipeline import teachers
    original = teachers.BlipITM.score_indexed

    def poisoned(self, state, index, tokens):
        out = original(self, state, index, tokens)
        out[0] = float("nan")
        return out

    monkeypatch.setattr(teachers.BlipITM, "score_indexed", poisoned)
    line = _error_line(score(run, tiny_blip, expect=None))
    assert "non-finite teacher score nan for pair (image '" in line and "', text '" in line
    assert not (run / "teacher" / SUCCESS).exists()


def test_kv_cache_refuses_a_model_whose_structure_differs(tiny_blip, monkeypatch):
    """The cached cross-attention calls the model's own modules by name: a model without them is refused loudly."""
    from transformers.models.blip import modeling_blip_text

    from pipeline.errors import PipelineError
    from pipeline.teachers import load_teacher

    monkeypatch.delattr(modeling_blip_text.BlipTextLayer, "feed_forward_chunk")
    with pytest.raises(PipelineError, match=r"missing: encoder.layer\[0\].feed_forward_chunk.*--no-kv-cache"):
        load_teacher(str(tiny_blip))


def test_kv_cache_computes_keys_and_values_once_per_image_of_a_batch(tiny_blip):
    """Against transformers' forward on the same pairs: equal scores, and the key projection of the cross-attention
    sees each image once per batch instead of once per pair."""
    from pipeline.teachers import load_teacher

    fast, slow = load_teacher(str(tiny_blip)), load_teacher(str(tiny_blip), kv_cache=False)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    state = fast.encode_images(pixels, None)
    index = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 2])  # not grouped: the rewrite groups and restores the order
    tokens = fast.tokenize([f"caption {i} " + "word " * i for i in range(9)])  # different lengths: padding
    calls = []
    key = fast.model.text_encoder.encoder.layer[0].crossattention.self.key
    handle = key.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        got = fast.score_indexed(state, index, tokens)
        handle.remove()
        want = slow.score_indexed(state, index, tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert calls == [3]  # three images, not nine pairs


def test_the_code_names_follow_the_verb_and_the_earlier_ones_still_work(run, tmp_path):
    import stages
    from pipeline.errors import PipelineError
    from pipeline.layout import Run
    from stages.score_teacher import MANIFEST_STAGE, ScoreTeacherConfig, TeacherConfig

    assert stages.stage("score-teacher").load()[0] is ScoreTeacherConfig is TeacherConfig
    assert stages.stage("score-teacher").directory == MANIFEST_STAGE == "teacher"   # what existing runs hold
    paths = Run(tmp_path)
    assert paths.score_teacher == paths.teacher == tmp_path / "teacher"
    assert paths.train_teacher == paths.teacher_train == tmp_path / "teacher-train"
    assert Run(tmp_path, scores=tmp_path / "b").teacher == tmp_path / "b"
    with pytest.raises(PipelineError, match="score-teacher needs --run and --teacher"):
        stages.run(TeacherConfig(run=str(run)))   # the earlier name is the same stage's config


def test_easy_candidates_are_scored_in_the_same_pass(run, tiny_blip):
    import json

    from pipeline import layout

    mined = json.loads((run / "mine" / "manifest.json").read_text())
    cli("mine", "--run", run, "--data", mined["locations"]["data"], "--student", mined["locations"]["student"],
        "--k", "6", "--shard-size", "7", "--easy", "4", "--force")
    score(run, tiny_blip)
    manifest = json.loads((run / "teacher" / "manifest.json").read_text())
    hard, easy = layout.teacher_shards(manifest), layout.teacher_shards(manifest, "easy")
    assert hard == [f"part-{i:05d}.parquet" for i in range(len(hard))]
    assert easy == [f"easy/part-{i:05d}.parquet" for i in range(len(hard))]
    rows = [r for f in easy for r in pq.read_table(run / "teacher" / f).to_pylist()]
    mine_rows = [r for f in sorted((run / "mine" / "easy").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert [{k: r[k] for k in c} for r, c in zip(rows, mine_rows)] == mine_rows    # mine's easy rows pass through
    assert teacher_rows(run) and all(len(r["candidate_ids"]) == 6 for r in teacher_rows(run))   # hard ones as before
    pairs, stored = [], []
    for r in rows[::4]:
        for ids, scores in ((r["candidate_ids"], r["teacher_scores"]), (r["positive_ids"], r["positive_teacher_scores"])):
            assert len(ids) == len(scores) and (len(ids) == 4 or ids is r["positive_ids"])
            for other, s in zip(ids, scores):
                pairs.append((r["query_id"], other) if r["direction"] == "i2t" else (other, r["query_id"]))
                stored.append(s)
    ref = reference_scores("blip", tiny_blip, run, pairs)
    np.testing.assert_allclose(stored, ref, atol=1e-4, rtol=0)
    assert np.std(ref) > 0
