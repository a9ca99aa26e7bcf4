"""distill's data path: the same training steps fed by the streaming Parquet loader vs pre-materialised tensors.

A real teacher cache is made by the real stages (tiny CLIP student, tiny BLIP teacher, synthetic corpus).
Both modes run `StudentTowers` + `compute_loss` + AdamW, exactly the stage's step; only the batch source
differs. Data-path share = (streaming - materialised) / streaming step time. Peak host memory of a process
that streams every batch (no model) is measured with the shards as they are and copied 10 times.

`--frozen-negatives` at 32 negatives: the same materialised batches, steps with every row encoded with gradient
and with the negatives encoded without it, alternated step by step so that machine noise hits both alike; for
cprd (reads the negatives) and none (reads only the pairs, so the frozen step skips the negatives).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

N_IMAGES, BATCH, STEPS, WARMUP, WORKERS = 600, 64, 30, 3, 2
K_FROZEN = 32   # negatives per query in the frozen-negatives comparison (the transfer demo's setting)


def _setup(tmp: Path) -> dict[int, Path]:
    """A teacher cache per mined k: 8 for the data-path rows, K_FROZEN for the frozen-negatives comparison."""
    from bench.common import synthetic_corpus
    from pipeline.tiny_models import save_tiny_blip, save_tiny_clip
    from stages import stage

    ann = synthetic_corpus(tmp / "data", N_IMAGES, 5)
    clip = save_tiny_clip(tmp / "clip", hidden=128, layers=4)
    blip = save_tiny_blip(tmp / "blip")
    runs = {}
    for k in (8, K_FROZEN):
        runs[k] = tmp / f"run-k{k}"
        stage("mine").run(run=str(runs[k]), data=str(ann), student=str(clip), k=k, device="cpu")
        stage("score-teacher").run(run=str(runs[k]), teacher=str(blip), device="cpu")
    return runs


def _batches(run: Path, workers: int, shards: list[Path] | None = None, steps: int = STEPS + WARMUP,
             num_negatives: int = 8):
    from pipeline.corpus import load_tables
    from pipeline.data import BatchSpec, DistillBatches, Processors, loader
    from pipeline.models import load_processors

    student = json.loads((run / "mine" / "manifest.json").read_text())["config"]["student"]
    proc, tok = load_processors(student)
    files = shards or sorted((run / "teacher").glob("part-*.parquet"))
    spec = BatchSpec(batch_size=BATCH, num_negatives=num_negatives, seed=0, shuffle_buffer=10000)
    data = DistillBatches(spec, files, load_tables(run / "mine" / "corpus"), Processors(proc, tok, 32), epoch=0,
                          batches=steps)
    return loader(data, workers)


def _time_steps(run: Path, source) -> float:
    import torch

    from pipeline.models import DualEncoder
    from pipeline.losses import registry
    from stages.distill import StudentTowers, compute_loss

    torch.manual_seed(0)
    student = json.loads((run / "mine" / "manifest.json").read_text())["config"]["student"]
    towers = StudentTowers(DualEncoder(student)).train()
    opt = torch.optim.AdamW(towers.parameters(), lr=1e-4)
    cprd = registry.get("cprd")
    times = []
    t = time.perf_counter()
    for i, batch in enumerate(source):
        img, txt, scale, _ = towers(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        batch = {k: v for k, v in batch.items() if k not in ("false_negatives", "dropped_by_margin")}
        compute_loss(cprd, cprd.options(), 1.0, img, txt, scale, batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return sum(times[WARMUP:]) / len(times[WARMUP:])


def _time_frozen(run: Path, loss_name: str, steps: int = 12) -> dict:
    """Mean step time with every row encoded with gradient vs the negatives frozen, alternated step by step."""
    import torch

    from pipeline.losses import registry
    from pipeline.models import DualEncoder
    from stages.distill import StudentTowers, compute_loss, pairs_only

    torch.manual_seed(0)
    batches = [{k: v for k, v in b.items() if k not in ("false_negatives", "dropped_by_margin")}
               for b in _batches(run, 0, steps=steps + 1, num_negatives=K_FROZEN)]
    student = json.loads((run / "mine" / "manifest.json").read_text())["config"]["student"]
    towers = StudentTowers(DualEncoder(student)).train()
    opt = torch.optim.AdamW(towers.parameters(), lr=1e-5)
    loss = registry.get(loss_name)
    options = loss.options(num_valid=K_FROZEN) if loss_name == "cprd" else loss.options()

    def step(batch: dict, frozen: bool) -> float:
        live = pairs_only(batch, others=loss.fn is not None) if frozen else {}
        t = time.perf_counter()
        img, txt, scale, _ = towers(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], **live)
        compute_loss(loss, options, 1.0, img, txt, scale, batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t

    step(batches[0], False), step(batches[0], True)   # warm-up
    grad, frozen = [], []
    for b in batches[1:]:
        grad.append(step(b, False))
        frozen.append(step(b, True))
    g, f = sum(grad) / len(grad), sum(frozen) / len(frozen)
    return {"step_s_grad": g, "step_s_frozen": f, "speedup": g / f,
            "unique_images_per_batch": sum(len(b["pixel_values"]) for b in batches) / len(batches),
            "pair_images_per_batch": sum(len(b["pair_image"].unique()) for b in batches) / len(batches)}


def stream_only(run: str, copies: int) -> None:
    """Child process: stream every batch of the teacher shards (copied `copies` times), report peak RSS."""
    from bench.common import peak_rss_mb

    run = Path(run)
    shards = sorted((run / "teacher").glob("part-*.parquet"))
    if copies > 1:
        extra = run / f"copies-{copies}"
        extra.mkdir(exist_ok=True)
        for c in range(copies):
            for s in shards:
                shutil.copy(s, extra / f"{c:03d}-{s.name}")
        shards = sorted(extra.glob("*.parquet"))
    import pyarrow.parquet as pq
    rows = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
    n = 0
    for batch in _batches(run, 0, shards, steps=rows // BATCH):
        n += 1
    print(json.dumps({"copies": copies, "rows": rows, "batches": n, "peak_rss_mb": peak_rss_mb()}))


def main() -> dict:
    from bench.common import run_child

    with tempfile.TemporaryDirectory() as tmp:
        runs = _setup(Path(tmp))
        run = runs[8]
        materialised = list(_batches(run, 0))               # built once, before timing
        stream_s = _time_steps(run, _batches(run, WORKERS))
        mem_s = _time_steps(run, materialised)
        frozen = {name: _time_frozen(runs[K_FROZEN], name) for name in ("cprd", "none")}
        one = run_child("bench.distill_bench", "--stream-only", str(run), "1")
        ten = run_child("bench.distill_bench", "--stream-only", str(run), "10")
    share = max(0.0, (stream_s - mem_s) / stream_s)
    return {
        "student": "CLIP hidden 128, 4+4 layers, 32x32 images", "batch_size": BATCH, "num_negatives": 8,
        "loader_workers": WORKERS, "timed_steps": STEPS,
        "step_s_streaming": stream_s, "step_s_materialised": mem_s,
        "data_path_share_of_step": share, "goal_share_below": 0.05,
        "stream_peak_rss_mb_1x": one["peak_rss_mb"], "stream_peak_rss_mb_10x": ten["peak_rss_mb"],
        "rows_1x": one["rows"], "rows_10x": ten["rows"],
        "peak_rss_ratio_10x_over_1x": ten["peak_rss_mb"] / one["peak_rss_mb"],
        "frozen_negatives": {"num_negatives": K_FROZEN, **frozen},
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--stream-only":
        stream_only(sys.argv[2], int(sys.argv[3]))
    else:
        from bench.common import write

        write("distill", main())
