"""Helpers for benchmarks: results as JSON under bench/results/, peak RSS from a child process."""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(module: str, *args: str) -> dict:
    """Run `python -m module args...`; the child prints one JSON object as its last stdout line."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


def synthetic_corpus(root: Path, n_images: int, per_image: int, size: int = 64, words: int = 0) -> Path:
    """An ALBEF annotation file of `n_images` random size x size images with `per_image` distinct captions each
    (`words` > 0: about that many random words more per caption)."""
    import numpy as np
    from PIL import Image

    vocab = "a small red circle sits to the left of a large blue square while a green triangle waits above".split()
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n_images):
        arr = rng.integers(0, 255, size=(size // 4, size // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        extra = lambda: " " + " ".join(rng.choice(vocab, size=int(rng.integers(words * 3 // 4, words + 1))))
        records.append({"image": f"images/{i}.png",
                        "caption": [f"picture {i} caption {j} with a few words of text" + (extra() if words else "")
                                    for j in range(per_image)]})
    (root / "ann.json").write_text(json.dumps(records))
    return root / "ann.json"


def mined_pairs(run: Path, n: int) -> tuple[dict, dict, dict]:
    """The first n scored pairs of a run (score-teacher's pairs shard: image_id, text_id, score), with the run's
    image paths and caption texts by id: the inputs of a benchmark's naive per-pair loop."""
    import pyarrow.parquet as pq

    table = pq.read_table(run / "teacher" / "pairs" / "part-00000.parquet").slice(0, n).to_pydict()
    images = pq.read_table(run / "mine" / "corpus" / "images.parquet").to_pydict()
    texts = pq.read_table(run / "mine" / "corpus" / "texts.parquet").to_pydict()
    return table, dict(zip(images["image_id"], images["path"])), dict(zip(texts["text_id"], texts["text"]))
