"""score-teacher with a BLIP-2 teacher of the public ITM checkpoint's geometry (Salesforce/blip2-itm-vit-g:
ViT-g/14 at 224 px, 39 layers of width 1408; a 12-layer Q-Former of width 768 with cross-attention every other
layer and 32 query tokens), random weights, against transformers' own forward per pair. One run, the same
model for both; few images, because the model is not shrunk.

ours:   the real stage (`stages.score_teacher.run`) end to end on a mined run: the vision tower once per image,
        the Q-Former's cross-attention keys and values once per image of a batch, pairs batched.
naive:  `Blip2ForImageTextRetrieval(pixel_values, input_ids, use_image_text_matching_head=True)` per pair, the
        vision tower recomputed every time (pixels pre-decoded, so it is not charged for image I/O).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GEOMETRY = dict(hidden=768, layers=12, heads=12, intermediate=3072, cross_attention_frequency=2, queries=32,
                projection_dim=256, image_size=224, patch_size=14, vision_hidden=1408, vision_layers=39,
                vision_heads=16, vision_intermediate=6144)


def main(n_images: int = 4, per_image: int = 2, k: int = 3, naive_pairs: int = 6) -> dict:
    from bench.common import mined_pairs, synthetic_corpus
    from pipeline.tiny_models import save_tiny_blip2, save_tiny_clip
    from stages import stage

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann = synthetic_corpus(tmp / "data", n_images, per_image, size=224)
        clip = save_tiny_clip(tmp / "clip")
        blip2 = save_tiny_blip2(tmp / "blip2", **GEOMETRY)
        run = tmp / "run"
        stage("mine").run(run=str(run), data=str(ann), student=str(clip), k=k, directions="t2i", device="cpu")

        t0 = time.perf_counter()
        stage("score-teacher").run(run=str(run), teacher=str(blip2), device="cpu", batch_size=64)
        ours_s = time.perf_counter() - t0
        pairs = json.loads((run / "teacher" / "manifest.json").read_text())["num_pairs"]

        from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForImageTextRetrieval

        table, path, text = mined_pairs(run, naive_pairs)
        model = Blip2ForImageTextRetrieval.from_pretrained(blip2).eval()
        proc, tok = AutoImageProcessor.from_pretrained(blip2), AutoTokenizer.from_pretrained(blip2)
        pixels = {iid: proc(images=Image.open(tmp / "data" / path[iid]).convert("RGB"), return_tensors="pt")
                  ["pixel_values"] for iid in set(table["image_id"])}
        naive = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            for iid, tid in zip(table["image_id"], table["text_id"]):
                t = tok([text[tid]], return_tensors="pt")
                logits = model(pixel_values=pixels[iid], input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                               use_image_text_matching_head=True).logits_per_image
                naive.append(float(logits[0, 1] - logits[0, 0]))
            naive_s = time.perf_counter() - t0
        max_diff = float(np.max(np.abs(np.array(naive) - np.array(table["score"]))))

    n = len(naive)
    return {
        "teacher": "BLIP-2 ITM, blip2-itm-vit-g geometry (ViT-g/14 224 px, Q-Former 12 x 768, 32 queries), "
                   "random weights, fp32 on CPU",
        "direction": "t2i", "k": k, "images": n_images, "texts": n_images * per_image, "unique_pairs": pairs,
        "ours_pairs_per_s": pairs / ours_s, "ours_seconds_end_to_end": ours_s,
        "naive_pairs_per_s": n / naive_s, "naive_pairs_timed": n,
        "speedup_vs_naive": (pairs / ours_s) / (n / naive_s),
        "max_abs_score_difference_vs_naive": max_diff,
    }


if __name__ == "__main__":
    from bench.common import write

    write("score_teacher_blip2", main())
