"""Evaluate a dual encoder: Recall@1/5/10 for i2t and t2i, and RSUM, in percent.

i2t: a hit when any of the image's captions is in the top K; t2i: when the caption's image is.
With --rerank-teacher, the teacher re-scores each query's top --k-test student candidates and re-orders them
(the BLIP protocol); those numbers are reported beside the student's own.

RUN/eval/ (or --out): metrics.json  {"i2t": {"R@1", "R@5", "R@10"}, "t2i": {...}, "rsum", "rerank": {...}}
                      report.md
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from pipeline import config as cfgmod
from pipeline.artifacts import atomic_write_json, require_complete
from pipeline.config import option, runtime
from pipeline.corpus import FORMATS, Corpus, read_corpus
from pipeline.dist import init, resolve_device
from pipeline.errors import PipelineError
from pipeline.index import build_index
from pipeline.log import make_log
from pipeline.metrics import KS, retrieval_metrics
from pipeline.models import DualEncoder, torch_dtype
from pipeline.teachers import load_teacher, score_pairs


@dataclass
class EvalConfig:
    run: str = runtime(None, "run directory (the model defaults to RUN/distill/final; results go to RUN/eval)")
    data: str = runtime(None, "test annotation file, dataset folder or Hugging Face dataset name")
    format: str = option("auto", "input format", choices=FORMATS)
    image_root: Optional[str] = runtime(None, "folder that relative image paths are resolved against")
    split: Optional[str] = option("test", "split to read")
    image_column: str = option("image", "hf format: the image column")
    caption_column: str = option("text", "hf format: the caption column")
    id_column: Optional[str] = option(None, "hf format: a column of image ids")
    model: Optional[str] = option(None, "dual encoder to evaluate (default RUN/distill/final)")
    rerank_teacher: Optional[str] = option(None, "cross-encoder that re-ranks each query's top --k-test")
    k_test: int = option(16, "candidates per query the teacher re-ranks")
    rerank_score: str = option("itm", "teacher score for re-ranking: itm or itm+itc", choices=("itm", "itm+itc"))
    itc_weight: float = option(1.0, "weight of the ITC cosine in --rerank-score itm+itc")
    out: Optional[str] = runtime(None, "output folder (default RUN/eval)")
    batch_size: int = runtime(64, "images per encoding batch")
    num_workers: int = runtime(0, "DataLoader workers that decode images")
    device: str = runtime("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = runtime("auto", "teacher dtype: auto = bf16 on a GPU that supports it, else fp32",
                         choices=("auto", "fp32", "bf16", "fp16"))


def rank(query: np.ndarray, cands: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`depth` candidate rows and scores per query (exact inner product, in batches)."""
    index = build_index(cands, "flat", log=lambda *_: None)
    scores, rows = index.search(np.ascontiguousarray(query), min(depth, len(cands)))
    return rows, scores


def rerank(corpus: Corpus, teacher, i2t_rows: np.ndarray, t2i_rows: np.ndarray, k: int, itc_weight: float,
           progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Re-order each query's first k candidates by teacher score (the rest keep the student's order)."""
    # all (image, text) pairs of both directions, deduplicated and sorted by image: one vision pass per image
    n_t = corpus.num_texts
    i2t_keys = np.arange(len(i2t_rows))[:, None] * n_t + i2t_rows[:, :k]
    t2i_keys = t2i_rows[:, :k] * n_t + np.arange(len(t2i_rows))[:, None]
    keys = np.unique(np.concatenate([i2t_keys.ravel(), t2i_keys.ravel()]))
    with tqdm(total=len(keys), desc="re-rank", unit="pair", disable=not progress, leave=False) as bar:
        scores = score_pairs(teacher, corpus, keys // n_t, keys % n_t, itc_weight=itc_weight, bar=bar)
    out = []
    for rows, qkeys in ((i2t_rows, i2t_keys), (t2i_rows, t2i_keys)):
        t = scores[np.searchsorted(keys, qkeys)]                        # [Q, k]
        order = np.argsort(-t, axis=1, kind="stable")
        out.append(np.concatenate([np.take_along_axis(rows[:, :k], order, axis=1), rows[:, k:]], axis=1))
    return out[0], out[1]


def report(metrics: dict) -> str:
    lines = ["| method | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in (("student", metrics), ("teacher re-rank", metrics.get("rerank"))):
        if m:
            cells = [f"{m[d][f'R@{k}']:.1f}" for d in ("i2t", "t2i") for k in KS]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['rsum']:.1f} |")
    header = (f"# Evaluation\n\nmodel: `{metrics['model']}`  \ndata: `{metrics['data']}` "
              f"({metrics['num_images']} images, {metrics['num_texts']} captions)\n\n")
    return header + "\n".join(lines) + "\n"


def run(cfg: EvalConfig) -> dict:
    dist = init(cfg.device)
    log = make_log(dist.is_main)
    device = resolve_device(cfg.device, dist)
    if not cfg.data or not (cfg.run or (cfg.model and cfg.out)):
        raise PipelineError("evaluate needs --data and --run (or --model and --out)")
    model = cfg.model
    if model is None:  # the run's distilled student, only once distill has finished
        require_complete(Path(cfg.run) / "distill", "distill",
                         f"finish `cprd-pipeline distill --run {cfg.run}` or pass --model")
        model = str(Path(cfg.run) / "distill" / "final")
    if cfg.k_test < max(KS) and cfg.rerank_teacher:
        log(f"[eval] note: --k-test {cfg.k_test} < {max(KS)}: R@{max(KS)} mixes re-ranked and student order")
    log("[eval] resolved config:\n" + cfgmod.render(cfg))
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "eval"
    corpus = read_corpus(cfg.data, cfg.format, cfg.image_root, cfg.split, cfg.image_column, cfg.caption_column,
                         cfg.id_column, bytes_dir=Path(cfg.run or out) / "images", log=log)
    encoder = DualEncoder(model, device=device)
    img = encoder.encode_images(corpus.image_paths, cfg.batch_size, cfg.num_workers, progress=dist.is_main)
    txt = encoder.encode_texts(corpus.texts, 4 * cfg.batch_size, progress=dist.is_main)
    depth = max(max(KS), cfg.k_test)
    i2t_rows, _ = rank(img, txt, depth)
    t2i_rows, _ = rank(txt, img, depth)
    image_texts, text_image = corpus.image_text_rows(), corpus.text_image_rows()
    metrics = retrieval_metrics(i2t_rows, t2i_rows, image_texts, text_image)
    metrics.update(model=model, data=cfg.data, num_images=corpus.num_images, num_texts=corpus.num_texts)
    if cfg.rerank_teacher:
        teacher = load_teacher(cfg.rerank_teacher, device, torch_dtype(cfg.dtype, device))
        weight = cfg.itc_weight if cfg.rerank_score == "itm+itc" else 0.0
        r_i2t, r_t2i = rerank(corpus, teacher, i2t_rows, t2i_rows, cfg.k_test, weight, dist.is_main)
        metrics["rerank"] = {**retrieval_metrics(r_i2t, r_t2i, image_texts, text_image),
                             "teacher": cfg.rerank_teacher, "k_test": cfg.k_test, "score": cfg.rerank_score}
    if dist.is_main:
        atomic_write_json(out / "metrics.json", metrics)
        (out / "report.md").write_text(report(metrics))
        log(report(metrics))
    return metrics
