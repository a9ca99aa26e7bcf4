"""score-teacher vs the naive loop: pairs/s on t2i with k=16, one run, the same tiny BLIP for both.

ours:   the real stage (`stages.score_teacher.run`) end to end on a mined run: image decode, vision tower
        once per unique image, batched text/cross side, Parquet shards and the join.
naive:  the model's own forward per pair, `model(input_ids, pixel_values, use_itm_head=True)`, vision
        recomputed every time (pixels pre-decoded, so it is not charged for image I/O);
batched: the same standard forward on batches of pairs (vision still recomputed per pair).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

N_IMAGES, PER_IMAGE, K = 120, 5, 16
NAIVE_PAIRS = 600  # the naive loop is timed on a prefix; its rate does not depend on which pairs


def main() -> dict:
    from bench.common import mined_pairs, synthetic_corpus
    from pipeline.tiny_models import save_tiny_blip, save_tiny_clip
    from stages import stage

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann = synthetic_corpus(tmp / "data", N_IMAGES, PER_IMAGE)
        clip = save_tiny_clip(tmp / "clip")
        blip = save_tiny_blip(tmp / "blip", hidden=128, layers=4, image_size=64)
        run = tmp / "run"
        quiet = dict(run=str(run), data=str(ann), student=str(clip), k=K, directions="t2i", device="cpu")
        stage("mine").run(**quiet)

        t0 = time.perf_counter()
        stage("score-teacher").run(run=str(run), teacher=str(blip), device="cpu", batch_size=256)
        ours_s = time.perf_counter() - t0
        manifest = json.loads((run / "teacher" / "manifest.json").read_text())
        pairs = manifest["num_pairs"]

        # the naive loop over the same pairs
        from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval

        table, path, text = mined_pairs(run, NAIVE_PAIRS)
        model = BlipForImageTextRetrieval.from_pretrained(blip).eval()
        proc, tok = AutoImageProcessor.from_pretrained(blip), AutoTokenizer.from_pretrained(blip)
        root = Path(ann).parent   # the corpus stores image paths relative to its folder
        pixels = {iid: proc(images=Image.open(root / path[iid]).convert("RGB"), return_tensors="pt")["pixel_values"]
                  for iid in set(table["image_id"])}
        naive_scores = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            for iid, tid in zip(table["image_id"], table["text_id"]):
                t = tok([text[tid]], return_tensors="pt")
                logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                               pixel_values=pixels[iid], use_itm_head=True).itm_score
                naive_scores.append(float(logits[0, 1] - logits[0, 0]))
            naive_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            for s in range(0, len(table["image_id"]), 64):
                ids = table["image_id"][s: s + 64]
                t = tok([text[x] for x in table["text_id"][s: s + 64]], padding=True, return_tensors="pt")
                model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                      pixel_values=torch.cat([pixels[i] for i in ids]), use_itm_head=True)
            batched_s = time.perf_counter() - t0
        max_diff = float(np.max(np.abs(np.array(naive_scores) - np.array(table["score"]))))

    n = len(naive_scores)
    return {
        "direction": "t2i", "k": K, "images": N_IMAGES, "texts": N_IMAGES * PER_IMAGE, "unique_pairs": pairs,
        "teacher": "BLIP ITM, hidden 128, 4+4 layers, 64x64 images (65 tokens)",
        "ours_pairs_per_s": pairs / ours_s, "ours_seconds_end_to_end": ours_s,
        "naive_pairs_per_s": n / naive_s, "batched_standard_forward_pairs_per_s": n / batched_s,
        "speedup_vs_naive": (pairs / ours_s) / (n / naive_s),
        "speedup_vs_batched_standard_forward": (pairs / ours_s) / (n / batched_s),
        "max_abs_score_difference_vs_naive": max_diff,
    }


if __name__ == "__main__":
    from bench.common import write

    write("score_teacher", main())
