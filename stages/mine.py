"""Stage one, part one: embed the corpus with the student and mine the top-k hard negatives per query.

RUN/mine/
  corpus/{images,texts}.parquet      the normalised corpus every later stage reads
  embeddings/                        L2-normalised student embeddings (own fingerprint: reused across --k/--index)
  candidates/part-NNNNN.parquet      one row per query: direction, query_id, positive_ids, candidate_ids,
                                     student_scores (k hard negatives, most similar first, positives excluded)
  easy/part-NNNNN.parquet            with --easy K: the same rows with K easy candidates instead (random, or the
                                     bottom of the student's ranking: pipeline/easy.py), most similar first
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline import config as cfgmod
from pipeline import layout
from pipeline.artifacts import StageWriter
from pipeline.config import location, option, runtime
from pipeline.corpus import FORMATS, Corpus, known_files, read_source, recorded_root
from pipeline.corpus import changes as corpus_changes
from pipeline.dist import Dist, init, resolve_device
from pipeline.easy import EASY_FROM, easy_candidates
from pipeline.errors import PipelineError
from pipeline.index import INDEX_KINDS, build_index, search_excluding
from pipeline.log import make_log, make_result
from pipeline.models import DualEncoder, model_identity

DIRECTIONS = ("i2t", "t2i")
EMBED_SHARD = 8192  # rows per embedding shard: the unit of encoding work split across ranks



@dataclass
class MineConfig:
    run: str = runtime(None, "run directory; this stage writes RUN/mine (spell it --run-dir under torchrun)")
    data: str = runtime(None, "annotation file, dataset folder, Hugging Face dataset name, or WebDataset .tar "
                              "shards (paths or a brace pattern such as shards/{00000..00009}.tar)")
    student: str = location(None, "dual encoder: Hugging Face name or local folder (CLIP, SigLIP, ...), or an "
                                  "open_clip model as open_clip:ARCH@WEIGHTS_FILE (a built-in architecture) or a "
                                  "folder with open_clip_config.json and its weights; identified by its files' "
                                  "hashes, so the same files elsewhere are the same student")
    format: str = option("auto", "input format", choices=FORMATS)
    image_root: Optional[str] = runtime(None, "folder that relative image paths are resolved against (webdataset: "
                                              "the folder image references are stored relative to; default "
                                              "the shards' folder)")
    split: Optional[str] = option(None, "split to read (karpathy: train includes restval; hf: default train)")
    image_column: str = option("image", "hf format: the image column")
    caption_column: str = option("text", "hf format: the caption column (a string or a list of strings)")
    id_column: Optional[str] = option(None, "hf format: a column of image ids (default: file name stem)")
    revision: Optional[str] = option(None, "model revision on the hub")
    trust_remote_code: bool = option(False, "allow model code from the checkpoint (off unless you ask)")
    k: int = option(32, "hard negatives kept per query", at_least=1)
    directions: str = option("i2t,t2i", "comma-separated: i2t (image queries), t2i (text queries)")
    index: str = option("flat", "FAISS index: flat (exact), ivf or hnsw (approximate, for large corpora)",
                        choices=INDEX_KINDS)
    nprobe: int = option(16, "ivf: lists probed per query", at_least=1)
    shard_size: int = option(10000, "queries per candidate shard", at_least=1)
    easy: int = option(0, "also write this many easy candidates per query (RUN/mine/easy/, scored by score-teacher "
                          "too, read by distill --list easy): lists beyond the top, to run a loss over easy "
                          "negatives on otherwise equal terms; 0: none", added=True, at_least=0)
    easy_from: str = option("random", "with --easy: random (uniform over the corpus, positives excluded) or bottom "
                                      "(the least similar under the student)", choices=EASY_FROM, added=True)
    batch_size: int = runtime(64, "images per encoding batch (texts use 4x)", at_least=1)
    search_batch: int = runtime(4096, "queries per FAISS search call", at_least=1)
    num_workers: int = runtime(0, "DataLoader workers that decode images", at_least=0)
    device: str = runtime("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    force: bool = runtime(False, "start the stage over, whatever RUN/mine holds (the embeddings cache is kept: it is "
                                 "checked by content)")
    replace: bool = runtime(False, "replace an output made with other settings, keep one that is up to date (what "
                                   "`demo --force` and `loop --force` pass each stage)")


def _directions(cfg: MineConfig) -> list[str]:
    dirs = [d.strip() for d in cfg.directions.split(",") if d.strip()]
    bad = [d for d in dirs if d not in DIRECTIONS]
    if bad or not dirs:
        raise PipelineError(f"--directions: expected a comma-separated subset of i2t,t2i, got '{cfg.directions}'")
    return dirs


def check(cfg: MineConfig) -> None:
    """What the declared ranges and choices cannot say (the loop runs this before the first stage starts)."""
    if not cfg.run or not cfg.data or not cfg.student:
        raise PipelineError("mine needs --run, --data and --student")
    _directions(cfg)
    if not cfg.easy and cfg.easy_from != MineConfig.easy_from:
        raise PipelineError("--easy-from says where --easy draws its candidates (add --easy K, or leave it out)")


def _check_k(cfg: MineConfig, corpus: Corpus, dirs: list[str]) -> None:
    for flag, k in (("--k", cfg.k), ("--easy", cfg.easy)):
        if not k:
            continue
        if "i2t" in dirs:
            most = max(len(p) for p in corpus.image_text_rows())
            avail = corpus.num_texts - most
            if k >= avail:
                raise PipelineError(f"{flag} {k} is not smaller than the {avail} negative captions available to "
                                    f"every image query ({corpus.num_texts} captions, up to {most} positives)")
        if "t2i" in dirs and k >= corpus.num_images - 1:
            raise PipelineError(f"{flag} {k} is not smaller than the {corpus.num_images - 1} negative images "
                                "available to every caption query")


def _embed(cfg: MineConfig, corpus: Corpus, student_id: dict, corpus_hash: str, run: Path, dist: Dist,
           device: str, log) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings for all images and texts, from the cache when its fingerprint matches."""
    identity = {"stage": "mine/embeddings", "student": student_id, "revision": cfg.revision,
                "corpus": corpus_hash, "shard_rows": EMBED_SHARD}
    # A cache of the corpus's and student's contents: re-used when they are unchanged (even under mine --force,
    # which changes only what is mined from it), made again when they changed.
    writer = StageWriter(layout.Run(run).mine / "embeddings", identity, force=False, dist=dist, log=log)
    plan = [(kind, s, min(n, s + EMBED_SHARD))
            for kind, n in (("images", corpus.num_images), ("texts", corpus.num_texts))
            for s in range(0, n, EMBED_SHARD)]
    files = [f"{kind}-{s // EMBED_SHARD:05d}.npy" for kind, s, _ in plan]
    if writer.begin():
        with writer:
            writer.plan(files)
            todo = [(f, p) for f, p in layout.rank_share(list(zip(files, plan)), dist.rank, dist.world_size)
                    if not writer.is_done(f)]
            if todo:
                encoder = DualEncoder(cfg.student, device=device, revision=cfg.revision,
                                      trust_remote_code=cfg.trust_remote_code)
                for f, (kind, s, e) in todo:
                    if kind == "images":
                        emb = encoder.encode_images(corpus.image_paths[s:e], cfg.batch_size, cfg.num_workers,
                                                    progress=dist.is_main)
                    else:
                        emb = encoder.encode_texts(corpus.texts[s:e], 4 * cfg.batch_size, progress=dist.is_main)
                    writer.write_npy(f, emb)
                    log(f"[mine] embedded {kind} {s}:{e}")
            writer.finish(files)
    else:
        log("[mine] embeddings up to date; re-using them")
    load = lambda kind: np.concatenate([np.load(writer.dir / f, allow_pickle=False)
                                        for f in files if f.startswith(kind)])
    return load("images"), load("texts")


def _candidates(direction: str, qids, pos_ids: list, cand_ids: np.ndarray, scores: np.ndarray) -> pa.Table:
    """A candidate shard: one row per query, its candidates [Q, k] (ids) with their student cosines [Q, k]."""
    return pa.table({"direction": [direction] * len(qids), "query_id": list(qids), "positive_ids": pos_ids,
                     "candidate_ids": [list(r) for r in cand_ids], "student_scores": list(scores)},
                    schema=layout.CANDIDATE_SCHEMA)


def run(cfg: MineConfig) -> Path:
    dist = init(cfg.device)
    log = make_log(dist.is_main)
    device = resolve_device(cfg.device, dist)
    check(cfg)
    log("[mine] resolved config:\n" + cfgmod.render(cfg))
    dirs = _directions(cfg)
    run_dir = Path(cfg.run)
    paths = layout.Run(run_dir)
    out = paths.mine

    corpus = read_source(cfg, bytes_dir=paths.images, log=log, recorded=paths.corpus)
    _check_k(cfg, corpus, dirs)
    # each image's SHA-256, hashed once (rank 0) and re-used from the last run where size and mtime are unchanged
    known = known_files(paths.corpus, corpus.image_root) if dist.is_main else {}
    corpus.image_files = dist.broadcast(corpus.file_stats(known, progress=True) if dist.is_main else None)
    corpus_hash = corpus.content_hash()
    student_id = model_identity(cfg.student, cfg.revision)
    identity = {"stage": "mine", "config": cfgmod.fingerprinted(cfg), "corpus": corpus_hash, "student": student_id}

    # Candidate shards: fixed query ranges per direction, numbered globally; rank r takes shards r, r+W, ...
    plan = []
    for d in dirs:
        n = corpus.num_images if d == "i2t" else corpus.num_texts
        plan += [(d, s, min(n, s + cfg.shard_size)) for s in range(0, n, cfg.shard_size)]
    shard_files = [layout.candidate_shard(i) for i in range(len(plan))]
    easy_files = [layout.easy_shard(i) for i in range(len(plan))] if cfg.easy else [None] * len(plan)
    expected = list(layout.CORPUS_FILES) + shard_files + [f for f in easy_files if f]

    writer = StageWriter(out, identity, force=cfg.force, replace=cfg.replace, dist=dist, keep=["embeddings"],
                         config=cfgmod.as_dict(cfg), log=log, derived=layout.CORPUS_FILES,
                         locations={"student": cfg.student, "data": cfg.data},
                         explain={"corpus": lambda: corpus_changes(paths.corpus, corpus)},
                         precheck=lambda: DualEncoder(cfg.student, revision=cfg.revision,
                                                      trust_remote_code=cfg.trust_remote_code))
    if not writer.begin():
        recorded = recorded_root(paths.corpus) if dist.is_main else None
        if recorded and corpus.image_root and recorded != corpus.image_root:
            log(f"[mine] the images are now under {corpus.image_root} (mine recorded {recorded}): pass "
                f"--image-root {corpus.image_root} to the stages that read RUN/mine")
        return out
    with writer:
        writer.plan(expected)
        if dist.is_main:
            for rel, table in zip(layout.CORPUS_FILES, (corpus.images_table(), corpus.texts_table())):
                if not writer.is_done(rel):
                    writer.write_table(rel, table)

        img_emb, txt_emb = _embed(cfg, corpus, student_id, corpus_hash, run_dir, dist, device, log)

        todo = [(f, easy, p) for f, easy, p in layout.rank_share(list(zip(shard_files, easy_files, plan)), dist.rank,
                                                                 dist.world_size)
                if not writer.is_done(f) or (easy and not writer.is_done(easy))]
        log(f"[mine] {len(plan)} candidate shard(s); {len(todo)} to write on this rank")
        text_pos_of_image = corpus.image_text_rows()          # i2t positives: rows in the text table
        image_of_text = corpus.text_image_rows()               # t2i positive: one row in the image table
        image_ids, text_ids = np.asarray(corpus.image_ids, dtype=object), np.asarray(corpus.text_ids, dtype=object)
        for d in dirs:
            work = [(f, easy, s, e) for f, easy, (dd, s, e) in todo if dd == d]
            if not work:
                continue
            cand_emb, query_emb = (txt_emb, img_emb) if d == "i2t" else (img_emb, txt_emb)
            index = build_index(cand_emb, cfg.index, nprobe=cfg.nprobe, use_gpu=device.startswith("cuda"), log=log)
            for f, easy, s, e in work:
                if d == "i2t":
                    positives = text_pos_of_image[s:e]
                    qids, cand_ids = image_ids[s:e], text_ids
                    pos_ids = [list(text_ids[p]) for p in positives]
                else:
                    positives = [image_of_text[i:i + 1] for i in range(s, e)]
                    qids, cand_ids = text_ids[s:e], image_ids
                    pos_ids = [[image_ids[image_of_text[i]]] for i in range(s, e)]
                if not writer.is_done(f):
                    rows, scores = search_excluding(index, query_emb[s:e], positives, cfg.k, cfg.search_batch,
                                                    progress=dist.is_main, desc=f"search {d} {s}:{e}")
                    writer.write_table(f, _candidates(d, qids, pos_ids, cand_ids[rows], scores))
                    log(f"[mine] wrote {f} ({d} queries {s}:{e})")
                if easy and not writer.is_done(easy):
                    rows, scores = easy_candidates(cfg.easy_from, index, cand_emb, query_emb[s:e], positives,
                                                   cfg.easy, d, s, cfg.search_batch)
                    writer.write_table(easy, _candidates(d, qids, pos_ids, cand_ids[rows], scores))
                    log(f"[mine] wrote {easy} ({d} queries {s}:{e}, {cfg.easy} {cfg.easy_from} candidates each)")
        writer.finish(expected, extra={"directions": dirs, "k": cfg.k, "easy": cfg.easy,
                                       "num_images": corpus.num_images, "num_texts": corpus.num_texts,
                                       "shard_plan": [{"file": f, "direction": d, "start": s, "end": e,
                                                       **({"easy": easy} if easy else {})}
                                                      for f, easy, (d, s, e) in zip(shard_files, easy_files, plan)]})
    make_result(dist.is_main)(f"[mine] done: {out}")
    return out
