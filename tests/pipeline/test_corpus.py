import json
import os

import pytest

from conftest import write_albef_corpus, write_images
from pipeline.corpus import detect_format, read_corpus, read_source
from pipeline.errors import PipelineError

quiet = dict(log=lambda *_: None)


def test_albef_list_layout(tmp_path):
    ann = write_albef_corpus(tmp_path, n_images=3, per_image=5, layout="list")
    c = read_corpus(str(ann), "albef", **quiet)
    assert c.num_images == 3 and c.num_texts == 15
    assert c.image_ids[0] == "images/img0000.png"  # no image_id field: the path is the id
    assert c.text_ids[:2] == ["images/img0000.png#0", "images/img0000.png#1"]
    assert os.path.isabs(c.image_paths[0]) and os.path.isfile(c.image_paths[0])
    assert [len(r) for r in c.image_text_rows()] == [5, 5, 5]


def test_albef_train_layout_groups_captions_by_image(tmp_path):
    ann = write_albef_corpus(tmp_path, n_images=4, per_image=2, layout="train")
    c = read_corpus(str(ann), "albef", **quiet)
    assert c.image_ids == ["im0", "im1", "im2", "im3"]
    assert c.text_ids[:3] == ["im0#0", "im0#1", "im1#0"]
    assert c.text_image_ids == ["im0", "im0", "im1", "im1", "im2", "im2", "im3", "im3"]


def _karpathy(tmp_path):
    names = write_images(tmp_path / "imgs", 4)
    splits = ["train", "restval", "val", "test"]
    doc = {"dataset": "coco", "images": [
        {"filepath": "imgs", "filename": n, "split": s, "cocoid": 100 + i,
         "sentences": [{"raw": f"caption {i} {j}", "sentid": 10 * i + j} for j in range(2)]}
        for i, (n, s) in enumerate(zip(names, splits))]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(doc))
    return path


def test_karpathy_split_filter_train_includes_restval(tmp_path):
    path = _karpathy(tmp_path)
    train = read_corpus(str(path), "karpathy", split="train", **quiet)
    assert train.image_ids == ["100", "101"]
    test = read_corpus(str(path), "karpathy", split="test", **quiet)
    assert test.image_ids == ["103"] and test.text_ids == ["30", "31"] and test.texts == ["caption 3 0", "caption 3 1"]


def test_coco_captions(tmp_path):
    names = write_images(tmp_path / "val2014", 2)
    doc = {"images": [{"id": 7, "file_name": names[0]}, {"id": 9, "file_name": names[1]}],
           "annotations": [{"id": 1, "image_id": 7, "caption": " A  cat. "}, {"id": 2, "image_id": 9, "caption": "dog"},
                           {"id": 3, "image_id": 7, "caption": "a cat again"}]}
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(doc))
    c = read_corpus(str(path), "auto", image_root=str(tmp_path / "val2014"), **quiet)
    assert c.image_ids == ["7", "9"]
    assert c.text_ids == ["1", "2", "3"] and c.text_image_ids == ["7", "9", "7"]
    assert c.texts[0] == "A cat."  # whitespace normalised


@pytest.mark.parametrize("caption_kind", ["string", "list"])
def test_hf_imagefolder(tmp_path, caption_kind):
    folder = tmp_path / "hf"
    names = write_images(folder, 3)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, n in enumerate(names):
            caps = f"caption {i}" if caption_kind == "string" else [f"caption {i} a", f"caption {i} b"]
            f.write(json.dumps({"file_name": n, "captions": caps}) + "\n")
    c = read_corpus(str(folder), "auto", caption_column="captions", **quiet)
    assert sorted(c.image_ids) == ["img0000", "img0001", "img0002"]
    assert c.num_texts == (3 if caption_kind == "string" else 6)
    for tid, iid, text in zip(c.text_ids, c.text_image_ids, c.texts):
        assert tid.startswith(iid + "#") and text.startswith(f"caption {iid[-1]}")


def test_detect_format(tmp_path):
    assert detect_format(str(write_albef_corpus(tmp_path / "a", 2))) == "albef"
    assert detect_format(str(_karpathy(tmp_path / "k" if (tmp_path / "k").mkdir() is None else None))) == "karpathy"
    (tmp_path / "x.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(PipelineError, match="not a known annotation format"):
        detect_format(str(tmp_path / "x.json"))


def test_corpus_hash_tracks_image_bytes_not_mtime_or_location(tmp_path):
    import hashlib
    import shutil

    ann = write_albef_corpus(tmp_path / "a", n_images=3)
    first = read_corpus(str(ann), **quiet)
    h1 = first.content_hash()
    img = tmp_path / "a" / "images" / "img0001.png"
    # each image's digest is the SHA-256 of its bytes, computed here with hashlib directly
    assert first.image_files[1][2] == hashlib.sha256(img.read_bytes()).hexdigest()
    os.utime(img, ns=(0, 123456789))                                       # touched: the same corpus
    assert read_corpus(str(ann), **quiet).content_hash() == h1
    shutil.copytree(tmp_path / "a", tmp_path / "moved")                    # copied elsewhere (new mtimes too)
    moved = read_corpus(str(tmp_path / "moved" / ann.name), **quiet)
    assert moved.image_paths[0].startswith(str(tmp_path / "moved")) and moved.content_hash() == h1
    data = bytearray(img.read_bytes())
    data[-5] ^= 0xFF                                                        # same size, other bytes
    img.write_bytes(bytes(data))
    os.utime(img, ns=(0, 123456789))                                       # and the same mtime as before
    assert read_corpus(str(ann), **quiet).content_hash() != h1


def test_known_digests_are_reused_only_while_size_and_mtime_match(tmp_path, monkeypatch):
    import hashlib

    from pipeline.corpus import known_files

    ann = write_albef_corpus(tmp_path, n_images=3)
    corpus = read_corpus(str(ann), **quiet)
    corpus.file_stats()
    (tmp_path / "corpus").mkdir()
    import pyarrow.parquet as pq
    pq.write_table(corpus.images_table(), tmp_path / "corpus" / "images.parquet")
    known = known_files(tmp_path / "corpus", corpus.image_root)
    assert known_files(tmp_path / "corpus", str(tmp_path / "elsewhere")) == {}   # another root: read again
    assert set(known) == {"images/img0000.png", "images/img0001.png", "images/img0002.png"}   # relative to the root
    read = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: read.append(f.name) or real(f, name))
    again = read_corpus(str(ann), **quiet)
    assert again.file_stats(known) == corpus.image_files and read == []    # nothing read again
    os.utime(tmp_path / "images" / "img0002.png", ns=(0, 5))
    again.file_stats(known)
    assert read == [str(tmp_path / "images" / "img0002.png")]              # only the touched file


# ------------------------------------------------------------------ bad input
def _records(tmp_path, records):
    write_images(tmp_path / "images", 3)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_missing_image_names_the_file(tmp_path):
    path = _records(tmp_path, [{"image": "images/nope.png", "caption": ["a"]}])
    with pytest.raises(PipelineError, match=r"image file not found: .*nope\.png"):
        read_corpus(path, **quiet)


def test_empty_caption_names_the_record(tmp_path):
    path = _records(tmp_path, [{"image": "images/img0000.png", "caption": ["ok", "  "]}])
    with pytest.raises(PipelineError, match=r"empty caption \(record 0, caption 1\)"):
        read_corpus(path, **quiet)


def test_duplicate_image_id(tmp_path):
    path = _records(tmp_path, [{"image": "images/img0000.png", "caption": ["a"]},
                               {"image": "images/img0000.png", "caption": ["b"]}])
    with pytest.raises(PipelineError, match=r"duplicate image id 'images/img0000.png' \(record 1\)"):
        read_corpus(path, **quiet)


def test_duplicate_text_id(tmp_path):
    names = write_images(tmp_path, 1)
    doc = {"images": [{"id": 1, "file_name": names[0]}],
           "annotations": [{"id": 5, "image_id": 1, "caption": "a"}, {"id": 5, "image_id": 1, "caption": "b"}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(PipelineError, match=r"duplicate text id '5' \(annotations\[1\]\)"):
        read_corpus(str(tmp_path / "c.json"), "coco", **quiet)


def test_unknown_format(tmp_path):
    with pytest.raises(PipelineError, match="unknown format 'parquet'"):
        read_corpus(str(tmp_path), "parquet", **quiet)


def test_image_without_file_reports_image_root_hint(tmp_path):
    path = _records(tmp_path, [{"image": "elsewhere/img0000.png", "caption": ["a"]}])
    with pytest.raises(PipelineError, match=r"image file not found: .*elsewhere/img0000.png \(image id '.*'\) "
                                            r"\(relative paths resolve against the annotation file's folder; "
                                            r"pass --image-root\)"):
        read_corpus(path, **quiet)
    (tmp_path / "root").mkdir()
    with pytest.raises(PipelineError, match=r"resolve against --image-root .*root\)"):
        read_corpus(path, image_root=str(tmp_path / "root"), **quiet)


def test_karpathy_without_a_split_is_refused_not_mined_whole(tmp_path):
    """Reading every split would put the test images into training without a word."""
    path = _karpathy(tmp_path)
    with pytest.raises(PipelineError, match=r"holds several splits \(.*test.*train.*\); pass --split"):
        read_corpus(str(path), "karpathy", **quiet)


def test_a_corpus_read_from_prefixed_options_names_them_in_its_errors(tmp_path):
    """distill's validation corpus is --val-data, --val-split, ...: its errors must not send the user to mine's."""
    from types import SimpleNamespace

    val = dict(val_data=str(_karpathy(tmp_path)), val_format="auto", val_image_root=None, val_split=None,
               val_image_column="image", val_caption_column="text", val_id_column=None)
    with pytest.raises(PipelineError, match=r"holds several splits .*; pass --val-split "):
        read_source(SimpleNamespace(**val), "val_", **quiet)
    with pytest.raises(PipelineError, match=r"^--val-image-root: not a directory"):
        read_source(SimpleNamespace(**{**val, "val_image_root": str(tmp_path / "nope")}), "val_", **quiet)
    assert read_source(SimpleNamespace(**{**val, "val_split": "test"}), "val_", **quiet).image_ids == ["103"]


def _albef(tmp_path, caption):
    ann = write_albef_corpus(tmp_path / "d", n_images=3)
    records = json.loads(ann.read_text())
    records[1]["caption"][0] = caption
    ann.write_text(json.dumps(records))
    return ann


def test_a_numeric_caption_is_refused_a_quoted_one_is_text(tmp_path):
    """A number where a caption belongs is most often the wrong column or field (a label, a count)."""
    ann = _albef(tmp_path, 1984)
    with pytest.raises(PipelineError, match=rf"^{ann}: caption 1984 is a number, not text \(quote it if it is one\) "
                                            r"\(record 1, caption 0\)$"):
        read_corpus(str(ann), log=lambda *_: None)
    corpus = read_corpus(str(_albef(tmp_path / "quoted", "1984")), log=lambda *_: None)
    assert "1984" in corpus.texts


@pytest.mark.parametrize("caption", ["\u200b\u200b", " \ufeff\u2060 ", "\u200d\t"])
def test_a_caption_of_zero_width_characters_only_is_refused(tmp_path, caption):
    ann = _albef(tmp_path, caption)
    with pytest.raises(PipelineError, match=rf"^{ann}: caption of zero-width characters only \(nothing to read\) "
                                            r"\(record 1, caption 0\)$"):
        read_corpus(str(ann), log=lambda *_: None)


def test_an_unpaired_surrogate_in_a_caption_is_named(tmp_path):
    ann = _albef(tmp_path, "x")
    ann.write_text(ann.read_text().replace('"x"', '"a dog \\ud83d"'))     # a broken UTF-16 escape
    with pytest.raises(PipelineError, match="unpaired surrogate .*record 1"):
        read_corpus(str(ann), log=lambda *_: None)


def test_an_annotation_file_that_is_not_utf8_is_named(tmp_path):
    ann = _albef(tmp_path, "caf\u00e9")
    ann.write_bytes(ann.read_text().replace("caf\\u00e9", "café").encode("latin-1"))
    with pytest.raises(PipelineError, match=r"ann\.json: not UTF-8 text \(byte 0xe9"):
        read_corpus(str(ann), log=lambda *_: None)


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path, monkeypatch):
    from PIL import Image

    from pipeline.models import load_image

    names = write_images(tmp_path, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)              # every image is now "too large"
    with pytest.raises(PipelineError, match="unreadable image .*exceeds limit"):
        load_image(str(tmp_path / names[0]))
