"""score-teacher's `--score itm+itc` on the transfer demo's data: each caption's ITC side once against once per pair.

The pairs are one real pair shard of `make demo-transfer`'s run (runs/bench-epoch, made by `bench/epoch_bench.py`:
2,000 training images, 32 mined negatives per query, both directions): its pairs (its 512 images'), the
teacher the demo's BLIP (4 layers of width 128 per tower). Three timings, one run, the same pairs:

ours:      `teacher.score_pairs(..., itc_weight=64)`: each unique caption's ITC features once (`itc_texts`), each
           image group's once, the cosine per pair from those;
per pair:  the same loop with ITC's caption side encoded with every pair (`itc_indexed`, the path before);
itm only:  `score_pairs` without ITC, the floor that ITC adds to.

Scores of ours and per pair are compared (float32 sums in other batch shapes: equal to a stated tolerance).
"""
from __future__ import annotations

import time

import numpy as np
import torch

IMAGES = 512   # the whole shard: images_per_shard's default
ITC_WEIGHT = 64.0


def _per_pair(teacher, corpus, img_rows: np.ndarray, txt_rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """score_pairs' loop with ITC computed per pair (its caption encoded for every pair it is in)."""
    from pipeline.models import image_batches

    scores = np.empty(len(img_rows), dtype=np.float32)
    images = np.unique(img_rows)
    starts, ends = np.searchsorted(img_rows, images), np.searchsorted(img_rows, images, side="right")
    lengths = np.fromiter((len(corpus.texts[t]) for t in txt_rows), dtype=np.int64, count=len(txt_rows))
    order = np.lexsort((lengths, img_rows))
    loader = image_batches([corpus.image_paths[i] for i in images], teacher.image_processor, 64, 0)
    with torch.inference_mode():
        for b, (pixels, mask) in zip(range(0, len(images), 64), loader):
            group = images[b: b + 64]
            state = teacher.encode_images(pixels, mask)
            for s in range(starts[b], ends[b + len(group) - 1], batch_size):
                pairs = order[s: min(ends[b + len(group) - 1], s + batch_size)]
                idx = torch.from_numpy(np.searchsorted(group, img_rows[pairs]))
                tokens = teacher.tokenize([corpus.texts[t] for t in txt_rows[pairs]])
                out = teacher.score_indexed(state, idx, tokens) + ITC_WEIGHT * teacher.itc_indexed(state, idx, tokens)
                scores[pairs] = out.float().numpy()
    return scores


def main() -> dict:
    import pyarrow.parquet as pq

    from bench.epoch_bench import OUT, _data
    from pipeline import layout
    from pipeline.corpus import load_checked
    from pipeline.teachers import load_teacher, score_pairs

    torch.manual_seed(0)
    run, _ = _data()
    corpus = load_checked(run / "mine" / "corpus")
    teacher = load_teacher(str(OUT / "models" / "teacher"))
    table = pq.read_table(run / "teacher" / "pairs" / "part-00000.parquet")
    image_row = {i: r for r, i in enumerate(corpus.image_ids)}
    text_row = {t: r for r, t in enumerate(corpus.text_ids)}
    img = np.array([image_row[i] for i in table["image_id"].to_pylist()])
    txt = np.array([text_row[t] for t in table["text_id"].to_pylist()])
    keep = img < IMAGES
    keys = np.sort(layout.pair_key(img[keep], txt[keep], corpus.num_texts))
    img, txt = layout.split_key(keys, corpus.num_texts)

    timed = {}
    for name, fn in (("itm only", lambda: score_pairs(teacher, corpus, img, txt)),
                     ("ours", lambda: score_pairs(teacher, corpus, img, txt, itc_weight=ITC_WEIGHT)),
                     ("per pair", lambda: _per_pair(teacher, corpus, img, txt))):
        t = time.perf_counter()
        out = fn()
        timed[name] = (time.perf_counter() - t, out)
    ours, per_pair, itm = timed["ours"], timed["per pair"], timed["itm only"]
    return {"data": f"make demo-transfer's pair shard 0, its first {IMAGES} images' pairs; the demo's BLIP",
            "pairs": int(len(keys)), "unique_captions": int(len(np.unique(txt))),
            "ours_s": ours[0], "per_pair_s": per_pair[0], "itm_only_s": itm[0],
            "speedup": per_pair[0] / ours[0],
            "itc_cost_ours_vs_per_pair": (ours[0] - itm[0]) / (per_pair[0] - itm[0]),
            "max_abs_score_difference": float(np.abs(ours[1] - per_pair[1]).max()),
            "max_abs_score": float(np.abs(per_pair[1]).max())}


if __name__ == "__main__":
    from bench.common import write

    write("score_teacher_itc", main())
