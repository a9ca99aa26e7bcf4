"""A distill step's activation memory at CLIP ViT-B/16's size, measured on the CPU: what the default lists need,
and what `--grad-checkpointing` makes of it.

A ViT or a text transformer encodes each item on its own, so the activations a step keeps for its backward are
linear in the items it encodes with gradient. Each point here is one fresh process (`--child`): random CLIP ViT-B/16
towers (`bench.gpu_epoch_bench.towers`, distill's own `StudentTowers`), then one forward and backward of n images
(or captions) with gradient, fp32, as a warm-up (at the larger n, three more, timed: the median); then one more with
the heap's bytes in use (glibc's mallinfo2, not
torch's own accounting) read after every operation, forward and backward, and their peak above what was in use
before, the weights' gradients (kept from the timed step) among it. Resident memory would not do: the allocator keeps freed pages, so a checkpointed step's resident peak stays
near the whole step's. Two n per kind give the slope, one item's activations, every constant cancelled out. Multiplied by the transfer demo's per-step counts (`bench.gpu_epoch_bench.ROWS`), the slopes
say what each row's step holds at once. The times at the larger n give the recompute's cost on this CPU, next to its
FLOPs (`bench.gpu_epoch_bench.epoch_flops`).

On a GPU in bf16 the plain towers' activations are about half of these; the checkpointed ones, mostly the
blocks' inputs, which autocast leaves in fp32 on the residual stream, shrink less; `bench/gpu_epoch_bench.py` measures the rows' peak GPU
memory there directly. Linux (glibc) only.
"""
from __future__ import annotations

import functools
import json
import statistics
import sys
import time

from bench.gpu_epoch_bench import CLIP_B16, ROWS
from bench.common import run_child

POINTS = {"image": (4, 16), "caption": (32, 128)}   # items per point: the slope's two ends
TIMED = 3   # steps timed at the larger n (the median), after a warm-up step


@functools.cache
def _mallinfo2():
    """glibc's mallinfo2, loaded once: it is read after every operation of a measured step."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    fn = ctypes.CDLL("libc.so.6").mallinfo2
    fn.restype = MallInfo2
    return fn


def heap_in_use() -> int:
    """Bytes the C heap has handed out and not taken back (glibc's mallinfo2: arenas and mmapped blocks)."""
    info = _mallinfo2()()
    return info.uordblks + info.hblkhd


def child(kind: str, n: int, checkpointed: bool, geometry: dict = CLIP_B16, timed: int = 0) -> dict:
    """One point: the peak heap in use (MB) above its start over a forward and backward of `n` items of `kind` with
    gradient, after one step unobserved; with `timed`, the median seconds of that many more unobserved steps."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.gpu_epoch_bench import step_inputs, step_loss, towers

    class Peak(TorchDispatchMode):   # the CPU's backward runs on this thread, so the mode sees it too
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Peak.peak = max(Peak.peak, heap_in_use())
            return out

    torch.manual_seed(0)
    model = towers(geometry, "cpu", grad_checkpointing=checkpointed)
    one = {"image": dict(images=n, texts=1), "caption": dict(images=1, texts=n)}[kind]
    x = step_inputs(dict(one, pair_images=one["images"], pair_texts=one["texts"]), geometry, "cpu", 1.0)
    seconds = []
    for i in range(1 + timed):   # the first: a warm-up (a fresh process's first step is slower), never timed
        started = time.perf_counter()
        step_loss(*model(**x)[:3]).backward()
        seconds.append(time.perf_counter() - started)
    start = heap_in_use()   # the weights' gradients of the steps before: kept, so the next step adds into them
    with Peak():
        step_loss(*model(**x)[:3]).backward()
    return {"peak_mb": (Peak.peak - start) / 2**20, "seconds": statistics.median(seconds[1:]) if timed else None}


def main() -> dict:
    per_item: dict[str, dict[str, float]] = {}   # {"whole" | "checkpointed": {"image": MB, "caption": MB}}
    points = {}
    for mode in ("whole", "checkpointed"):
        per_item[mode] = {}
        for kind, (small, large) in POINTS.items():
            a, b = (run_child("bench.activation_bench", "--child", kind, str(n), mode, str(timed))
                    for n, timed in ((small, 0), (large, TIMED)))
            per_item[mode][kind] = (b["peak_mb"] - a["peak_mb"]) / (large - small)
            points[f"{mode} {kind}"] = {"n": [small, large], "peak_mb": [a["peak_mb"], b["peak_mb"]],
                                        "seconds_at_n_large": b["seconds"]}
    rows = {}
    for name, row in ROWS.items():
        if row.get("frozen") or row.get("cut") is not None:
            continue   # their outside items keep part of a tower's activations: the GPU benchmark measures them
        per = per_item["checkpointed" if row.get("checkpointed") else "whole"]
        mb = row["images"] * per["image"] + row["texts"] * per["caption"]
        rows[name] = {"images_per_step": row["images"], "captions_per_step": row["texts"],
                      "activations_gib_fp32": mb / 1024}
    base = rows["none (batch 64)"]["activations_gib_fp32"]
    for r in rows.values():
        r["vs_none"] = r["activations_gib_fp32"] / base
    seconds = lambda mode: sum(points[f"{mode} {k}"]["seconds_at_n_large"] for k in POINTS)
    return {"geometry": "CLIP ViT-B/16 (random weights), fp32 on the CPU",
            "activations_mb_per_item": per_item,
            "checkpointed_vs_whole_memory": {k: per_item["checkpointed"][k] / per_item["whole"][k] for k in POINTS},
            "checkpointed_vs_whole_time": seconds("checkpointed") / seconds("whole"),
            "rows": rows, "points": points}


if __name__ == "__main__":
    if "--child" in sys.argv:
        kind, n, mode, timed = sys.argv[sys.argv.index("--child") + 1:][:4]
        print(json.dumps(child(kind, int(n), mode == "checkpointed", timed=int(timed))))
    else:
        from bench.common import write

        write("activation", main())
