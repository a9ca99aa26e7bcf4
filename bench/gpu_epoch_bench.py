"""A distill epoch's encoder work at a CLIP ViT-B/16 geometry on a GPU (random weights, bf16): time and peak memory
for `none`, the whole lists, the default lists and the default with the outside items cut (--outside-grad-layers),
and `make demo`'s KL row (2 per query).

Each step encodes what a step encodes on the transfer demo's data (`bench/epoch_bench.py`, per batch of its epoch:
images, captions, and which of them are the batch's pairs), so the rows differ as the demo's do, at the model size
the pipeline is for: `none` on batches of 64 (188 steps an epoch), every other row on batches of 256 (47 steps).
A step is the student's forward, a loss reading every feature, the backward and AdamW's step, with the towers of
`stages.distill.StudentTowers` (so the cut is distill's own); the data path, the list loss's few microseconds and
the stage's setup are the demo benchmark's business. Every step of a row encodes the same counts, so a few are
timed after a warm-up and multiplied by the epoch's steps. A row that does not fit the GPU is reported as such.

Every run also counts each row's FLOPs per epoch on the CPU (`epoch_flops`): the time ratio where the encoders'
arithmetic is the step, which is what a GPU at this size approaches. `make bench` times the rows where CUDA is
(elsewhere they are recorded as skipped, beside the FLOPs); `python -m bench.gpu_epoch_bench --tiny` runs the same
rows at a tiny geometry, on the CPU if there is no GPU (what the tests check).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

# per step (images, captions, of which the batch's pairs' images, captions): the demo's epoch counts per batch
PAIRS_256 = dict(pair_images=241, pair_texts=228, steps=47)   # a batch of 256 query rows
DEFAULT = dict(images=900, texts=340, **PAIRS_256)
ROWS = {
    "none (batch 64)": dict(images=63, texts=62, pair_images=63, pair_texts=62, steps=188),
    "whole lists (--out-of-batch encode)": dict(images=1675, texts=332, **PAIRS_256),
    "default (768 outside items by teacher rank)": DEFAULT,
    "default, --frozen-negatives": dict(DEFAULT, frozen=True),
    "default, --outside-grad-layers 1": dict(DEFAULT, cut=1),
    "default, --outside-grad-layers 3": dict(DEFAULT, cut=3),
    # make demo's KL row: 512 outside items by --out-of-batch-priority teacher-rank-steep (32,499 images and
    # 13,597 captions in the epoch)
    "2 per query by steep teacher rank (KL in make demo)": dict(images=691, texts=289, **PAIRS_256),
    "default, --grad-checkpointing": dict(DEFAULT, checkpointed=True),   # checkpointed rows go last
}
CLIP_B16 = dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=16),
                text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                          max_position_embeddings=77),
                projection_dim=512, text_length=32)
TINY = dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                        image_size=32, patch_size=8),
            text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                      max_position_embeddings=32),
            projection_dim=16, text_length=16)


def towers(geometry: dict, device: str, grad_checkpointing: bool = False):
    """StudentTowers over a random CLIP of `geometry` (the processors of a tiny saved CLIP: never used here), its
    blocks recomputed in the backward with `grad_checkpointing`."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from pipeline.models import DualEncoder
    from pipeline.tiny_models import save_tiny_clip
    from stages.distill import StudentTowers

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(geometry["text"], vocab_size=30522, bos_token_id=101, eos_token_id=102,
                                      pad_token_id=0),
                     vision_config=geometry["vision"], projection_dim=geometry["projection_dim"])
    with tempfile.TemporaryDirectory() as folder:
        enc = DualEncoder(str(save_tiny_clip(Path(folder) / "processors")), device=device, model=CLIPModel(cfg))
    return StudentTowers(enc, grad_checkpointing=grad_checkpointing).train()


def step_inputs(row: dict, geometry: dict, device: str, scale: float) -> dict:
    """Random pixels and captions of a step of `row` (counts times `scale`), the pairs first."""
    import torch

    n = lambda key: max(1, round(row[key] * scale))
    side, length = geometry["vision"]["image_size"], geometry["text_length"]
    g = torch.Generator().manual_seed(0)
    x = {"pixel_values": torch.randn(n("images"), 3, side, side, generator=g),
         "input_ids": torch.randint(1000, 30000, (n("texts"), length), generator=g),
         "attention_mask": torch.ones(n("texts"), length, dtype=torch.long)}
    x["input_ids"][:, -1] = 102                                  # CLIP pools at the eos token
    live = {}
    if row.get("frozen") or row.get("cut") is not None:
        live = {"live_images": torch.arange(n("images")) < n("pair_images"),
                "live_texts": torch.arange(n("texts")) < n("pair_texts"), "others": True,
                "others_grad_layers": row.get("cut")}
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in {**x, **live}.items()}


def step_loss(img, txt, scale):
    """A loss that reads every feature (the list losses' own cost is microseconds): what a timed step backwards,
    and what its FLOPs are counted through."""
    return scale * (img.float().square().mean() + txt.float().square().mean() - (img[:1] @ txt[:1].T).sum())


def measure(model, optimizer, inputs: dict, device: str, bf16: bool, timed: int) -> tuple[float, float | None]:
    """(seconds per step, peak GPU memory in GiB or None on the CPU) over `timed` steps after one warm-up."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
            img, txt, scale, _ = model(**inputs)
        step_loss(img, txt, scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(timed):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / timed
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def step_flops(model, row: dict, geometry: dict, scale: float = 1.0, **counts: int) -> int:
    """The FLOPs of one step of `row` (its counts times `scale`, or the `counts` given in their place) through
    `model`, forward and backward, as torch's FlopCounterMode counts them (matrix products and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = step_inputs(dict(row, **counts), geometry, "cpu", scale)
    with FlopCounterMode(display=False) as counter:
        step_loss(*model(**x)[:3]).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def epoch_flops(geometry: dict) -> dict[str, dict]:
    """Each row's arithmetic per epoch: the forward and backward FLOPs of what its steps encode, and against
    `none`'s. That is the time ratio where the encoders' arithmetic is the step, as on a GPU at this size, before
    memory and overheads.

    A ViT or a text transformer encodes each item on its own, so a step's FLOPs are linear in its items: counted on
    the CPU for one pair, then for one more item of each kind (a pair's image or caption, with gradient; another,
    as the row encodes those: with gradient, without, or through the last N blocks), and multiplied out by the
    row's counts."""
    models = {False: towers(geometry, "cpu"), True: towers(geometry, "cpu", grad_checkpointing=True)}
    per_mode: dict[tuple, dict[str, int]] = {}
    out = {}
    for name, row in ROWS.items():
        mode = (row.get("frozen"), row.get("cut"), bool(row.get("checkpointed")))
        if mode not in per_mode:
            model = models[mode[2]]
            count = lambda i, t, pi, pt: step_flops(model, row, geometry, images=i, texts=t, pair_images=pi,
                                                    pair_texts=pt)
            base = count(1, 1, 1, 1)
            per_mode[mode] = {"pair": base, "pair_image": count(2, 1, 2, 1) - base,
                              "pair_text": count(1, 2, 1, 2) - base, "other_image": count(2, 1, 1, 1) - base,
                              "other_text": count(1, 2, 1, 1) - base}
        per = per_mode[mode]
        step = per["pair"] + per["pair_image"] * (row["pair_images"] - 1) + \
            per["pair_text"] * (row["pair_texts"] - 1) + per["other_image"] * (row["images"] - row["pair_images"]) + \
            per["other_text"] * (row["texts"] - row["pair_texts"])
        out[name] = {"tflops_per_epoch": step * row["steps"] / 1e12,
                     **{f"gflops_per_{k}": v / 1e9 for k, v in per.items()}}
    for r in out.values():
        r["flops_vs_none"] = r["tflops_per_epoch"] / out["none (batch 64)"]["tflops_per_epoch"]
    return out


def main(tiny: bool = False, timed: int = 3) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not tiny and device == "cpu":
        return {"skipped": "no CUDA device: this benchmark measures GPU time and memory at CLIP ViT-B/16's size",
                "geometry": "CLIP ViT-B/16 (random weights)", "flops": epoch_flops(CLIP_B16)}
    geometry = TINY if tiny else CLIP_B16
    scale = 0.1 if tiny else 1.0            # the tiny run keeps the rows' proportions at a tenth of the counts
    model = towers(geometry, device)
    bf16 = device == "cuda"
    rows = {}
    checkpointed = False   # whether `model`'s blocks are recomputed in the backward
    for name, row in ROWS.items():
        if row.get("checkpointed") and not checkpointed:
            # the checkpointed rows come last: the same random weights, the plain towers freed before they are made
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
            model, checkpointed = towers(geometry, device, grad_checkpointing=True), True
        assert bool(row.get("checkpointed")) == checkpointed, "checkpointed rows go last"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        inputs = step_inputs(row, geometry, device, scale)
        try:
            seconds, peak = measure(model, optimizer, inputs, device, bf16, timed)
        except torch.cuda.OutOfMemoryError as e:
            rows[name] = {"out_of_memory": str(e).splitlines()[0]}
            optimizer.zero_grad(set_to_none=True)
            continue
        rows[name] = {"step_s": seconds, "epoch_s": seconds * row["steps"], "peak_memory_gib": peak,
                      "images_per_step": len(inputs["pixel_values"]), "texts_per_step": len(inputs["input_ids"]),
                      "steps": row["steps"]}
    base = rows["none (batch 64)"].get("epoch_s")
    for r in rows.values():
        if base and "epoch_s" in r:
            r["epoch_time_vs_none"] = r["epoch_s"] / base
    return {"device": device, "geometry": "tiny" if tiny else "CLIP ViT-B/16 (random weights)",
            "precision": "bf16" if bf16 else "fp32", "rows": rows, "flops": epoch_flops(geometry)}


if __name__ == "__main__":
    from bench.common import write

    tiny = "--tiny" in sys.argv
    write("gpu_epoch" + ("_tiny" if tiny else ""), main(tiny=tiny))
