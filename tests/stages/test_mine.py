"""The mine stage through its CLI: equivalence with brute force, the artifact contract, bad input."""
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import assert_rows_match, cli, cli_subprocess, torchrun
from pipeline.artifacts import SUCCESS, StageLock

ARGS = ("--k", "6", "--shard-size", "7")


def mine(run, data, student, *extra, expect=0):
    return cli("mine", "--run", run, "--data", data, "--student", student, *ARGS, *extra, expect=expect)


def candidates(run: Path) -> list[dict]:
    files = sorted((run / "mine" / "candidates").glob("part-*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file except the lock."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in directory.rglob("*") if p.is_file() and p.name != ".lock"}


def test_candidates_equal_brute_force_both_directions(tmp_path, corpus_file, tiny_clip):
    run = tmp_path / "run"
    mine(run, corpus_file, tiny_clip)
    emb = run / "mine" / "embeddings"
    img = np.load(emb / "images-00000.npy")
    txt = np.load(emb / "texts-00000.npy")
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    images = pq.read_table(run / "mine" / "corpus" / "images.parquet").to_pydict()
    texts = pq.read_table(run / "mine" / "corpus" / "texts.parquet").to_pydict()
    image_row = {iid: i for i, iid in enumerate(images["image_id"])}
    text_row = {tid: i for i, tid in enumerate(texts["text_id"])}
    rows = candidates(run)
    assert len(rows) == 24 + 120 and {r["direction"] for r in rows} == {"i2t", "t2i"}
    for r in rows:
        if r["direction"] == "i2t":
            q, cand, cand_ids = img[image_row[r["query_id"]]], txt, texts["text_id"]
            positives = [t for t, i in zip(texts["text_id"], texts["image_id"]) if i == r["query_id"]]
        else:
            q, cand, cand_ids = txt[text_row[r["query_id"]]], img, images["image_id"]
            positives = [texts["image_id"][text_row[r["query_id"]]]]
        assert sorted(r["positive_ids"]) == sorted(positives)
        assert len(positives) == (5 if r["direction"] == "i2t" else 1)
        sims = {cid: float(q @ cand[i]) for i, cid in enumerate(cand_ids) if cid not in positives}
        ref = sorted(sims.values(), reverse=True)[:6]
        np.testing.assert_allclose(r["student_scores"], ref, atol=1e-5)
        np.testing.assert_allclose(r["student_scores"], [sims[c] for c in r["candidate_ids"]], atol=1e-5)
        assert not set(r["candidate_ids"]) & set(positives)
        assert len(set(r["candidate_ids"])) == 6


def test_rerun_is_a_no_op_and_changed_config_is_refused(tmp_path, corpus_file, tiny_clip):
    run = tmp_path / "run"
    mine(run, corpus_file, tiny_clip)
    before = snapshot(run)
    out = mine(run, corpus_file, tiny_clip).output
    assert "up to date" in out and snapshot(run) == before

    out = cli("mine", "--run", run, "--data", corpus_file, "--student", tiny_clip, "--k", "4", expect=2).output
    assert out.strip().splitlines()[-1].startswith("error:") and "config.k: 6 -> 4" in out and "--force" in out
    assert snapshot(run) == before

    # --force replaces the candidates but re-uses the embeddings (same student, same corpus)
    emb_before = {k: v for k, v in before.items() if k.startswith("mine/embeddings/")}
    cli("mine", "--run", run, "--data", corpus_file, "--student", tiny_clip, "--k", "4", "--force")
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k.startswith("mine/embeddings/")} == emb_before
    assert all(len(r["candidate_ids"]) == 4 for r in candidates(run))
    manifest = json.loads((run / "mine" / "manifest.json").read_text())
    assert manifest["config"]["k"] == 4 and manifest["status"] == "complete"


def test_a_changed_corpus_names_its_files_and_a_touched_one_is_unchanged(tmp_path, corpus_file, tiny_clip):
    run = tmp_path / "run"
    mine(run, corpus_file, tiny_clip)
    images = corpus_file.parent / "images"
    for name in ("img0003.png", "img0007.png"):                    # touched: same bytes, new mtime
        os.utime(images / name, ns=(0, 42))
    assert "up to date" in mine(run, corpus_file, tiny_clip).output
    data = bytearray((images / "img0005.png").read_bytes())
    data[-5] ^= 0xFF                                               # same size, other bytes
    (images / "img0005.png").write_bytes(bytes(data))
    records = json.loads(corpus_file.read_text())
    records[2]["caption"][0] = "an edited caption"
    corpus_file.write_text(json.dumps(records))
    # the same settings over changed inputs: made again, as make would, saying what changed
    out = mine(run, corpus_file, tiny_clip).output
    assert ("[mine] its inputs changed since it was made (corpus: 1 image file(s) changed (images/img0005.png); "
            "1 caption(s) changed, added or removed); making it again") in out, out
    assert (run / "mine" / "_SUCCESS").exists() and "up to date" in mine(run, corpus_file, tiny_clip).output


def test_a_moved_image_folder_is_found_with_image_root(tmp_path, corpus_file, tiny_clip, tiny_blip):
    run = tmp_path / "run"
    mine(run, corpus_file, tiny_clip)
    stored = pq.read_table(run / "mine" / "corpus" / "images.parquet")
    assert stored.column("path")[0].as_py() == "images/img0000.png"                 # relative to the root
    assert stored.schema.metadata[b"image_root"].decode() == str(corpus_file.parent.resolve())
    moved = tmp_path / "elsewhere"
    shutil.move(corpus_file.parent, moved)
    teacher = ("score-teacher", "--run", run, "--teacher", tiny_blip, "--device", "cpu")
    line = cli(*teacher, expect=2).output.strip().splitlines()[-1]
    assert "the images were under" in line and "--image-root" in line
    assert not (run / "teacher").exists()
    cli(*teacher, "--image-root", moved)
    cli("distill", "--run", run, "--image-root", moved, "--max-steps", "1", "--batch-size", "8", "--num-negatives", "4",
        "--device", "cpu")
    # the same corpus, wherever it is: mine is up to date and says where the later stages should look
    out = mine(run, moved / corpus_file.name, tiny_clip).output
    assert "up to date" in out and f"pass --image-root {moved.resolve()}" in out


def test_config_file_and_flag_precedence(tmp_path, corpus_file, tiny_clip):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("k: 3\nshard_size: 50\ndirections: t2i\n")
    run = tmp_path / "run"
    cli("mine", "--config", cfg, "--run", run, "--data", corpus_file, "--student", tiny_clip, "--k", "5")
    manifest = json.loads((run / "mine" / "manifest.json").read_text())
    assert manifest["config"]["k"] == 5 and manifest["config"]["shard_size"] == 50
    assert manifest["config"]["directions"] == "t2i" and manifest["config"]["index"] == "flat"
    cfg.write_text("kk: 3\n")
    assert "unknown option 'kk'" in cli("mine", "--config", cfg, "--run", tmp_path / "r2", expect=2).output


def test_second_writer_is_refused(tmp_path, corpus_file, tiny_clip):
    run = tmp_path / "run"
    lock = StageLock(run / "mine")
    lock.acquire()
    try:
        out = mine(run, corpus_file, tiny_clip, expect=2).output
        assert "being written by another process (pid" in out
    finally:
        lock.release()
    mine(run, corpus_file, tiny_clip)


def test_truncated_shard_is_detected_and_redone(tmp_path, corpus_file, tiny_clip):
    run = tmp_path / "run"
    mine(run, corpus_file, tiny_clip)
    reference = candidates(run)
    shard = run / "mine" / "candidates" / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    other = run / "mine" / "candidates" / "part-00003.parquet"
    other_stat = other.stat().st_mtime_ns
    assert "partial" in cli("status", "--run", run).output
    out = mine(run, corpus_file, tiny_clip).output
    assert "1 shard(s) missing or failing their checksum" in out
    assert candidates(run) == reference and other.stat().st_mtime_ns == other_stat
    assert (run / "mine" / SUCCESS).exists()


def _mine_argv(run, data, student):
    return ["mine", "--run-dir", run, "--data", data, "--student", student, *ARGS, "--device", "cpu"]


def test_killed_run_resumes_to_identical_output(tmp_path, corpus_file, tiny_clip):
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    mine(ref_run, corpus_file, tiny_clip)
    # SIGKILL after the 6th shard: corpus tables, embeddings and some candidate shards are written
    proc = cli_subprocess(*_mine_argv(run, corpus_file, tiny_clip), env={"CPRD_FAULT": "shard:6"})
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "mine" / SUCCESS).exists()
    done_before = set(p.name for p in (run / "mine" / "candidates").glob("*.parquet"))
    assert 0 < len(done_before) < 21
    assert "partial" in cli("status", "--run", run).output
    out = mine(run, corpus_file, tiny_clip).output
    assert "resuming" in out and "embeddings up to date" in out
    # embedded in another process: ids equal, cosines within rounding
    assert_rows_match(candidates(run), candidates(ref_run), ("student_scores",))


def test_two_processes_match_one_and_resume_with_one(tmp_path, corpus_file, tiny_clip):
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    mine(ref_run, corpus_file, tiny_clip)
    proc = cli_subprocess(*_mine_argv(run, corpus_file, tiny_clip), launcher=torchrun(2), check=True)
    assert_rows_match(candidates(run), candidates(ref_run), ("student_scores",))
    assert proc.stderr.count("resolved config") == 1  # only the main process logs

    # a 2-process run killed part-way, finished by a single process
    run2 = tmp_path / "run2"
    proc = cli_subprocess(*_mine_argv(run2, corpus_file, tiny_clip), launcher=torchrun(2),
                          env={"CPRD_FAULT": "shard:4"})
    assert proc.returncode != 0 and not (run2 / "mine" / SUCCESS).exists()
    mine(run2, corpus_file, tiny_clip)
    assert_rows_match(candidates(run2), candidates(ref_run), ("student_scores",))


# ------------------------------------------------------------------ bad input
def _assert_clean_error(result, pattern, run):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and lines[-1].startswith("error:"), result.output
    import re
    assert re.search(pattern, lines[-1]), lines[-1]
    assert not (run / "mine" / SUCCESS).exists()


def test_unreadable_image_and_the_retry_once_it_is_fixed(tmp_path, corpus_file, tiny_clip):
    bad = corpus_file.parent / "images" / "img0003.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not a png at all")
    run = tmp_path / "run"
    _assert_clean_error(mine(run, corpus_file, tiny_clip, expect=None), r"unreadable image .*img0003\.png", run)
    # fixed: the corpus changed, but the failed attempt finished only its corpus tables, so no --force is needed
    bad.write_bytes(good)
    assert "replacing an attempt with other settings that finished no shard" in mine(run, corpus_file, tiny_clip).output
    assert (run / "mine" / SUCCESS).exists()


def test_missing_image(tmp_path, corpus_file, tiny_clip):
    (corpus_file.parent / "images" / "img0005.png").unlink()
    run = tmp_path / "run"
    _assert_clean_error(mine(run, corpus_file, tiny_clip, expect=None), r"image file not found: .*img0005\.png", run)


@pytest.mark.parametrize("mutate,pattern", [
    (lambda r: r[2]["caption"].__setitem__(1, ""), r"empty caption \(record 2, caption 1\)"),
    (lambda r: r.append(dict(r[0])), r"duplicate image id 'images/img0000.png' \(record 24\)"),
])
def test_bad_annotations(tmp_path, corpus_file, tiny_clip, mutate, pattern):
    records = json.loads(corpus_file.read_text())
    mutate(records)
    corpus_file.write_text(json.dumps(records))
    run = tmp_path / "run"
    _assert_clean_error(mine(run, corpus_file, tiny_clip, expect=None), pattern, run)


def test_unknown_format(tmp_path, corpus_file, tiny_clip):
    r = mine(tmp_path / "run", corpus_file, tiny_clip, "--format", "tsv", expect=None)
    assert r.exit_code == 2 and "'tsv' is not one of" in r.output


def test_k_too_large(tmp_path, corpus_file, tiny_clip):
    run = tmp_path / "run"
    r = cli("mine", "--run", run, "--data", corpus_file, "--student", tiny_clip, "--k", "23", expect=None)
    _assert_clean_error(r, r"--k 23 is not smaller than the 23 negative images", run)


@pytest.mark.parametrize("drop,pattern", [("preprocessor_config.json", "no image processor"),
                                          ("tokenizer.json", "no tokenizer")])
def test_model_folder_without_processor(tmp_path, corpus_file, tiny_clip, drop, pattern):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_clip, model)
    for name in ([drop] if drop != "tokenizer.json" else ["tokenizer.json", "vocab.txt", "tokenizer_config.json"]):
        (model / name).unlink(missing_ok=True)
    run = tmp_path / "run"
    _assert_clean_error(mine(run, corpus_file, model, expect=None), pattern, run)


def test_hf_dataset_with_embedded_image_bytes(tmp_path, tiny_clip):
    """Images stored inside the dataset are extracted once, outside the stage, and survive --force."""
    import datasets
    from conftest import captions, write_images

    names = write_images(tmp_path / "src", 12)
    ds = datasets.Dataset.from_dict({"image": [{"bytes": (tmp_path / "src" / n).read_bytes(), "path": None}
                                               for n in names],
                                     "text": [captions(i, 2) for i in range(12)]}).cast_column("image", datasets.Image())
    (tmp_path / "hf").mkdir()
    ds.to_parquet(str(tmp_path / "hf" / "train.parquet"))
    import shutil
    shutil.rmtree(tmp_path / "src")  # only the bytes inside the dataset remain
    run = tmp_path / "run"
    argv = ("mine", "--run", run, "--data", tmp_path / "hf", "--student", tiny_clip, "--k", "4")
    cli(*argv)
    from pipeline.corpus import load_tables
    paths = load_tables(run / "mine" / "corpus").image_paths     # stored relative to the extracted-images folder
    assert len(paths) == 12 and all(Path(p).is_file() and str((run / "images").resolve()) in p for p in paths)
    assert "up to date" in cli(*argv).output
    cli("mine", "--run", run, "--data", tmp_path / "hf", "--student", tiny_clip, "--k", "3", "--force")
    assert all(len(r["candidate_ids"]) == 3 for r in candidates(run))


def test_a_cross_encoder_is_refused_as_the_student(tmp_path, corpus_file, tiny_blip):
    """A BLIP ITM folder loads as BlipModel with its text tower and projections random: refused, naming them."""
    result = cli("mine", "--run", tmp_path / "run", "--data", corpus_file, "--student", tiny_blip, "--k", "4",
                 expect=2)
    line = result.output.strip().splitlines()[-1]
    assert f"error: {tiny_blip}: " in line and "not in the checkpoint" in line and "not a trained dual encoder" in line
    assert "text_model" in line or "text_projection" in line
    assert not (tmp_path / "run" / "mine" / SUCCESS).exists()


def test_the_same_student_from_another_folder_or_working_directory_is_the_same_input(tmp_path, corpus_file,
                                                                                      tiny_clip, monkeypatch):
    """A model is its files: the same mine with the student copied elsewhere, or given by a relative path from
    another working directory, is up to date; changed files are not."""
    run = tmp_path / "run"
    mine(run, corpus_file, tiny_clip)
    copy = tmp_path / "elsewhere" / "student"
    shutil.copytree(tiny_clip, copy)
    assert "up to date" in mine(run, corpus_file, copy).output
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert "up to date" in mine(run, corpus_file, "student").output
    manifest = json.loads((run / "mine" / "manifest.json").read_text())
    assert manifest["locations"]["student"] == str(tiny_clip.resolve())          # where it was first found
    assert "path" not in manifest["identity"]["student"] and "student" not in manifest["identity"]["config"]
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "extra": 1}', 1))
    out = mine(run, corpus_file, "student").output
    assert "its inputs changed since it was made (student.files.config.json" in out, out


def test_status_marks_mine_stale_when_an_image_or_the_student_changed(tmp_path, corpus_file, tiny_clip):
    student = tmp_path / "student"
    shutil.copytree(tiny_clip, student)
    run = tmp_path / "run"
    mine(run, corpus_file, student)
    status = lambda: {l.split()[0]: l for l in cli("status", "--run", run).output.splitlines()}
    assert "complete" in status()["mine"]
    os.utime(corpus_file.parent / "images" / "img0003.png", ns=(0, 42))      # touched: same bytes
    assert "complete" in status()["mine"]
    image = corpus_file.parent / "images" / "img0005.png"
    data = bytearray(image.read_bytes())
    data[-5] ^= 0xFF
    image.write_bytes(bytes(data))
    line = status()["mine"]
    assert "stale: 1 image file(s) changed since it was made (e.g. images/img0005.png; run mine again)" in line, line
    assert "stale: mine is stale" in status()["score-teacher"] or "absent" in status()["score-teacher"]
    mine(run, corpus_file, student)                                           # made again: up to date
    assert "complete" in status()["mine"]
    (student / "config.json").write_text((student / "config.json").read_text().replace("}", ', "extra": 1}', 1))
    assert f"stale: student file {student / 'config.json'} changed since it was made" in status()["mine"]


def _rows(run: Path, folder: str) -> list[dict]:
    return [row for f in sorted((run / "mine" / folder).glob("part-*.parquet")) for row in pq.read_table(f).to_pylist()]


@pytest.mark.parametrize("how", ["random", "bottom"])
def test_easy_candidates_sit_beside_the_hard_ones_for_the_same_queries(tmp_path, corpus_file, tiny_clip, how):
    run = tmp_path / "run"
    mine(run, corpus_file, tiny_clip, "--easy", "4", "--easy-from", how)
    emb = run / "mine" / "embeddings"
    img, txt = np.load(emb / "images-00000.npy"), np.load(emb / "texts-00000.npy")
    images = pq.read_table(run / "mine" / "corpus" / "images.parquet").to_pydict()
    texts = pq.read_table(run / "mine" / "corpus" / "texts.parquet").to_pydict()
    image_row = {iid: i for i, iid in enumerate(images["image_id"])}
    text_row = {tid: i for i, tid in enumerate(texts["text_id"])}
    hard, easy = _rows(run, "candidates"), _rows(run, "easy")
    assert len(easy) == len(hard) == 24 + 120
    differs = 0
    for h, e in zip(hard, easy):
        assert {k: e[k] for k in ("direction", "query_id", "positive_ids")} == \
               {k: h[k] for k in ("direction", "query_id", "positive_ids")}
        i2t = e["direction"] == "i2t"
        q = img[image_row[e["query_id"]]] if i2t else txt[text_row[e["query_id"]]]
        cand, ids = (txt, texts["text_id"]) if i2t else (img, images["image_id"])
        sims = {c: float(q @ cand[i]) for i, c in enumerate(ids) if c not in e["positive_ids"]}
        assert len(set(e["candidate_ids"])) == 4 and not set(e["candidate_ids"]) & set(e["positive_ids"])
        np.testing.assert_allclose(e["student_scores"], [sims[c] for c in e["candidate_ids"]], atol=1e-5)
        assert e["student_scores"] == sorted(e["student_scores"], reverse=True)
        if how == "bottom":
            np.testing.assert_allclose(e["student_scores"], sorted(sims.values())[:4][::-1], atol=1e-5)
        differs += set(e["candidate_ids"]) != set(h["candidate_ids"][:4])
    assert differs > len(easy) // 2                      # not the top again
    manifest = json.loads((run / "mine" / "manifest.json").read_text())
    assert manifest["easy"] == 4 and manifest["config"]["easy_from"] == how
    plan = manifest["shard_plan"]
    assert [p["easy"] for p in plan] == [f"easy/part-{i:05d}.parquet" for i in range(len(plan))]
    assert "up to date" in mine(run, corpus_file, tiny_clip, "--easy", "4", "--easy-from", how).output


def test_without_easy_nothing_changes_and_easy_options_are_checked(tmp_path, corpus_file, tiny_clip):
    run = tmp_path / "run"
    mine(run, corpus_file, tiny_clip)
    manifest = json.loads((run / "mine" / "manifest.json").read_text())
    assert "easy" not in manifest["identity"]["config"] and "easy_from" not in manifest["identity"]["config"]
    assert not (run / "mine" / "easy").exists() and all("easy" not in p for p in manifest["shard_plan"])
    r = mine(tmp_path / "other", corpus_file, tiny_clip, "--easy-from", "bottom", expect=None)
    _assert_clean_error(r, "--easy-from says where --easy draws its candidates", tmp_path / "other")
    r = mine(tmp_path / "other", corpus_file, tiny_clip, "--easy", "23", expect=None)
    _assert_clean_error(r, r"--easy 23 is not smaller than the 23 negative images", tmp_path / "other")
