"""The corpus identity: what hashing every image's bytes costs, against the stat-only identity it replaced.

Synthetic image folder: N files of SIZE_KB random bytes (the size of a Flickr30K/COCO JPEG), written once, then
timed in one process (the page cache is warm, so `first` is the hashing cost, not the disk's; on a cold cache
the first run reads the folder from disk once, as embedding it does anyway):

  stat      os.stat of every file: the old identity (size + mtime)
  first     Corpus.file_stats() with nothing known: every file read and hashed (SHA-256)
  rerun     file_stats() with the last run's digests (size and mtime unchanged): stat + lookup
  touched   the same after touching 1% of the files: those are read again
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def main(n_files: int = 2000, size_kb: int = 150) -> dict:
    from pipeline.corpus import Corpus

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = []
        for i in range(n_files):
            p = root / f"img{i:06d}.jpg"
            p.write_bytes(os.urandom(size_kb * 1024))
            paths.append(str(p))
        ids = [f"i{i}" for i in range(n_files)]
        corpus = Corpus(ids, paths, ids, ids, ["a caption"] * n_files, image_root=str(root))

        t = time.perf_counter()
        for p in paths:
            os.stat(p)
        stat_s = time.perf_counter() - t

        t = time.perf_counter()
        stats = corpus.file_stats()
        first_s = time.perf_counter() - t
        known = {corpus.stored_path(p): s for p, s in zip(paths, stats)}

        t = time.perf_counter()
        corpus.file_stats(known)
        rerun_s = time.perf_counter() - t

        for p in paths[:: 100]:
            os.utime(p, ns=(0, 1))
        t = time.perf_counter()
        corpus.file_stats(known)
        touched_s = time.perf_counter() - t

    total_mb = n_files * size_kb / 1024
    return {"n_files": n_files, "size_kb": size_kb, "stat_s": stat_s, "first_s": first_s, "rerun_s": rerun_s,
            "touched_1pct_s": touched_s, "hash_mb_per_s": total_mb / first_s,
            "first_over_stat": first_s / stat_s, "rerun_over_stat": rerun_s / stat_s}


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
