"""score-teacher at BLIP-base geometry (random weights): where the time goes, and how close the stage is to it.

BlipConfig defaults (384 px, 577 image tokens, 12 text layers of width 768), fp32, t2i, 5 captions of about
35 tokens per image, the corpus shrunk in images, never in the model. Timed in one run:

- ours:  the stage end to end with the cached cross-attention (each image's keys and values once per batch)
- today: the same stage with --no-kv-cache (vision once per image, keys and values once per pair)
- naive: transformers' standard forward per pair (vision per pair), on a prefix of the pairs
- floor: each part alone on the same pairs: vision for the unique images, keys and values once per image, the
         text side of the unique pairs against the cached keys and values
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

def _blip_base(path: Path) -> Path:
    from transformers import BertTokenizerFast, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    from pipeline.tiny_models import bert_tokenizer_dir

    torch.manual_seed(0)
    cfg = BlipConfig(text_config=dict(is_decoder=True), vision_config=dict(initializer_range=0.02))
    BlipForImageTextRetrieval(cfg).save_pretrained(path)
    BertTokenizerFast.from_pretrained(bert_tokenizer_dir()).save_pretrained(path)
    BlipImageProcessor(size={"height": 384, "width": 384}).save_pretrained(path)
    return path


def _timed(fn) -> tuple[float, object]:
    """(seconds, result) of fn()."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(quick: bool = False) -> dict:
    import pyarrow.parquet as pq

    from bench.common import synthetic_corpus
    from pipeline import cross_kv
    from pipeline.corpus import load_tables
    from pipeline.models import image_batches
    from pipeline.teachers import load_teacher
    from pipeline.tiny_models import save_tiny_clip
    from stages import stage

    n_images, per_image, k, naive_pairs = (8, 5, 6, 8) if quick else (18, 5, 16, 12)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann = synthetic_corpus(tmp / "data", n_images, per_image, size=96, words=28)
        blip = _blip_base(tmp / "blip")
        run = tmp / "run"
        stage("mine").run(run=str(run), data=str(ann), student=str(save_tiny_clip(tmp / "clip")), k=k,
                          directions="t2i", device="cpu")
        today = tmp / "run-today"
        shutil.copytree(run, today)
        common = dict(teacher=str(blip), device="cpu", batch_size=64, image_batch_size=8)
        ours_s, _ = _timed(lambda: stage("score-teacher").run(run=str(run), **common))
        today_s, _ = _timed(lambda: stage("score-teacher").run(run=str(today), kv_cache=False, **common))
        ours_scores = np.concatenate([pq.read_table(f)["score"].to_numpy() for f in
                                      sorted((run / "teacher" / "pairs").glob("*.parquet"))])
        today_scores = np.concatenate([pq.read_table(f)["score"].to_numpy() for f in
                                       sorted((today / "teacher" / "pairs").glob("*.parquet"))])
        n_pairs = len(ours_scores)

        # the floor, part by part, on the same unique pairs
        corpus = load_tables(run / "mine" / "corpus")
        teacher = load_teacher(str(blip))
        img_of = {iid: i for i, iid in enumerate(corpus.image_ids)}
        txt_of = {tid: i for i, tid in enumerate(corpus.text_ids)}
        all_pairs = [pq.read_table(f).to_pydict() for f in sorted((run / "teacher" / "pairs").glob("*.parquet"))]
        img_rows = np.array([img_of[i] for p in all_pairs for i in p["image_id"]])
        txt_rows = np.array([txt_of[t] for p in all_pairs for t in p["text_id"]])
        images = np.unique(img_rows)
        with torch.inference_mode():
            t = time.perf_counter()
            states = [teacher.encode_images(px, m)[0]
                      for px, m in image_batches([corpus.image_paths[i] for i in images], teacher.image_processor, 8, 0)]
            vision_s = time.perf_counter() - t
            embeds = torch.cat(states)
            kv_s, kv = _timed(lambda: cross_kv.image_kv(teacher.model.text_encoder, embeds))
            local = torch.from_numpy(np.searchsorted(images, img_rows))
            order = np.lexsort(([len(corpus.texts[r]) for r in txt_rows], img_rows))

            def text_side():
                for s in range(0, n_pairs, 64):
                    b = order[s: s + 64]
                    tok = teacher.tokenize([corpus.texts[r] for r in txt_rows[b]])
                    cross_kv.itm_logodds(teacher.model, kv, local[b], tok["input_ids"], tok["attention_mask"])
            text_s, _ = _timed(text_side)

            # naive: the model's own forward per pair, pixels decoded beforehand
            from transformers import BlipForImageTextRetrieval
            model = BlipForImageTextRetrieval.from_pretrained(blip).eval()
            px = {i: teacher.image_processor(images=Image.open(corpus.image_paths[i]).convert("RGB"),
                                             return_tensors="pt")["pixel_values"] for i in set(img_rows[:naive_pairs])}
            t = time.perf_counter()
            for i, r in zip(img_rows[:naive_pairs], txt_rows[:naive_pairs]):
                tok = teacher.tokenize([corpus.texts[r]])
                model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px[i],
                      use_itm_head=True)
            naive_s = (time.perf_counter() - t) / naive_pairs * n_pairs
    floor_s = vision_s + kv_s + text_s
    return {
        "teacher": "BLIP-base geometry (BlipConfig defaults, 384 px, 577 image tokens, 12+12 layers, width 768), "
                   "random weights, fp32",
        "direction": "t2i", "k": k, "images": n_images, "captions_per_image": per_image, "unique_pairs": n_pairs,
        "pairs_per_image": n_pairs / n_images, "threads": torch.get_num_threads(),
        "ours_seconds": ours_s, "today_seconds": today_s, "naive_seconds_extrapolated": naive_s,
        "naive_timed_pairs": naive_pairs,
        "floor_seconds": floor_s, "floor_parts_seconds": {"vision_unique_images": vision_s,
                                                          "keys_values_once_per_image": kv_s,
                                                          "text_side_unique_pairs": text_s},
        "speedup_vs_today": today_s / ours_s, "goal_speedup_vs_today": 2.5,
        "ours_over_floor": ours_s / floor_s, "goal_ours_over_floor_below": 1.3,
        "speedup_vs_naive": naive_s / ours_s,
        "ours_pairs_per_s": n_pairs / ours_s, "today_pairs_per_s": n_pairs / today_s,
        "max_abs_score_difference_ours_vs_today": float(np.max(np.abs(ours_scores - today_scores))),
    }


if __name__ == "__main__":
    from bench.common import write

    write("score_teacher_kv" + ("_quick" if "--quick" in sys.argv else ""), main(quick="--quick" in sys.argv))
