"""Evaluate a dual encoder: Recall@1/5/10 for i2t and t2i, and RSUM, in percent.

i2t: a hit when any of the image's captions is in the top K; t2i: when the caption's image is.
With --rerank-teacher, the teacher re-scores each query's top --k-test student candidates and re-orders them
(the BLIP protocol); those numbers are reported beside the student's own.

With a teacher, the student-teacher rank agreement over each query's top --k-test is reported too: Kendall's
tau-b and Spearman's rho between the student's scores and the teacher's, and NDCG@10 of the student's order
with the teacher's scores as gains, each averaged over queries per direction (what CPRD optimises).

RUN/eval/ (or --out): manifest.json, metrics.json, report.md, _SUCCESS (the artifact contract: an evaluation
of the same model, data and settings is up to date; another one into the same folder is refused without --force)
  metrics.json  {"i2t": {"R@1", "R@5", "R@10"}, "t2i": {...}, "rsum", "model", "data", "split",
                 "rerank": {..., "teacher", "score", "k_test"},
                 "agreement": {"i2t": {"kendall_tau", "spearman", "ndcg@10"}, "t2i": {...}}}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline import config as cfgmod
from pipeline import layout
from pipeline.artifacts import StageWriter, atomic_write_json, fingerprint, require_complete
from pipeline.config import location, option, runtime
from pipeline.corpus import FORMATS, read_source
from pipeline.dist import init, resolve_device
from pipeline.errors import PipelineError
from pipeline.log import make_log, make_result
from pipeline.metrics import KS
from pipeline.retrieval import ScoreCache, evaluate_retrieval
from pipeline.models import DualEncoder, model_identity, torch_dtype
from pipeline.teachers import load_teacher, resolve_teacher


@dataclass
class EvalConfig:
    run: Optional[str] = runtime(None, "run directory (the model defaults to RUN/distill/final; results go to RUN/eval)")
    data: str = runtime(None, "test annotation file, dataset folder, Hugging Face dataset name, or WebDataset "
                              ".tar shards (paths or a brace pattern)")
    format: str = option("auto", "input format", choices=FORMATS)
    image_root: Optional[str] = runtime(None, "folder that relative image paths are resolved against (webdataset: "
                                              "the folder image references are stored relative to; default "
                                              "the shards' folder)")
    split: Optional[str] = option("test", "split to read")
    image_column: str = option("image", "hf format: the image column")
    caption_column: str = option("text", "hf format: the caption column")
    id_column: Optional[str] = option(None, "hf format: a column of image ids")
    model: Optional[str] = location(None, "dual encoder to evaluate (default RUN/distill/final): a "
                                          "transformers model, or an open_clip one (open_clip:ARCH@WEIGHTS_FILE or a "
                                          "folder with open_clip_config.json); identified by its files' hashes")
    rerank_teacher: Optional[str] = location(None, "cross-encoder that re-ranks each query's top --k-test, or "
                                                   "`train-teacher` for --run's fine-tuned one (RUN/teacher-train/final)")
    k_test: int = option(16, "candidates per query the teacher re-ranks", at_least=2)
    rerank_score: str = option("itm", "teacher score for re-ranking: itm or itm+itc", choices=("itm", "itm+itc"))
    itc_weight: float = option(1.0, "weight of the ITC cosine in --rerank-score itm+itc", at_least=0)
    out: Optional[str] = runtime(None, "output folder (default RUN/eval)")
    batch_size: int = runtime(64, "images per encoding batch", at_least=1)
    num_workers: int = runtime(0, "DataLoader workers that decode images", at_least=0)
    device: str = runtime("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = runtime("auto", "teacher dtype: auto = bf16 on a GPU that supports it, else fp32",
                         choices=("auto", "fp32", "bf16", "fp16"))
    allow_overlap: bool = option(False, "evaluate even if test images are in the corpus the model was trained on "
                                        "(the overlap is then reported in metrics.json)", added=True)
    teacher_cache: Optional[str] = runtime(None, "folder of teacher pair scores kept across evaluations: students "
                                                 "of one teacher on one test set share most re-rank pairs")
    force: bool = runtime(False, "start the evaluation over, whatever its output folder holds")
    replace: bool = runtime(False, "replace an output made with other settings, keep one that is up to date (what "
                                   "`demo --force` and `loop --force` pass each stage)")


def report(metrics: dict) -> str:
    lines = ["| method | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in (("student", metrics), ("teacher re-rank", metrics.get("rerank"))):
        if m:
            cells = [f"{m[d][f'R@{k}']:.1f}" for d in ("i2t", "t2i") for k in KS]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['rsum']:.1f} |")
    rr = metrics.get("rerank")
    teacher = f"  \nteacher: `{rr['teacher']}` ({rr['score']}, re-ranking the top {rr['k_test']})" if rr else ""
    header = (f"# Evaluation\n\nmodel: `{metrics['model']}`  \ndata: `{metrics['data']}`, split "
              f"`{metrics.get('split')}` ({metrics['num_images']} images, {metrics['num_texts']} captions){teacher}\n\n")
    agreement = metrics.get("agreement")
    if agreement:
        names = list(agreement["i2t"])
        lines += ["", f"Student-teacher rank agreement over each query's top {metrics['rerank']['k_test']} "
                      "(the student's order against the teacher's scores, mean over queries):", "",
                  "| direction | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        lines += [f"| {d} | " + " | ".join(f"{agreement[d][n]:.3f}" for n in names) + " |" for d in ("i2t", "t2i")]
    return header + "\n".join(lines) + "\n"


def check(cfg: EvalConfig) -> None:
    """What the declared ranges and choices cannot say (the loop runs this before the first stage starts)."""
    if not cfg.data or not (cfg.run or (cfg.model and cfg.out)):
        raise PipelineError("evaluate needs --data and --run (or --model and --out)")
    if cfg.rerank_teacher == "train-teacher" and not cfg.run:
        raise PipelineError("--rerank-teacher train-teacher is the fine-tuned teacher of --run; give --run")


def run(cfg: EvalConfig) -> Path:
    dist = init(cfg.device)
    log = make_log(dist.is_main)
    device = resolve_device(cfg.device, dist)
    check(cfg)
    model, upstream = cfg.model, None
    if model is None:  # the run's distilled student, only once distill has finished
        paths = layout.Run(Path(cfg.run))
        upstream = require_complete(paths.distill, "distill",
                                    f"finish `cprd-pipeline distill --run {cfg.run}` or pass --model")["fingerprint"]
        model = str(paths.distill / "final")
    if cfg.k_test < max(KS) and cfg.rerank_teacher:
        log(f"[eval] note: --k-test {cfg.k_test} < {max(KS)}: R@{max(KS)} mixes re-ranked and student order")
    if cfg.rerank_teacher == "train-teacher":   # the run's fine-tuned teacher, as score-teacher reads it
        cfg = dataclasses.replace(cfg, rerank_teacher=resolve_teacher(cfg.rerank_teacher, Path(cfg.run))[0])
    log("[eval] resolved config:\n" + cfgmod.render(cfg))
    out = Path(cfg.out) if cfg.out else layout.Run(Path(cfg.run)).eval
    corpus = read_source(cfg, bytes_dir=Path(cfg.run or out) / "images", log=log)
    overlap = train_test_overlap(corpus, model, cfg)
    if overlap and overlap["images"] and not cfg.allow_overlap:
        raise PipelineError(f"{overlap['images']} of the {corpus.num_images} test images are in the corpus "
                            f"{overlap['train']} that the model was trained on (e.g. {overlap['example']}); evaluate "
                            "on held-out data, or pass --allow-overlap to report it")
    identity = {"stage": "evaluate", "config": cfgmod.fingerprinted(cfg), "corpus": corpus.content_hash(),
                "model": model_identity(model), "upstream": upstream,
                "teacher": model_identity(cfg.rerank_teacher) if cfg.rerank_teacher else None}
    # load both models before the output is touched: a bad --model fails here, with nothing replaced
    encoder = DualEncoder(model, device=device)
    teacher = load_teacher(cfg.rerank_teacher, device, torch_dtype(cfg.dtype, device)) if cfg.rerank_teacher else None
    writer = StageWriter(out, identity, force=cfg.force, replace=cfg.replace, dist=dist, config=cfgmod.as_dict(cfg), log=log,
                         elsewhere="another --out folder",
                         locations={"model": model, "teacher": cfg.rerank_teacher, "data": cfg.data},
                         reads=[layout.Run(Path(cfg.run)).distill] if upstream else [])
    if not writer.begin():
        return out
    with writer:
        metrics = _evaluate(cfg, corpus, model, encoder, teacher, identity, dist)
        if overlap:
            metrics["overlap"] = {k: overlap[k] for k in ("images", "captions", "train")}
        if dist.is_main:
            atomic_write_json(out / "metrics.json", metrics)
            (out / "report.md").write_text(report(metrics))
            writer.record_file("metrics.json")
            writer.record_file("report.md")
            make_result(True)(report(metrics))
        writer.finish(["metrics.json", "report.md"])
    return out


def train_test_overlap(corpus, model: str, cfg: EvalConfig) -> Optional[dict]:
    """Test images (same bytes: SHA-256) and captions (same text) that are in the corpus the model was trained
    on: the mine corpus of --run, or of the run that distilled --model (its manifest names it). None if unknown.
    Identical captions of different images are counted but allowed (templated captions repeat)."""
    import os

    from pipeline.artifacts import read_json
    from pipeline.corpus import load_tables

    run = cfg.run
    made = read_json(Path(model).parent / "manifest.json") if Path(model).name in ("final", "best") else None
    if made is not None and made.get("stage") == "distill":
        run = (made.get("config") or {}).get("run") or run
    train_dir = layout.Run(Path(run)).corpus if run else None
    if train_dir is None or not (train_dir / "images.parquet").exists():
        return None
    train = load_tables(train_dir, check_root=False)
    if train.image_files is not None:   # the same bytes, wherever the file is now
        seen = {digest for _, _, digest in train.image_files}
        shared = [p for p, (_, _, digest) in zip(corpus.image_paths, corpus.stats()) if digest in seen]
    else:                               # a corpus recorded before digests: the same file
        seen = {os.path.realpath(p) for p in train.image_paths}
        shared = [p for p in corpus.image_paths if os.path.realpath(p) in seen]
    captions = set(train.texts)
    return {"images": len(shared), "captions": sum(t in captions for t in corpus.texts), "train": str(train_dir),
            "example": shared[0] if shared else None}


def _evaluate(cfg: EvalConfig, corpus, model: str, encoder: DualEncoder, teacher, identity: dict, dist) -> dict:
    weight = cfg.itc_weight if cfg.rerank_score == "itm+itc" else 0.0
    cache = None
    if teacher is not None and cfg.teacher_cache:  # keyed by the teacher's file hashes and the corpus hash
        key = fingerprint({"teacher": identity["teacher"], "score": cfg.rerank_score,
                           "itc_weight": weight, "dtype": cfg.dtype, "corpus": identity["corpus"]})
        cache = ScoreCache(Path(cfg.teacher_cache) / f"{key[:24]}.npz")
    metrics = evaluate_retrieval(corpus, encoder, teacher, cfg.k_test, weight, cfg.batch_size, cfg.num_workers,
                                 progress=dist.is_main, cache=cache)
    metrics.update(model=model, data=cfg.data, split=cfg.split)
    if teacher is not None:
        metrics["rerank"].update(teacher=cfg.rerank_teacher, score=cfg.rerank_score)
    return metrics
