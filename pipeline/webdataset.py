"""WebDataset shards (img2dataset's output for CC3M, LAION, DataComp): plain .tar files whose members are
`KEY.jpg` (or .jpeg, .png, .webp) beside `KEY.txt` or `KEY.json` ({"caption": ...}) holding the caption.

An image inside a shard is never extracted: the corpus refers to it as a *member reference*,

    SHARD.tar#OFFSET+SIZE      (bytes OFFSET .. OFFSET+SIZE-1 of SHARD.tar: the member's data, stored uncompressed)

which every image path of the pipeline may be (`is_member`, `stat_image`, `read_image_bytes`,
`open_image_file`), so the later stages read an image with one seek and one read, and a run costs no disk
beyond the shards (measured against extraction in docs/design.md, "WebDataset shards"). Like any image path, a
reference under the image root (the shards' common folder, or --image-root) is stored relative to it, so a
moved shard folder is reached with --image-root; the image's identity is its bytes' SHA-256, as everywhere.
A member's (size, mtime) are its own size and its shard's mtime: a shard that is copied or touched is re-hashed
member by member (the bytes decide), one that is unchanged is not read again.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import PipelineError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
_MEMBER = re.compile(r"^(?P<shard>.+\.tar)#(?P<offset>\d+)\+(?P<size>\d+)$")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ---------------------------------------------------------------- member references
def member_ref(shard: str, offset: int, size: int) -> str:
    return f"{shard}#{offset}+{size}"


def split_member(path: str) -> Optional[tuple[str, int, int]]:
    """(shard, offset, size) of a member reference; None for an ordinary file path."""
    m = _MEMBER.match(path)
    return (m["shard"], int(m["offset"]), int(m["size"])) if m else None


def is_member(path: str) -> bool:
    return _MEMBER.match(path) is not None


def stat_image(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of an image path: a file's own, or a member's size and its shard's mtime.
    FileNotFoundError if the file (or shard) is gone."""
    member = split_member(path)
    st = os.stat(member[0] if member else path)
    return (member[2] if member else st.st_size), st.st_mtime_ns


def image_exists(path: str) -> bool:
    """A file, or a member whose bytes lie within an existing shard."""
    member = split_member(path)
    if member is None:
        return os.path.isfile(path)
    shard, offset, size = member
    return os.path.isfile(shard) and os.path.getsize(shard) >= offset + size


def read_image_bytes(path: str) -> bytes:
    """The bytes of an image file or shard member (fewer than SIZE if the shard was cut short since)."""
    member = split_member(path)
    if member is None:
        with open(path, "rb") as f:
            return f.read()
    shard, offset, size = member
    with open(shard, "rb") as f:
        f.seek(offset)
        return f.read(size)


def sha256_image(path: str) -> str:
    if not is_member(path):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha256(read_image_bytes(path)).hexdigest()


def open_image_file(path: str) -> Any:
    """What PIL's Image.open reads: the path itself, or the member's bytes."""
    return io.BytesIO(read_image_bytes(path)) if is_member(path) else path


def describe(path: str) -> str:
    """An image path for an error: a member is named by its shard and key (read from the tar header before its
    data), a file by its path."""
    member = split_member(path)
    if member is None:
        return path
    shard, offset, _ = member
    try:
        with open(shard, "rb") as f:
            f.seek(offset - tarfile.BLOCKSIZE)
            name = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape").name
        return f"{shard}, key '{key_and_extension(name)[0]}' ({path})"
    except (OSError, ValueError, tarfile.HeaderError):
        return path


# ---------------------------------------------------------------- shard lists
def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as the shell does it: 'a/{00000..00002}.tar' -> a/00000.tar, a/00001.tar, a/00002.tar
    (numbers zero-padded to the wider end when either end has a leading zero), '{a,b}.tar' -> a.tar, b.tar;
    several braces expand as their product, in order."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m[1], pattern[:m.start()], pattern[m.end():]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng[1]), int(rng[2])
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (rng[1], rng[2]))
        width = max(len(rng[1]), len(rng[2])) if padded else 0
        step = 1 if hi >= lo else -1
        items = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise PipelineError(f"'{pattern}': a brace holds a range {{00000..00009}} or a list {{a,b}}, not '{{{body}}}'")
    return [p for item in items for p in expand_braces(head + item + tail)]


def shard_paths(data: str, option: str = "--data") -> list[str]:
    """The shard files `data` names: shard paths or brace patterns separated by spaces, or a folder (its *.tar,
    sorted). Absolute and resolved; each must exist, and none may repeat."""
    if not data or not data.strip():
        raise PipelineError(f"{option}: no shards named")
    shards: list[str] = []
    for item in data.split():
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(glob.escape(item), "*.tar")))
            if not found:
                raise PipelineError(f"{option}: folder {item} holds no .tar shards")
            shards += found
            continue
        for path in expand_braces(item):
            if not os.path.isfile(path):
                raise PipelineError(f"{option}: shard not found: {path}" + (f" (from {item})" if path != item else ""))
            shards.append(path)
    resolved = [str(Path(p).resolve()) for p in shards]
    seen: set[str] = set()
    for p in resolved:
        if p in seen:
            raise PipelineError(f"{option}: shard {p} is named twice")
        seen.add(p)
    return resolved


def looks_like_shards(data: str) -> bool:
    """For --format auto: every item is a .tar file or a brace pattern of them."""
    items = data.split()
    return bool(items) and all(i.endswith(".tar") and (os.path.isfile(i) or "{" in i) for i in items)


def common_folder(shards: list[str]) -> str:
    """The folder every shard is under (the default image root)."""
    return os.path.commonpath([os.path.dirname(s) for s in shards])


# ---------------------------------------------------------------- reading shards
def key_and_extension(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member name up to the first '.' of its last path component, the
    extension the rest, lower-cased ('a/000001.jpg' -> ('a/000001', 'jpg'))."""
    name = name[2:] if name.startswith("./") else name
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (folder + "/" if folder else "") + stem, ext.lower() if dot else ""


class Sample:
    """One key of a shard: its image member and its caption(s)."""

    def __init__(self, key: str):
        self.key = key
        self.image: Optional[tuple[int, int, str]] = None    # offset, size, extension
        self.txt: Optional[bytes] = None
        self.json: Optional[bytes] = None


def _members(shard: str, tar: tarfile.TarFile, raw: Any, size: int) -> Iterator[tarfile.TarInfo]:
    """The shard's members, refusing a truncated or damaged tar (a member whose data runs past the end of the
    file, a cut header, a header that does not parse, no end-of-archive block), naming the last key read.
    (tarfile itself ends the archive quietly at a cut or damaged header after the first.)"""
    last = None
    try:
        for info in tar:
            if info.offset_data + info.size > size:
                raise PipelineError(f"{shard}: truncated tar: key '{key_and_extension(info.name)[0]}' is cut short "
                                    f"({size - info.offset_data} of {info.size} bytes)")
            last = info
            yield info
    except tarfile.ReadError as e:
        after = f" after key '{key_and_extension(last.name)[0]}'" if last else ""
        raise PipelineError(f"{shard}: truncated or damaged tar{after} ({e})") from None
    if tar.offset + tarfile.BLOCKSIZE > size:   # a tar ends with zero blocks; without them it was cut short
        after = f" after key '{key_and_extension(last.name)[0]}'" if last else ""
        what = "a header cut short" if size > tar.offset else "no end-of-archive block"
        raise PipelineError(f"{shard}: truncated tar: {what}{after}")
    raw.seek(tar.offset)
    if raw.read(tarfile.BLOCKSIZE).count(0) != tarfile.BLOCKSIZE:   # not the end: a header tarfile could not read
        after = f" after key '{key_and_extension(last.name)[0]}'" if last else ""
        raise PipelineError(f"{shard}: damaged tar: the header at byte {tar.offset}{after} does not parse")


def read_shard(shard: str) -> tuple[list[Sample], int]:
    """The samples of one plain (uncompressed) tar, in order, and the shard's mtime_ns; images are located, not
    read."""
    st = os.stat(shard)
    try:
        tar = tarfile.open(shard, mode="r:")
    except tarfile.ReadError as e:
        raise PipelineError(f"{shard}: not a plain (uncompressed) tar ({e}); members are read by offset, so "
                            "compressed shards must be decompressed first (e.g. gunzip)") from None
    samples: dict[str, Sample] = {}
    with tar, open(shard, "rb") as raw:
        for info in _members(shard, tar, raw, st.st_size):
            if not info.isfile():
                continue
            key, ext = key_and_extension(info.name)
            if key.rpartition("/")[2].startswith("__"):   # webdataset's own bookkeeping, e.g. __index__
                continue
            sample = samples.setdefault(key, Sample(key))
            if ext in IMAGE_EXTENSIONS:
                if info.issparse():
                    raise PipelineError(f"{shard}: key '{key}': image stored as a sparse file (not readable by offset)")
                if sample.image is not None:
                    raise PipelineError(f"{shard}: key '{key}' has two images (.{sample.image[2]} and .{ext})")
                sample.image = (info.offset_data, info.size, ext)
            elif ext in CAPTION_EXTENSIONS:
                raw.seek(info.offset_data)
                setattr(sample, ext, raw.read(info.size))
    return list(samples.values()), st.st_mtime_ns


def captions_of(shard: str, sample: Sample) -> list[Any]:
    """A sample's caption(s): KEY.txt, else KEY.json's 'caption' (a string or a list of strings)."""
    where = f"{shard}: key '{sample.key}'"
    if sample.txt is not None:
        try:
            return [sample.txt.decode("utf-8")]
        except UnicodeDecodeError as e:
            raise PipelineError(f"{where}: {sample.key}.txt is not UTF-8 (byte {e.object[e.start]:#x} at offset "
                                f"{e.start})") from None
    if sample.json is not None:
        try:
            doc = json.loads(sample.json)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PipelineError(f"{where}: {sample.key}.json is not valid JSON ({e})") from None
        caption = doc.get("caption") if isinstance(doc, dict) else None
        if caption is not None:
            return caption if isinstance(caption, list) else [caption]
    raise PipelineError(f"{where}: an image but no caption (no {sample.key}.txt, and no 'caption' in "
                        f"{sample.key}.json)" if sample.json is not None else
                        f"{where}: an image but no caption (no {sample.key}.txt or {sample.key}.json)")


def check_image(shard: str, key: str, data: bytes, ext: str) -> None:
    """The member is an image PIL can identify and whose structure verifies (cheap: ~20 us, no pixel decoding;
    an image cut short inside its pixel data is named when a stage decodes it, by shard and key as well)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except UnidentifiedImageError:
        raise PipelineError(f"{shard}: key '{key}': the .{ext} member does not decode as an image (not an image "
                            f"format PIL knows; {len(data)} bytes starting {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise PipelineError(f"{shard}: key '{key}': the .{ext} member does not decode as an image "
                            f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_shards(shards: list[str], add_image: Callable[[str, str, str], str],
                add_text: Callable[[str, str, Any, str], None],
                known: Optional[Callable[[str], Optional[tuple[int, int, str]]]] = None
                ) -> dict[str, tuple[int, int, str]]:
    """Every sample of every shard into the corpus builder (add_image(key, member_ref, where), add_text(text_id,
    image_id, caption, where)); each image is read once, checked and hashed, unless `known(member_ref)` (the last
    run's stats) has it with the same size and shard mtime: its bytes were checked then. Returns (size, mtime_ns,
    sha256) by image id, the stats mine would compute (so it need not read the shards again)."""
    stats: dict[str, tuple[int, int, str]] = {}
    with_image = 0
    for shard in shards:
        samples, mtime = read_shard(shard)
        with open(shard, "rb") as raw:
            for sample in samples:
                if sample.image is None:   # metadata alone (e.g. a failed download's .json): no sample
                    continue
                with_image += 1
                offset, size, ext = sample.image
                ref = member_ref(shard, offset, size)
                old = known(ref) if known is not None else None
                if old is not None and old[2] and (old[0], old[1]) == (size, mtime):
                    digest = old[2]
                else:
                    raw.seek(offset)
                    data = raw.read(size)
                    check_image(shard, sample.key, data, ext)
                    digest = hashlib.sha256(data).hexdigest()
                caps = captions_of(shard, sample)
                where = f"{shard}, key '{sample.key}'"
                iid = add_image(sample.key, ref, where)
                for j, cap in enumerate(caps):
                    add_text(f"{iid}#{j}", iid, cap, where + (f", caption {j}" if len(caps) > 1 else ""))
                stats[iid] = (size, mtime, digest)
    return stats
