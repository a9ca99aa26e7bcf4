"""WebDataset shards as a corpus: rows equal to the same corpus written as ALBEF JSON, images read in place by
member reference, corrupt shards named by shard and key, a moved shard folder, and a whole run on shards."""
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import captions, cli, parse_report_html, write_images
from pipeline import webdataset as wds
from pipeline.corpus import changed_images, check_images, load_tables, read_corpus
from pipeline.errors import PipelineError
from pipeline.models import load_image

quiet = dict(log=lambda *_: None)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, n_images: int = 10, per_shard: int = 4, seed: int = 0, per_image: int = 2,
                 members=None) -> tuple[list[Path], Path]:
    """Shards of img2dataset's layout: KEY.png with KEY.txt (one caption) on even keys, KEY.json
    ({"caption": [...]}, several) on odd keys. The images are also left as files under root/images (the same
    bytes), for the ALBEF equivalent. `members(key, i)` may replace a sample's members (a list of (name, bytes))."""
    names = write_images(root / "images", n_images, seed)
    shards = []
    for s in range(0, n_images, per_shard):
        path = root / "shards" / f"{s // per_shard:05d}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s, min(n_images, s + per_shard)):
                key = Path(names[i]).stem
                caps = captions(i, per_image)
                data = (root / "images" / names[i]).read_bytes()
                sample = [(f"{key}.png", data),
                          (f"{key}.txt", caps[0].encode()) if i % 2 == 0 else
                          (f"{key}.json", json.dumps({"caption": caps, "url": "http://x", "key": key}).encode())]
                for name, body in (members(key, i, sample) if members else sample):
                    _add(tar, name, body)
        shards.append(path)
    return shards, root / "images"


def albef_of(root: Path, n_images: int, per_image: int = 2, image=lambda i, name: f"images/{name}") -> Path:
    """The ALBEF JSON of write_shards' corpus: per-image records, ids = the keys."""
    names = sorted(p.name for p in (root / "images").iterdir())
    records = [{"image": image(i, name), "image_id": Path(name).stem,
                "caption": captions(i, per_image)[:1] if i % 2 == 0 else captions(i, per_image)}
               for i, name in enumerate(names[:n_images])]
    ann = root / "ann.json"
    ann.write_text(json.dumps(records))
    return ann


def pattern(shards: list[Path]) -> str:
    return str(shards[0].parent / f"{{00000..{len(shards) - 1:05d}}}.tar")


def error(fn, *args, **kw) -> str:
    with pytest.raises(PipelineError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- shard lists
def test_brace_patterns_expand_as_the_shell_does():
    assert wds.expand_braces("a/{00000..00002}.tar") == ["a/00000.tar", "a/00001.tar", "a/00002.tar"]
    assert wds.expand_braces("{8..11}.tar") == ["8.tar", "9.tar", "10.tar", "11.tar"]
    assert wds.expand_braces("{x,y}-{0..1}.tar") == ["x-0.tar", "x-1.tar", "y-0.tar", "y-1.tar"]
    assert wds.expand_braces("plain.tar") == ["plain.tar"]
    assert "a range" in error(wds.expand_braces, "{abc}.tar")


def test_shards_are_named_by_pattern_list_or_folder(tmp_path):
    shards, _ = write_shards(tmp_path, n_images=10, per_shard=4)
    want = [str(s.resolve()) for s in shards]
    assert wds.shard_paths(pattern(shards)) == want
    assert wds.shard_paths(" ".join(map(str, shards))) == want
    assert wds.shard_paths(str(shards[0].parent)) == want
    msg = error(wds.shard_paths, str(shards[0].parent / "{00000..00003}.tar"))
    assert "shard not found" in msg and "00003.tar" in msg and "{00000..00003}" in msg
    assert "named twice" in error(wds.shard_paths, f"{shards[0]} {shards[0]}")


# ---------------------------------------------------------------- rows, identities, in-place reading
def test_rows_and_digests_equal_the_albef_corpus_of_the_same_images(tmp_path):
    n = 10
    shards, images = write_shards(tmp_path, n_images=n, per_shard=4)
    w = read_corpus(pattern(shards), "webdataset", **quiet)
    a = read_corpus(str(albef_of(tmp_path, n)), "albef", **quiet)
    assert (w.image_ids, w.text_ids, w.text_image_ids, w.texts) == (a.image_ids, a.text_ids, a.text_image_ids, a.texts)
    assert w.num_images == n and w.num_texts == sum(1 if i % 2 == 0 else 2 for i in range(n))
    # identity by bytes: each member's size and SHA-256 are those of the image file (hashed here independently)
    want = [(os.path.getsize(images / f"{i}.png"), hashlib.sha256((images / f"{i}.png").read_bytes()).hexdigest())
            for i in w.image_ids]
    assert [(s, d) for s, _, d in w.stats()] == want == [(s, d) for s, _, d in a.stats()]
    # the stored paths are member references relative to the shards' folder; each reads back the image's bytes
    table = w.images_table()
    assert table.schema.metadata[b"image_root"].decode() == str(shards[0].parent.resolve())
    first = table.column("path")[0].as_py()
    assert first.startswith("00000.tar#") and wds.split_member(first)[2] == want[0][0]
    for iid, path in zip(w.image_ids, w.image_paths):
        assert wds.read_image_bytes(path) == (images / f"{iid}.png").read_bytes()
        np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(load_image(str(images / f"{iid}.png"))))


def test_the_corpus_hash_equals_albefs_where_bytes_captions_and_paths_agree(tmp_path):
    """The corpus hash covers ids, stored paths, captions and each image's size and SHA-256 (docs/design.md),
    so an ALBEF file naming the same members (SHARD.tar#OFFSET+SIZE is an image path like any other) hashes
    alike; the ALBEF file of the extracted images differs only by its paths."""
    n = 6
    shards, _ = write_shards(tmp_path, n_images=n, per_shard=4)
    w = read_corpus(pattern(shards), "webdataset", **quiet)
    refs = dict(zip(w.image_ids, (w.stored_path(p) for p in w.image_paths)))
    ann = albef_of(tmp_path, n, image=lambda i, name: refs[Path(name).stem])
    a = read_corpus(str(ann), "albef", image_root=str(shards[0].parent), **quiet)
    assert a.image_paths == w.image_paths and a.content_hash() == w.content_hash()
    extracted = read_corpus(str(albef_of(tmp_path, n)), "albef", **quiet)
    assert extracted.content_hash() != w.content_hash()
    extracted.image_paths, extracted.image_root = w.image_paths, w.image_root
    assert extracted.content_hash() == w.content_hash()


def test_format_auto_reads_shards(tmp_path):
    shards, _ = write_shards(tmp_path, n_images=4, per_shard=2)
    said = []
    c = read_corpus(pattern(shards), log=said.append)
    assert c.num_images == 4 and "as 'webdataset'" in said[0]


def test_metadata_without_an_image_is_no_sample_and_bookkeeping_is_skipped(tmp_path):
    def members(key, i, sample):
        extra = [("__index__.json", b"{}")] if i == 0 else []
        return sample + extra + ([(f"failed{i}.json", b'{"status": "failed_to_download"}')] if i == 1 else [])

    shards, _ = write_shards(tmp_path, n_images=4, per_shard=4, members=members)
    assert read_corpus(str(shards[0]), "webdataset", **quiet).image_ids == [f"img{i:04d}" for i in range(4)]


def test_the_readers_digests_are_used_and_a_rerun_reuses_the_last_runs(tmp_path, monkeypatch):
    shards, _ = write_shards(tmp_path, n_images=6, per_shard=3)
    c = read_corpus(pattern(shards), "webdataset", **quiet)
    recorded = c.image_files
    monkeypatch.setattr(wds, "sha256_image", lambda p: pytest.fail(f"read again: {p}"))
    assert c.file_stats() == recorded                              # hashed while read, not read twice
    os.utime(shards[1], ns=(1, 1))                                  # a touched shard: its members are read again
    c.image_files = None
    hashed = []
    monkeypatch.setattr(wds, "sha256_image", lambda p: hashed.append(p) or "x")
    known = {c.stored_path(p): s for p, s in zip(c.image_paths, recorded)}
    c.file_stats(known)
    assert sorted(hashed) == sorted(p for p in c.image_paths if p.split("#")[0] == str(shards[1].resolve()))


# ---------------------------------------------------------------- corrupt shards: one line, shard and key
def _cut(path: Path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


def _member_end(path: Path, name: str) -> int:
    with tarfile.open(path) as tar:
        info = tar.getmember(name)
        return info.offset_data + info.size


@pytest.mark.parametrize("where, says", [("inside an image", "key 'img0004' is cut short"),
                                         ("inside a header", "a header cut short after key 'img0004'"),
                                         ("at a member boundary", "no end-of-archive block after key 'img0004'")])
def test_a_truncated_tar_names_the_shard_and_key(tmp_path, where, says):
    shards, _ = write_shards(tmp_path, n_images=6, per_shard=3)
    shard = shards[1]
    end = _member_end(shard, "img0004.png")
    cut = {"inside an image": end - 10, "inside a header": -(-end // 512) * 512 + 300,
           "at a member boundary": -(-end // 512) * 512}[where]
    _cut(shard, cut)
    msg = error(read_corpus, pattern(shards), "webdataset", **quiet)
    assert msg.startswith(f"{shard.resolve()}: truncated tar: ") and says in msg, msg


def test_a_damaged_header_is_not_taken_for_the_end_of_the_shard(tmp_path):
    """tarfile ends an archive quietly at a header it cannot parse; the samples after it would be lost."""
    shards, _ = write_shards(tmp_path, n_images=6, per_shard=6)
    header = -(-_member_end(shards[0], "img0002.txt") // 512) * 512          # img0003.png's header
    data = bytearray(shards[0].read_bytes())
    data[header:header + 512] = b"garbage!" * 64
    shards[0].write_bytes(bytes(data))
    msg = error(read_corpus, str(shards[0]), "webdataset", **quiet)
    assert msg == f"{shards[0].resolve()}: damaged tar: the header at byte {header} after key 'img0002' does not parse"


def test_a_member_that_is_no_image_names_the_shard_and_key(tmp_path):
    def members(key, i, sample):
        return [(f"{key}.jpg", b"<html>403 Forbidden</html>"), sample[1]] if i == 2 else sample

    shards, _ = write_shards(tmp_path, n_images=4, per_shard=2, members=members)
    msg = error(read_corpus, pattern(shards), "webdataset", **quiet)
    assert str(shards[1].resolve()) in msg and "img0002" in msg and "does not decode" in msg, msg


def test_an_image_cut_short_inside_its_pixels_is_named_by_shard_and_key_when_decoded(tmp_path):
    """Header-level checks pass (no pixel decoding at read time); the stage that decodes it names it."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()[:-400]

    def members(key, i, sample):
        return [(f"{key}.jpg", jpeg), sample[1]] if i == 1 else sample

    shards, _ = write_shards(tmp_path, n_images=2, per_shard=2, members=members)
    c = read_corpus(str(shards[0]), "webdataset", **quiet)
    msg = error(load_image, c.image_paths[1])
    assert str(shards[0].resolve()) in msg and "key 'img0001'" in msg and "unreadable image" in msg, msg


@pytest.mark.parametrize("caption", ["none", "json without caption", "empty"])
def test_an_image_without_a_caption_names_the_shard_and_key(tmp_path, caption):
    def members(key, i, sample):
        if i != 3:
            return sample
        return {"none": sample[:1], "json without caption": [sample[0], (f"{key}.json", b'{"url": "x"}')],
                "empty": [sample[0], (f"{key}.txt", b"  ")]}[caption]

    shards, _ = write_shards(tmp_path, n_images=4, per_shard=2, members=members)
    msg = error(read_corpus, pattern(shards), "webdataset", **quiet)
    assert str(shards[1].resolve()) in msg and "img0003" in msg and ("no caption" in msg or "empty caption" in msg)


def test_a_key_in_two_shards_and_a_key_with_two_images_are_named(tmp_path):
    shards, _ = write_shards(tmp_path / "a", n_images=4, per_shard=2)
    shutil.copy(shards[0], shards[0].with_name("00002.tar"))
    msg = error(read_corpus, str(shards[0].parent), "webdataset", **quiet)
    assert "duplicate image id 'img0000'" in msg and "00002.tar" in msg

    def members(key, i, sample):
        return sample + [(f"{key}.jpg", sample[0][1])] if i == 0 else sample

    shards, _ = write_shards(tmp_path / "b", n_images=2, per_shard=2, members=members)
    msg = error(read_corpus, str(shards[0]), "webdataset", **quiet)
    assert "key 'img0000' has two images" in msg and str(shards[0].resolve()) in msg


def test_a_compressed_shard_is_refused_with_the_way_out(tmp_path):
    import gzip

    shards, _ = write_shards(tmp_path, n_images=2, per_shard=2)
    shards[0].write_bytes(gzip.compress(shards[0].read_bytes()))
    msg = error(read_corpus, str(shards[0]), "webdataset", **quiet)
    assert "not a plain (uncompressed) tar" in msg and "gunzip" in msg


# ---------------------------------------------------------------- moved and changed shards
def test_a_moved_shard_folder_is_found_with_image_root_and_checked_by_bytes(tmp_path):
    shards, _ = write_shards(tmp_path / "old", n_images=6, per_shard=3)
    c = read_corpus(pattern(shards), "webdataset", **quiet)
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    pq.write_table(c.images_table(), corpus_dir / "images.parquet")
    pq.write_table(c.texts_table(), corpus_dir / "texts.parquet")
    new = tmp_path / "new"
    shutil.copytree(shards[0].parent, new)                      # a copy: new mtimes, the same bytes
    shutil.rmtree(shards[0].parent)
    assert "which is gone" in error(load_tables, corpus_dir)
    moved = load_tables(corpus_dir, str(new))
    check_images(moved, corpus_dir)                              # re-read by bytes: nothing changed
    assert moved.image_paths[0].startswith(str(new.resolve()) + "/00000.tar#")
    assert [load_image(p).size for p in moved.image_paths] == [(40, 40)] * 6
    # one member's bytes changed in place (same size): named by its stored reference; a shard gone: missing
    ref = moved.image_paths[4]
    shard, offset, size = wds.split_member(ref)
    with open(shard, "r+b") as f:
        f.seek(offset + size - 1)
        last = f.read(1)
        f.seek(offset + size - 1)
        f.write(bytes([last[0] ^ 1]))
    assert changed_images(moved) == ([moved.stored_path(ref)], [])
    os.remove(new / "00000.tar")
    changed, missing = changed_images(moved)
    assert len(missing) == 3 and all(m.startswith("00000.tar#") for m in missing)
    assert "not found under" in error(check_images, moved, corpus_dir)


# ---------------------------------------------------------------- a whole run on shards
def test_mine_score_distill_evaluate_on_shards_and_a_moved_shard_folder(tmp_path, tiny_clip, tiny_blip):
    shards, _ = write_shards(tmp_path / "train", n_images=16, per_shard=6)
    test_shards, _ = write_shards(tmp_path / "test", n_images=8, per_shard=4, seed=7)
    run = tmp_path / "run"
    mine = ("mine", "--run", run, "--student", tiny_clip, "--k", "4", "--shard-size", "7", "--device", "cpu")
    cli(*mine, "--data", pattern(shards))
    stored = pq.read_table(run / "mine" / "corpus" / "images.parquet")
    assert stored.column("path")[0].as_py().startswith("00000.tar#")
    assert not (run / "images").exists()                         # nothing extracted: read in place

    moved = tmp_path / "elsewhere"
    shutil.move(shards[0].parent, moved)
    teacher = ("score-teacher", "--run", run, "--teacher", tiny_blip, "--device", "cpu", "--images-per-shard", "8")
    assert "--image-root" in cli(*teacher, expect=2).output.strip().splitlines()[-1]
    cli(*teacher, "--image-root", moved)
    cli("distill", "--run", run, "--image-root", moved, "--max-steps", "2", "--batch-size", "8",
        "--num-negatives", "3", "--device", "cpu", "--val-data", pattern(test_shards), "--no-val-teacher")
    rows = [json.loads(line) for line in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert "val_rsum" in rows[-1]                                  # a validation corpus of shards too
    cli("evaluate", "--run", run, "--data", pattern(test_shards), "--rerank-teacher", tiny_blip, "--k-test", "4",
        "--device", "cpu")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0 < metrics["rsum"] <= 600 and "rerank" in metrics
    cli("report", "--run", run)
    page = parse_report_html(run / "report" / "index.html")
    assert page.sections == ["scores", "positives", "agreement", "training", "evaluations"] and not page.missing
    # the same shards, wherever they are: mine is up to date and says where the later stages should look
    out = cli(*mine, "--data", pattern([moved / s.name for s in shards])).output
    assert "up to date" in out and f"--image-root {moved.resolve()}" in out


def test_a_rerun_reads_only_the_members_of_changed_shards(tmp_path, monkeypatch):
    shards, _ = write_shards(tmp_path, n_images=6, per_shard=3)
    first = read_corpus(pattern(shards), "webdataset", **quiet)
    recorded = tmp_path / "corpus"
    recorded.mkdir()
    pq.write_table(first.images_table(), recorded / "images.parquet")
    checked = []
    real = wds.check_image
    monkeypatch.setattr(wds, "check_image", lambda shard, key, *a: checked.append(key) or real(shard, key, *a))
    again = read_corpus(pattern(shards), "webdataset", recorded=recorded, **quiet)
    assert checked == [] and again.image_files == first.image_files and again.content_hash() == first.content_hash()
    os.utime(shards[0], ns=(1, 1))                                 # touched: read, checked and hashed again
    touched = read_corpus(pattern(shards), "webdataset", recorded=recorded, **quiet)
    assert checked == ["img0000", "img0001", "img0002"] and touched.content_hash() == first.content_hash()
    # another root's record vouches for nothing (the same names there may hold other bytes)
    checked.clear()
    read_corpus(pattern(shards), "webdataset", image_root=str(tmp_path), recorded=recorded, **quiet)
    assert len(checked) == 6
