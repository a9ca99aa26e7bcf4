"""Corpus readers: every input format becomes the two tables of docs/design.md ("Data model").

    images: image_id (str, unique), path, size, mtime_ns, sha256 (of the file's bytes)
    texts:  text_id (str, unique), image_id (its positive image), text

In memory every path is absolute. On disk (RUN/mine/corpus/images.parquet) a path under the image root
(--image-root, else the annotation file's folder) is stored relative to it, and the root is kept in the table's
metadata, so a later stage can find a moved image folder with its own --image-root.

The corpus hash covers ids, stored paths, captions and each image's size and SHA-256, not its mtime: a copied
or touched folder is the same corpus, a re-encoded image is not. (size, mtime) is only the key under which a
rerun re-uses the digests of the last run instead of reading every file again.

Formats (`--format`): `albef` (ALBEF/BLIP annotation JSON, per-caption train records or per-image caption
lists), `karpathy` (dataset_flickr30k.json / dataset_coco.json, filtered by split), `coco` (captions_*.json),
`hf` (a `datasets.load_dataset` name or local folder, e.g. an imagefolder with metadata.jsonl), `webdataset`
(plain .tar shards: a list, a brace pattern or a folder; pipeline/webdataset.py) and `auto`.

An image path is a file, or a member of a WebDataset shard (`SHARD.tar#OFFSET+SIZE`, read in place); every
function here that stats, hashes or checks an image goes through pipeline/webdataset.py's `stat_image`,
`sha256_image` and `image_exists`, which treat both alike.
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import webdataset as wds
from .errors import PipelineError

FORMATS = ("auto", "albef", "karpathy", "coco", "hf", "webdataset")
# the options that describe a corpus to read, as mine and evaluate name them (--data, --format, ...); distill's
# validation corpus has the same ones under a prefix (--val-data, --val-format, ...)
SOURCE_OPTIONS = ("data", "format", "image_root", "split", "image_column", "caption_column", "id_column")


def flag(name: str, prefix: str = "") -> str:
    """The command-line spelling of a corpus option: flag("image_root", "val_") is '--val-image-root'."""
    return "--" + (prefix + name).replace("_", "-")


@dataclass
class Corpus:
    image_ids: list[str]
    image_paths: list[str]
    text_ids: list[str]
    text_image_ids: list[str]
    texts: list[str]
    image_root: Optional[str] = None            # absolute; paths under it are stored relative to it
    image_files: Optional[list[tuple[int, int, str]]] = None   # (size, mtime_ns, sha256) per image: file_stats()

    # --- derived views
    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_texts(self) -> int:
        return len(self.text_ids)

    def text_image_rows(self) -> np.ndarray:
        """Row of each text's positive image in the image table, shape [num_texts]."""
        row = {iid: i for i, iid in enumerate(self.image_ids)}
        return np.fromiter((row[i] for i in self.text_image_ids), dtype=np.int64, count=self.num_texts)

    def image_text_rows(self) -> list[np.ndarray]:
        """Rows of each image's positive texts, one array per image."""
        order = np.argsort(self.text_image_rows(), kind="stable")
        counts = np.bincount(self.text_image_rows(), minlength=self.num_images)
        return np.split(order, np.cumsum(counts)[:-1])

    def stored_path(self, path: str) -> str:
        """`path` as images.parquet keeps it: relative (POSIX) under the image root, else absolute."""
        if self.image_root:
            try:
                return Path(path).relative_to(self.image_root).as_posix()
            except ValueError:
                pass
        return path

    def file_stats(self, known: Optional[dict[str, tuple[int, int, str]]] = None,
                   progress: bool = False) -> list[tuple[int, int, str]]:
        """(size, mtime_ns, sha256) of every image file; a digest in `known` (stored path -> the last run's
        stats), or in the stats the reader computed (`image_files`, by position), is re-used when size and mtime
        are unchanged, every other file is read."""
        from tqdm.auto import tqdm

        known = known or {}
        read = self.image_files or []   # a reader that read the bytes (webdataset) hashed them as it went
        stats, todo = [], []
        for i, path in enumerate(self.image_paths):
            size, mtime = wds.stat_image(path)
            old = read[i] if i < len(read) and read[i][2] else known.get(self.stored_path(path))
            same = old is not None and (old[0], old[1]) == (size, mtime)
            stats.append((size, mtime, old[2] if same else ""))
            if not same:
                todo.append(i)
        for i in tqdm(todo, desc="hash images", unit="img", disable=not progress or len(todo) < 1000, leave=False):
            stats[i] = (*stats[i][:2], wds.sha256_image(self.image_paths[i]))
        self.image_files = stats
        return stats

    def stats(self) -> list[tuple[int, int, str]]:
        """Each image's (size, mtime_ns, sha256): the ones file_stats() computed, else computed now."""
        return self.image_files if self.image_files is not None else self.file_stats()

    def content_hash(self) -> str:
        """SHA-256 over ids, stored paths, captions and each image file's size and SHA-256 (not its mtime)."""
        stats = self.stats()
        h = hashlib.sha256()
        for iid, path, (size, _, digest) in zip(self.image_ids, self.image_paths, stats):
            h.update(f"I\t{iid}\t{self.stored_path(path)}\t{size}\t{digest}\n".encode())
        for tid, iid, text in zip(self.text_ids, self.text_image_ids, self.texts):
            h.update(f"T\t{tid}\t{iid}\t{text}\n".encode())
        return h.hexdigest()

    def images_table(self) -> pa.Table:
        stats = self.stats()
        table = pa.table({"image_id": self.image_ids, "path": [self.stored_path(p) for p in self.image_paths],
                          "size": [s[0] for s in stats], "mtime_ns": [s[1] for s in stats],
                          "sha256": [s[2] for s in stats]})
        return table.replace_schema_metadata({"image_root": self.image_root or ""})

    def texts_table(self) -> pa.Table:
        return pa.table({"text_id": self.text_ids, "image_id": self.text_image_ids, "text": self.texts})


def load_tables(directory: Path, image_root: str | None = None, check_root: bool = True) -> Corpus:
    """Read a normalised corpus written by `mine` (RUN/mine/corpus). Relative paths resolve against
    `image_root` (a stage's --image-root, for a moved image folder), else the root mine recorded."""
    images = pq.read_table(directory / "images.parquet")
    texts = pq.read_table(directory / "texts.parquet").to_pydict()
    recorded = recorded_root(images.schema)
    root = str(Path(image_root).resolve()) if image_root else recorded
    if image_root and not Path(root).is_dir():
        raise PipelineError(f"--image-root: not a directory: {image_root}")
    columns = images.to_pydict()
    stored = columns["path"]
    if root is None and any(not Path(p).is_absolute() for p in stored):
        raise PipelineError(f"{directory / 'images.parquet'}: relative image paths but no image root recorded; "
                            "pass --image-root")
    if check_root and root and not image_root and not Path(root).is_dir():
        raise PipelineError(f"{directory / 'images.parquet'}: the images were under {root}, which is gone; pass "
                            "--image-root with the folder they are in now")
    paths = [p if Path(p).is_absolute() else str(Path(root) / p) for p in stored]
    stats = (list(zip(columns["size"], columns["mtime_ns"], columns["sha256"])) if "sha256" in columns else None)
    return Corpus(columns["image_id"], paths, texts["text_id"], texts["image_id"], texts["text"], root, stats)


def changed_images(corpus: Corpus) -> tuple[list[str], list[str]]:
    """(changed, missing) stored paths of a corpus read by `load_tables`: each file is stat'ed, and hashed only
    where its size or mtime differ from mine's record (a copy with new mtimes but the same bytes is unchanged).
    A record without digests (an earlier version) vouches for nothing, and nothing is reported."""
    changed, missing = [], []
    for path, (size, mtime, digest) in zip(corpus.image_paths, corpus.image_files or []):
        if not digest:
            continue
        try:
            now = wds.stat_image(path)
        except FileNotFoundError:
            missing.append(corpus.stored_path(path))
            continue
        if now == (size, mtime):
            continue
        if now[0] != size or wds.sha256_image(path) != digest:   # a member's bytes are re-read from its shard
            changed.append(corpus.stored_path(path))
    return changed, missing


def check_images(corpus: Corpus, directory: Path, limit: int = 3) -> None:
    """Refuse to read a corpus whose images changed or went missing since mine recorded them (directory: the
    corpus folder RUN/mine/corpus), naming the files: what a stage reads is what mine checked."""
    changed, missing = changed_images(corpus)
    named = lambda paths: ", ".join(paths[:limit]) + (", ..." if len(paths) > limit else "")
    if missing:
        raise PipelineError(f"{directory / 'images.parquet'}: {len(missing)} image file(s) not found under "
                            f"{corpus.image_root or '/'} ({named(missing)}); pass --image-root with the folder they "
                            "are in now")
    if changed:
        raise PipelineError(f"{directory / 'images.parquet'}: {len(changed)} image file(s) changed since mine read "
                            f"them ({named(changed)}); run mine again (it hashes only what changed), then this stage")


def load_checked(directory: Path, image_root: str | None = None) -> Corpus:
    """`load_tables`, then `check_images`: the corpus a stage after mine reads."""
    corpus = load_tables(directory, image_root)
    check_images(corpus, directory)
    return corpus


def recorded_root(schema_or_dir: pa.Schema | Path) -> Optional[str]:
    """The image root mine recorded in images.parquet (a schema, or the corpus folder), if any."""
    schema = schema_or_dir if isinstance(schema_or_dir, pa.Schema) else \
        pq.read_schema(schema_or_dir / "images.parquet")
    return (schema.metadata or {}).get(b"image_root", b"").decode() or None


def known_files(directory: Path, image_root: Optional[str]) -> dict[str, tuple[int, int, str]]:
    """The last run's image stats by stored path, if it recorded them for the same image root (a folder that
    moved is read again: another root's files of equal name, size and mtime may hold other bytes)."""
    try:
        table = pq.read_table(directory / "images.parquet", columns=["path", "size", "mtime_ns", "sha256"])
    except (OSError, pa.ArrowInvalid, KeyError):
        return {}
    if recorded_root(table.schema) != image_root:
        return {}
    c = table.to_pydict()
    return {p: (s, m, d) for p, s, m, d in zip(c["path"], c["size"], c["mtime_ns"], c["sha256"]) if d}


def changes(directory: Path, corpus: Corpus, limit: int = 3) -> Optional[str]:
    """What differs between the corpus recorded in `directory` and `corpus`, naming files: 'images changed:
    a.jpg, b.jpg; 1 added (c.jpg); 2 captions changed'. None if the old tables cannot be read."""
    try:
        old = pq.read_table(directory / "images.parquet").to_pydict()
        old_texts = pq.read_table(directory / "texts.parquet").to_pydict()
    except (OSError, pa.ArrowInvalid):
        return None
    if "sha256" not in old:
        return "recorded by an earlier version, without image digests (--force records them)"
    before = {i: (p, d) for i, p, d in zip(old["image_id"], old["path"], old["sha256"])}
    stats = corpus.stats()
    now = {i: (corpus.stored_path(p), s[2]) for i, p, s in zip(corpus.image_ids, corpus.image_paths, stats)}
    named = lambda ids, table: ", ".join(table[i][0] for i in sorted(ids)[:limit]) + (", ..." if len(ids) > limit else "")
    parts = []
    changed = [i for i in before.keys() & now.keys() if before[i] != now[i]]
    for what, ids, table in (("changed", changed, now), ("added", now.keys() - before.keys(), now),
                             ("removed", before.keys() - now.keys(), before)):
        if ids:
            parts.append(f"{len(ids)} image file(s) {what} ({named(ids, table)})")
    old_caps = dict(zip(old_texts["text_id"], zip(old_texts["image_id"], old_texts["text"])))
    new_caps = dict(zip(corpus.text_ids, zip(corpus.text_image_ids, corpus.texts)))
    captions = sum(old_caps.get(t) != v for t, v in new_caps.items()) + len(old_caps.keys() - new_caps.keys())
    if captions:
        parts.append(f"{captions} caption(s) changed, added or removed")
    return "; ".join(parts) or None


# ---------------------------------------------------------------- building and checking
def _blank(text: str) -> bool:
    """Nothing a tokenizer would read: only whitespace, control and zero-width/format characters (U+200B, U+FEFF)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


class _Builder:
    """Collects images and captions from a reader, checking ids as they come."""

    def __init__(self, source: str, image_root: Path | None, bytes_dir: Path | None, root_given: bool = False,
                 prefix: str = ""):
        self.source = source
        self.prefix = prefix          # of the options that described this corpus, for the errors that name them
        self.image_root = image_root
        self.root_given = root_given  # the user passed --image-root (else: the annotation file's folder)
        self.bytes_dir = bytes_dir
        self.images: dict[str, str] = {}
        self.text_ids: list[str] = []
        self.text_image_ids: list[str] = []
        self.texts: list[str] = []
        self._seen_text: set[str] = set()
        self._per_image: dict[str, int] = {}

    def resolve(self, path: str) -> str:
        p = Path(path)
        if not p.is_absolute() and self.image_root is not None:
            p = self.image_root / p
        return str(p.resolve())

    def captions_of(self, image_id: str) -> int:
        """How many captions `image_id` has so far (numbers the captions of per-caption layouts)."""
        self._per_image[image_id] = self._per_image.get(image_id, -1) + 1
        return self._per_image[image_id]

    def add_image(self, image_id: Any, path: str, where: str, allow_repeat: bool = False) -> str:
        image_id = str(image_id)
        resolved = self.resolve(path)
        old = self.images.get(image_id)
        if old is not None and (not allow_repeat or old != resolved):
            raise PipelineError(f"{self.source}: duplicate image id '{image_id}' ({where})")
        self.images[image_id] = resolved
        return image_id

    def add_image_bytes(self, image_id: str, data: bytes, where: str) -> str:
        if self.bytes_dir is None:
            raise PipelineError(f"{self.source}: {where} holds image bytes but no folder was given to store them")
        self.bytes_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(data).hexdigest()[:16]
        path = self.bytes_dir / f"{digest}.img"
        if not path.exists():  # content-addressed: concurrent writers write the same bytes
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        if image_id in self.images:
            raise PipelineError(f"{self.source}: duplicate image id '{image_id}' ({where})")
        self.images[image_id] = str(path.resolve())
        return image_id

    def add_text(self, text_id: Any, image_id: str, text: Any, where: str) -> None:
        text_id = str(text_id)
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            # most often the wrong column or field (a label, a count); a caption meant as text is quoted
            raise PipelineError(f"{self.source}: caption {text!r} is a number, not text (quote it if it is one) "
                                f"({where})")
        if not isinstance(text, str):
            raise PipelineError(f"{self.source}: caption is a {type(text).__name__}, not text ({where})")
        if _blank(text):
            what = "empty caption" if not text.strip() else "caption of zero-width characters only (nothing to read)"
            raise PipelineError(f"{self.source}: {what} ({where})")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PipelineError(f"{self.source}: caption holds an unpaired surrogate (broken UTF-16 escape, e.g. "
                                f"\\ud83d alone) ({where})") from None
        if text_id in self._seen_text:
            raise PipelineError(f"{self.source}: duplicate text id '{text_id}' ({where})")
        self._seen_text.add(text_id)
        self.text_ids.append(text_id)
        self.text_image_ids.append(image_id)
        self.texts.append(" ".join(text.split()))

    def build(self, check_files: bool = True) -> Corpus:
        if not self.images or not self.text_ids:
            raise PipelineError(f"{self.source}: no images or no captions found (check {self.flag('split')} and "
                                f"{self.flag('format')})")
        with_text = set(self.text_image_ids)
        ids = [i for i in self.images if i in with_text]  # an image without captions has no positive
        paths = [self.images[i] for i in ids]
        if check_files:
            for iid, path in zip(ids, paths):
                if not wds.image_exists(path):
                    root = self.flag("image_root")
                    hint = (f" (relative paths resolve against {root} {self.image_root})" if self.root_given
                            else f" (relative paths resolve against the annotation file's folder; pass {root})")
                    raise PipelineError(f"{self.source}: image file not found: {path} (image id '{iid}'){hint}")
        root = self.image_root or (self.bytes_dir.resolve() if self.bytes_dir is not None and paths
                                   and all(Path(p).parent == self.bytes_dir.resolve() for p in paths) else None)
        return Corpus(ids, paths, self.text_ids, self.text_image_ids, self.texts, str(root) if root else None)

    def flag(self, name: str) -> str:
        return flag(name, self.prefix)


# ---------------------------------------------------------------- readers
def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}); save the "
                            "annotation file as UTF-8") from None


def read_albef(data: Path, b: _Builder, split: str | None) -> None:
    records = _load_json(data)
    if not isinstance(records, list):
        raise PipelineError(f"{data}: ALBEF/BLIP annotations are a JSON list of records")
    for n, rec in enumerate(records):
        where = f"record {n}"
        if not isinstance(rec, dict) or "image" not in rec or "caption" not in rec:
            raise PipelineError(f"{data}: {where} lacks 'image' or 'caption'")
        caps = rec["caption"]
        if isinstance(caps, list):  # val/test layout: one record per image
            iid = b.add_image(rec.get("image_id", rec["image"]), rec["image"], where)
            for j, cap in enumerate(caps):
                b.add_text(f"{iid}#{j}", iid, cap, f"{where}, caption {j}")
        else:  # train layout: one record per caption, images repeat
            iid = b.add_image(rec.get("image_id", rec["image"]), rec["image"], where, allow_repeat=True)
            b.add_text(f"{iid}#{b.captions_of(iid)}", iid, caps, where)


def read_karpathy(data: Path, b: _Builder, split: str | None) -> None:
    doc = _load_json(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise PipelineError(f"{data}: Karpathy split files have an 'images' list")
    splits = sorted({str(img.get("split")) for img in doc["images"] if isinstance(img, dict) and "split" in img})
    if split is None and splits:  # mining every split would put test images into training, silently
        raise PipelineError(f"{data}: a Karpathy file holds several splits ({', '.join(splits)}); pass "
                            f"{b.flag('split')} (train also takes restval)")
    wanted = {split} | ({"restval"} if split == "train" else set()) if split else None
    for n, img in enumerate(doc["images"]):
        if wanted is not None and img.get("split") not in wanted:
            continue
        where = f"images[{n}]"
        if "filename" not in img or "sentences" not in img:
            raise PipelineError(f"{data}: {where} lacks 'filename' or 'sentences'")
        rel = os.path.join(img.get("filepath", ""), img["filename"])
        iid = b.add_image(img.get("cocoid", Path(img["filename"]).stem), rel, where)
        for j, sent in enumerate(img["sentences"]):
            b.add_text(sent.get("sentid", f"{iid}#{j}"), iid, sent.get("raw"), f"{where}.sentences[{j}]")


def read_coco(data: Path, b: _Builder, split: str | None) -> None:
    doc = _load_json(data)
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise PipelineError(f"{data}: COCO caption files have 'images' and 'annotations'")
    known = set()
    for n, img in enumerate(doc["images"]):
        known.add(b.add_image(img["id"], img["file_name"], f"images[{n}]"))
    for n, ann in enumerate(doc["annotations"]):
        iid = str(ann["image_id"])
        if iid not in known:
            raise PipelineError(f"{data}: annotations[{n}] refers to unknown image_id {iid}")
        b.add_text(ann["id"], iid, ann.get("caption"), f"annotations[{n}]")


def read_hf(data: str, b: _Builder, split: str | None, image_column: str, caption_column: str,
            id_column: str | None) -> None:
    import datasets

    path = Path(data)
    try:
        if path.is_dir() and not any(path.glob("*.py")):
            ds = datasets.load_dataset(str(path), split=split or "train")
        else:
            ds = datasets.load_dataset(data, split=split or "train")
    except (FileNotFoundError, ValueError) as e:
        raise PipelineError(f"{data}: cannot load as a Hugging Face dataset ({str(e).splitlines()[0]})") from None
    named = (("image_column", image_column), ("caption_column", caption_column)) + \
        ((("id_column", id_column),) if id_column else ())
    for name, col in named:
        if col not in ds.column_names:
            raise PipelineError(f"{data}: no column '{col}' (columns: {', '.join(ds.column_names)}); name the "
                                f"column with {b.flag(name)}")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    for n, row in enumerate(ds):
        where = f"row {n}"
        img = row[image_column]
        iid = str(row[id_column]) if id_column else None
        if isinstance(img, dict) and img.get("path") and os.path.isfile(img["path"]):
            iid = iid or Path(img["path"]).stem
            b.add_image(iid, img["path"], where)
        elif isinstance(img, dict) and img.get("bytes"):
            iid = iid or f"{n:08d}"
            b.add_image_bytes(iid, img["bytes"], where)
        elif isinstance(img, str):
            iid = iid or Path(img).stem
            b.add_image(iid, img, where)
        else:
            raise PipelineError(f"{data}: {where}: column '{image_column}' holds no image path or bytes")
        caps = row[caption_column]
        caps = caps if isinstance(caps, list) else [caps]
        for j, cap in enumerate(caps):
            b.add_text(f"{iid}#{j}", iid, cap, f"{where}, caption {j}")


def read_webdataset(shards: list[str], b: _Builder,
                    known: Callable[[str], Optional[tuple[int, int, str]]]) -> dict[str, tuple[int, int, str]]:
    """WebDataset shards (pipeline/webdataset.py): one image per key, its captions from KEY.txt or KEY.json;
    image ids are the keys, text ids KEY#N. Returns each image's stats by id, hashed while read (or the last
    run's, from `known(member reference)`, where size and shard mtime are unchanged)."""
    return wds.read_shards(shards, b.add_image, b.add_text, known)


def detect_format(data: str, prefix: str = "") -> str:
    if wds.looks_like_shards(data):
        return "webdataset"
    path = Path(data)
    if path.is_dir():
        return "hf"
    if not path.exists():
        if path.suffix in (".json", ".jsonl"):
            raise PipelineError(f"{flag('data', prefix)}: file not found: {data}")
        return "hf"  # a hub dataset name such as "nlphuji/flickr30k"
    if path.suffix != ".json":
        raise PipelineError(f"{data}: cannot guess the format of a '{path.suffix}' file; pass "
                            f"{flag('format', prefix)}")
    doc = _load_json(path)
    if isinstance(doc, dict) and "annotations" in doc and "images" in doc:
        return "coco"
    if isinstance(doc, dict) and isinstance(doc.get("images"), list) and doc["images"] and "sentences" in doc["images"][0]:
        return "karpathy"
    if isinstance(doc, list) and doc and isinstance(doc[0], dict) and {"image", "caption"} <= set(doc[0]):
        return "albef"
    raise PipelineError(f"{data}: not a known annotation format (albef, karpathy, coco); pass "
                        f"{flag('format', prefix)}")


def read_corpus(
    data: str,
    fmt: str = "auto",
    image_root: str | None = None,
    split: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    id_column: str | None = None,
    bytes_dir: Path | None = None,
    log: Callable[[str], None] = print,
    prefix: str = "",
    recorded: Path | None = None,
) -> Corpus:
    """Read any supported input into a checked Corpus (every image file must exist). Errors name the options
    as `--{prefix}data`, `--{prefix}image-root`, ... (read_source's options). `recorded`: the corpus folder of
    the last run (RUN/mine/corpus), whose image stats a reader that reads the images (webdataset) re-uses for
    members whose size and shard mtime are unchanged instead of reading, checking and hashing them again."""
    if fmt not in FORMATS:
        raise PipelineError(f"{flag('format', prefix)}: unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    if fmt == "auto":
        fmt = detect_format(data, prefix)
        log(f"[corpus] {flag('format', prefix)} auto: reading {data} as '{fmt}'")
    root = Path(image_root).resolve() if image_root else None
    if root is not None and not root.is_dir():
        raise PipelineError(f"{flag('image_root', prefix)}: not a directory: {image_root}")
    shards = wds.shard_paths(data, flag("data", prefix)) if fmt == "webdataset" else []
    if fmt not in ("hf", "webdataset") and not Path(data).is_file():
        raise PipelineError(f"{flag('data', prefix)}: file not found: {data}")
    if root is None and fmt == "webdataset":
        root = Path(wds.common_folder(shards))  # member references are stored relative to the shards' folder
    elif root is None and fmt != "hf":
        root = Path(data).resolve().parent  # relative paths are relative to the annotation file
    b = _Builder(str(data), root, bytes_dir, root_given=image_root is not None, prefix=prefix)
    read_stats = None
    if fmt == "webdataset":
        known = known_files(recorded, str(root)) if recorded is not None else {}   # by stored path
        stored = Corpus([], [], [], [], [], str(root)).stored_path
        read_stats = read_webdataset(shards, b, lambda ref: known.get(stored(ref)))
    elif fmt == "albef":
        read_albef(Path(data), b, split)
    elif fmt == "karpathy":
        read_karpathy(Path(data), b, split)
    elif fmt == "coco":
        read_coco(Path(data), b, split)
    else:
        read_hf(data, b, split, image_column, caption_column, id_column)
    corpus = b.build()
    if read_stats is not None:
        corpus.image_files = [read_stats[i] for i in corpus.image_ids]
    log(f"[corpus] {corpus.num_images} images, {corpus.num_texts} captions")
    return corpus


def read_source(cfg: Any, prefix: str = "", bytes_dir: Path | None = None,
                log: Callable[[str], None] = print, recorded: Path | None = None) -> Corpus:
    """The corpus a stage's options describe: `{prefix}data`, `{prefix}format`, ... (SOURCE_OPTIONS) of `cfg`;
    every stage that reads annotations (mine's corpus, evaluate's test set, distill's --val-data) reads them here,
    so each takes the same options, with the same defaults, and its errors name its own. `recorded`: see
    read_corpus."""
    get = {name: getattr(cfg, prefix + name) for name in SOURCE_OPTIONS}
    return read_corpus(get["data"], get["format"], get["image_root"], get["split"], get["image_column"],
                       get["caption_column"], get["id_column"], bytes_dir=bytes_dir, log=log, prefix=prefix,
                       recorded=recorded)
