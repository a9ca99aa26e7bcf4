"""Stage one, part two: score every mined (query, candidate) and (query, positive) pair with the teacher.

Work plan: the pairs of both directions are deduplicated into (image, text) pairs and grouped by image;
pair shard i holds the pairs of a fixed range of images (`images_per_shard`), so each image goes through the
teacher's image side once and its state is reused for all its texts. Then the pair scores are joined back
onto the candidate rows.

RUN/teacher/
  pairs/part-NNNNN.parquet   image_id, text_id, score (raw match log-odds)
  part-NNNNN.parquet         the candidate shard of the same number + teacher_scores (aligned with
                             candidate_ids) + positive_teacher_scores (aligned with positive_ids)
  easy/part-NNNNN.parquet    the same for mine's easy shards (mine --easy), scored in the same pass
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline import config as cfgmod
from pipeline import layout
from pipeline.artifacts import StageWriter, require_complete
from pipeline.config import location, option, runtime
from pipeline.corpus import load_checked
from pipeline.dist import init, resolve_device
from pipeline.errors import PipelineError
from pipeline.log import make_log, make_result
from pipeline.models import model_identity, torch_dtype
from pipeline.teachers import load_teacher, resolve_teacher, score_pairs

SCORES = ("itm", "itm+itc")
# The stage's name in its manifests, as its folder's (RUN/teacher): part of every finished output's identity, so
# it stays what runs already hold; the code names follow the verb.
MANIFEST_STAGE = "teacher"


@dataclass
class ScoreTeacherConfig:
    run: str = runtime(None, "run directory: reads RUN/mine, writes RUN/teacher (spell it --run-dir under torchrun)")
    teacher: str = location(None, "cross-encoder: Hugging Face name or local folder (BLIP ITM, ViLT retrieval), or "
                                  "`train-teacher` for the run's fine-tuned one (RUN/teacher-train/final); identified "
                                  "by its files' hashes")
    revision: Optional[str] = option(None, "model revision on the hub")
    trust_remote_code: bool = option(False, "allow model code from the checkpoint (off unless you ask)")
    score: str = option("itm", "itm: match log-odds; itm+itc: log-odds + itc_weight x the teacher's "
                               "contrastive cosine (BLIP: its [CLS] features, BLIP's own retrieval score; BLIP-2: the "
                               "best over its query tokens)", choices=SCORES)
    itc_weight: float = option(1.0, "weight of the ITC cosine in --score itm+itc", at_least=0)
    dtype: str = option("auto", "auto = bf16 on a GPU that supports it, else fp32",
                        choices=("auto", "fp32", "bf16", "fp16"))
    images_per_shard: int = option(512, "images per pair shard (the unit of resumable work)", at_least=1)
    batch_size: int = runtime(256, "pairs per teacher forward", at_least=1)
    kv_cache: bool = runtime(True, "BLIP and BLIP-2: compute each image's cross-attention keys and values once per batch of "
                                   "pairs, not once per pair (an exact rewrite; off: transformers' own forward)")
    image_batch_size: int = runtime(64, "images per image-side forward", at_least=1)
    num_workers: int = runtime(0, "DataLoader workers that decode images", at_least=0)
    image_root: Optional[str] = runtime(None, "where RUN/mine's images are now, if their folder moved since mine "
                                              "ran (default: the folder mine recorded)")
    device: str = runtime("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    force: bool = runtime(False, "start the stage over, whatever its output folder holds")
    replace: bool = runtime(False, "replace an output made with other settings, keep one that is up to date (what "
                                   "`demo --force` and `loop --force` pass each stage)")
    out: Optional[str] = runtime(None, "output folder (default RUN/teacher); another folder keeps a second teacher's "
                                       "scores beside the first (distill --scores reads it)")




def _rows(ids: pa.Array, table_ids: pa.Array, what: str, shard: str) -> np.ndarray:
    rows = pc.index_in(ids, value_set=table_ids)
    if rows.null_count:
        missing = ids.filter(pc.is_null(rows))[0].as_py()
        raise PipelineError(f"{shard}: {what} id '{missing}' is not in RUN/mine/corpus; mine output is inconsistent")
    return rows.to_numpy(zero_copy_only=False).astype(np.int64)


def _pairs_of_shard(table: pa.Table, corpus_ids: tuple[pa.Array, pa.Array], shard: str):
    """(image_rows, text_rows) of every pair a candidate shard needs: candidates and positives."""
    image_ids, text_ids = corpus_ids
    img, txt = [], []
    for direction in ("i2t", "t2i"):
        part = table.filter(pc.equal(table["direction"], direction))
        if part.num_rows == 0:
            continue
        for column in ("candidate_ids", "positive_ids"):
            lengths = pc.list_value_length(part[column]).to_numpy(zero_copy_only=False)
            others = pc.list_flatten(part[column])
            if direction == "i2t":
                img.append(np.repeat(_rows(part["query_id"], image_ids, "image", shard), lengths))
                txt.append(_rows(others, text_ids, "text", shard))
            else:
                txt.append(np.repeat(_rows(part["query_id"], text_ids, "text", shard), lengths))
                img.append(_rows(others, image_ids, "image", shard))
    return np.concatenate(img), np.concatenate(txt)


TeacherConfig = ScoreTeacherConfig   # the earlier name: `from stages.score_teacher import TeacherConfig` still works


def check(cfg: ScoreTeacherConfig) -> None:
    """What the declared ranges and choices cannot say (the loop runs this before the first stage starts)."""
    if not cfg.run or not cfg.teacher:
        raise PipelineError("score-teacher needs --run and --teacher")


def run(cfg: ScoreTeacherConfig) -> Path:
    dist = init(cfg.device)
    log = make_log(dist.is_main)
    device = resolve_device(cfg.device, dist)
    dtype = torch_dtype(cfg.dtype, device)
    check(cfg)
    log("[score-teacher] resolved config:\n" + cfgmod.render(cfg))
    run_dir = Path(cfg.run)
    paths = layout.Run(run_dir)
    mine_dir, out = paths.mine, Path(cfg.out) if cfg.out else paths.score_teacher
    mine = require_complete(mine_dir, "mine", f"run `cprd-pipeline mine --run {run_dir} ...` first")
    corpus = load_checked(paths.corpus, cfg.image_root)
    teacher_path, lineage = resolve_teacher(cfg.teacher, run_dir)
    cfg = dataclasses.replace(cfg, teacher=teacher_path)
    identity = {"stage": MANIFEST_STAGE, "config": cfgmod.fingerprinted(cfg), "upstream": mine["fingerprint"],
                "teacher": model_identity(cfg.teacher, cfg.revision), "dtype": str(dtype)}
    if lineage:
        identity["lineage"] = lineage
        log(f"[score-teacher] scoring with the fine-tuned teacher {teacher_path} (train-teacher "
            f"{lineage['fingerprint'][:12]})")
    reads = [mine_dir] + ([Path(lineage["output"])] if lineage else [])
    writer = StageWriter(out, identity, force=cfg.force, replace=cfg.replace, dist=dist, config=cfgmod.as_dict(cfg), log=log, reads=reads,
                         elsewhere="another --out folder", locations={"teacher": teacher_path},
                         precheck=lambda: load_teacher(cfg.teacher, "cpu", dtype, cfg.revision, cfg.trust_remote_code))
    if not writer.begin():
        return out
    with writer:
        _run(cfg, writer, mine, mine_dir, corpus, dist, device, dtype, log)
    make_result(dist.is_main)(f"[score-teacher] done: {out}")
    return out


def _run(cfg, writer, mine, mine_dir, corpus, dist, device, dtype, log) -> None:
    # the hard candidates' shards, then the easy ones' (mine --easy): their pairs are scored in one pass
    cand_files = [p["file"] for p in mine["shard_plan"]] + [p["easy"] for p in mine["shard_plan"] if p.get("easy")]
    corpus_ids = (pa.array(corpus.image_ids), pa.array(corpus.text_ids))
    n_texts = corpus.num_texts

    # The work plan: unique pairs as pair keys, so sorted keys group by image.
    parts = [layout.pair_key(*_pairs_of_shard(pq.read_table(mine_dir / f), corpus_ids, f), n_texts)
             for f in cand_files]
    keys = np.unique(np.concatenate(parts))
    image_of_key, _ = layout.split_key(keys, n_texts)
    bounds = np.searchsorted(image_of_key, np.arange(0, corpus.num_images + cfg.images_per_shard,
                                                     cfg.images_per_shard))
    pair_plan = [(i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]]
    pair_files = [layout.pair_shard(n) for n in range(len(pair_plan))]
    out_files = [layout.teacher_shard_of(f) for f in cand_files]
    writer.plan(pair_files + out_files)
    log(f"[score-teacher] {len(keys)} unique pairs over {len(np.unique(image_of_key))} images "
        f"in {len(pair_files)} pair shard(s)")

    todo = [(f, lo, hi) for f, (_, lo, hi) in layout.rank_share(list(zip(pair_files, pair_plan)), dist.rank,
                                                                dist.world_size)
            if not writer.is_done(f)]
    if todo:
        teacher = load_teacher(cfg.teacher, device, dtype, cfg.revision, cfg.trust_remote_code, kv_cache=cfg.kv_cache)
        log(f"[score-teacher] {type(teacher.model).__name__} on {device} in {dtype}")
        with tqdm(total=sum(hi - lo for _, lo, hi in todo), desc="score pairs", unit="pair",
                  disable=not dist.is_main, smoothing=0.1) as bar:
            for f, lo, hi in todo:
                img_rows, txt_rows = layout.split_key(keys[lo:hi], n_texts)
                scores = score_pairs(teacher, corpus, img_rows, txt_rows, cfg.batch_size, cfg.image_batch_size,
                                     cfg.num_workers, itc_weight=cfg.itc_weight if cfg.score == "itm+itc" else 0.0,
                                     bar=bar)
                writer.write_table(f, pa.table({
                    "image_id": pa.array(corpus_ids[0].take(pa.array(img_rows))),
                    "text_id": pa.array(corpus_ids[1].take(pa.array(txt_rows))),
                    "score": scores}, schema=layout.PAIR_SCHEMA))
    dist.barrier()  # every pair shard exists before the join

    join = [(c, o) for c, o in layout.rank_share(list(zip(cand_files, out_files)), dist.rank, dist.world_size)
            if not writer.is_done(o)]
    if join:
        pairs = pa.concat_tables([pq.read_table(writer.dir / f) for f in pair_files])
        pkeys = layout.pair_key(_rows(pairs["image_id"], corpus_ids[0], "image", "pairs"),
                                _rows(pairs["text_id"], corpus_ids[1], "text", "pairs"), n_texts)
        order = np.argsort(pkeys)
        pkeys, pscores = pkeys[order], pairs["score"].to_numpy()[order]
        for cand_file, out_file in join:
            table = pq.read_table(mine_dir / cand_file)
            writer.write_table(out_file, _attach_scores(table, corpus_ids, n_texts, pkeys, pscores, cand_file))
            log(f"[score-teacher] wrote {out_file}")
    writer.finish(pair_files + out_files, extra={"upstream_shards": cand_files, "num_pairs": int(len(keys))})


def _attach_scores(table: pa.Table, corpus_ids, n_texts: int, pkeys: np.ndarray, pscores: np.ndarray,
                   shard: str) -> pa.Table:
    """The candidate table plus teacher_scores / positive_teacher_scores, list-aligned with the id columns."""
    image_ids, text_ids = corpus_ids
    is_i2t = pc.equal(table["direction"], "i2t").to_numpy(zero_copy_only=False)
    columns = {}
    for src, dst in (("candidate_ids", "teacher_scores"), ("positive_ids", "positive_teacher_scores")):
        lists = table[src].combine_chunks()
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(lists)
        q_i2t = np.repeat(is_i2t, lengths)
        query = table["query_id"].combine_chunks()
        q_rep = pc.take(query, pa.array(np.repeat(np.arange(len(query)), lengths)))
        img = _rows(pc.if_else(pa.array(q_i2t), q_rep, flat), image_ids, "image", shard)
        txt = _rows(pc.if_else(pa.array(q_i2t), flat, q_rep), text_ids, "text", shard)
        want = layout.pair_key(img, txt, n_texts)
        at = np.searchsorted(pkeys, want)
        if (at >= len(pkeys)).any() or (pkeys[np.minimum(at, len(pkeys) - 1)] != want).any():
            raise PipelineError(f"{shard}: a pair has no teacher score; rerun score-teacher with --force")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        columns[dst] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(pscores[at], pa.float32()))
    for name in ("teacher_scores", "positive_teacher_scores"):
        table = table.append_column(layout.TEACHER_SCHEMA.field(name), columns[name])
    return table.cast(layout.TEACHER_SCHEMA)
