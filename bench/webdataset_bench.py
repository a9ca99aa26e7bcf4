"""WebDataset shards: read the images in place (member references) or extract them once into the run?

Synthetic shards: N small JPEGs (SIZE px, smooth random content, about 5-10 kB each, the size of img2dataset's
256 px output), PER_SHARD per plain .tar, each with its KEY.txt caption. Timed in one process with a warm page
cache (best of REPEAT; the four reads interleaved, round by round, so that a busy machine slows each alike), so
the numbers are CPU and system-call costs, not the disk's:

  read_corpus          `--format webdataset` read: tar headers, every image read once, verified and hashed
  read_corpus_rerun    the same with the last run's record (mine's rerun): headers and captions only
  extract              the alternative's extra step: every image written to RUN/images/<digest>.img
                       (content-addressed, as the hf reader stores image bytes), after the same read
  bytes_in_place       N images' bytes by member reference (open shard, seek, read), as the stages read them
  bytes_extracted      N images' bytes from the extracted files (open, read)
  decode_in_place      load_image (read + JPEG decode + RGB) by member reference
  decode_extracted     load_image from the extracted files
  extra_disk           what the run holds beyond the shards: 0 in place; the extracted folder's allocated
                       blocks (st_blocks) and its apparent size otherwise
"""
from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time
from pathlib import Path


def _shards(root: Path, n: int, per_shard: int, size: int) -> tuple[list[str], int]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    shards, total = [], 0
    for s in range(0, n, per_shard):
        path = root / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                small = rng.integers(0, 255, size=(size // 16, size // 16, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((size, size), Image.BILINEAR).save(buf, "JPEG", quality=90)
                for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", f"picture {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                total += len(buf.getvalue())
        shards.append(str(path))
    return shards, total


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(n_images: int = 3000, per_shard: int = 1000, size: int = 160, repeat: int = 7) -> dict:
    import hashlib

    from pipeline import webdataset as wds
    from pipeline.corpus import read_corpus
    from pipeline.models import load_image

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "shards").mkdir()
        shards, image_bytes = _shards(root / "shards", n_images, per_shard, size)
        shard_bytes = sum(os.path.getsize(s) for s in shards)
        data = " ".join(shards)
        corpus = None

        def read():
            nonlocal corpus
            corpus = read_corpus(data, "webdataset", log=lambda *_: None)

        read_s = _best(read, repeat)
        refs = corpus.image_paths
        import pyarrow.parquet as pq

        (root / "record").mkdir()
        pq.write_table(corpus.images_table(), root / "record" / "images.parquet")
        rerun_s = _best(lambda: read_corpus(data, "webdataset", log=lambda *_: None, recorded=root / "record"),
                        repeat)
        extracted_dir = root / "run" / "images"

        def extract():   # what the extracting design adds to the read: one content-addressed file per image
            if extracted_dir.exists():
                for p in extracted_dir.iterdir():
                    p.unlink()
            extracted_dir.mkdir(parents=True, exist_ok=True)
            out = []
            for ref in refs:
                body = wds.read_image_bytes(ref)
                path = extracted_dir / f"{hashlib.sha1(body).hexdigest()[:16]}.img"
                tmp_path = path.with_name(f".{path.name}.tmp")
                tmp_path.write_bytes(body)
                os.replace(tmp_path, path)
                out.append(str(path))
            return out

        extract_s = _best(extract, repeat)
        files = extract()
        allocated = sum(os.stat(f).st_blocks * 512 for f in files)
        apparent = sum(os.path.getsize(f) for f in files)

        def read_files():
            for f in files:
                with open(f, "rb") as fh:
                    fh.read()

        reads = {"bytes_in_place_s": lambda: [wds.read_image_bytes(r) for r in refs], "bytes_extracted_s": read_files,
                 "decode_in_place_s": lambda: [load_image(r) for r in refs],
                 "decode_extracted_s": lambda: [load_image(f) for f in files]}
        best = {k: float("inf") for k in reads}
        for _ in range(repeat):
            for k, fn in reads.items():
                best[k] = min(best[k], _best(fn, 1))
        result = {
            "n_images": n_images, "per_shard": per_shard, "image_px": size,
            "mean_image_kb": image_bytes / n_images / 1024, "shards_mb": shard_bytes / 2**20,
            "read_corpus_s": read_s,
            "read_corpus_rerun_s": rerun_s,
            "extract_s": extract_s,
            **best,
            "extra_disk_in_place_mb": 0.0,
            "extra_disk_extracted_mb": allocated / 2**20,
            "extra_disk_extracted_apparent_mb": apparent / 2**20,
            "extracted_files": len(files),
        }
        for k in ("read_corpus_s", "read_corpus_rerun_s", "extract_s", "bytes_in_place_s", "bytes_extracted_s", "decode_in_place_s",
                  "decode_extracted_s"):
            result[k[:-2] + "_us_per_image"] = result[k] / n_images * 1e6
        return result


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
