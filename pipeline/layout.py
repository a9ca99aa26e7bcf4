"""The run layout and the shard schemas, in one place: where each stage's outputs live and what they hold.

RUN/
  mine/      manifest.json  corpus/{images,texts}.parquet  embeddings/  candidates/part-NNNNN.parquet  _SUCCESS
             easy/part-NNNNN.parquet       (with mine --easy K: K easy candidates per query, same schema)
  teacher-train/  manifest.json  checkpoints/step-N/  final/  metrics.jsonl  _SUCCESS   (optional)
  teacher/   manifest.json  pairs/part-NNNNN.parquet  part-NNNNN.parquet  _SUCCESS
             easy/part-NNNNN.parquet       (mine's easy shards with their teacher scores, TEACHER_SCHEMA)
  distill/   manifest.json  checkpoints/step-N/  final/  metrics.jsonl  _SUCCESS
  eval/      metrics.json  report.md

Every Parquet column carries a `description` in its field metadata (readable with `pq.read_schema`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np
import pyarrow as pa

T = TypeVar("T")


@dataclass(frozen=True)
class Run:
    """Paths of one run directory, named after the verb that writes each (folders keep their names: existing runs
    hold them). `scores`: a score-teacher output elsewhere (score-teacher --out, distill --scores)."""
    root: Path
    scores: Path | None = None

    @property
    def mine(self) -> Path:
        return self.root / "mine"

    @property
    def corpus(self) -> Path:
        return self.mine / "corpus"

    @property
    def score_teacher(self) -> Path:
        """The teacher's scores (score-teacher): RUN/teacher."""
        return self.scores or self.root / "teacher"

    @property
    def train_teacher(self) -> Path:
        """The fine-tuned teacher (train-teacher): RUN/teacher-train."""
        return self.root / "teacher-train"

    # the folders' names, as code written before the verbs' names were used spells them
    teacher = score_teacher
    teacher_train = train_teacher

    @property
    def distill(self) -> Path:
        return self.root / "distill"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def images(self) -> Path:
        """Image bytes extracted from a dataset (content-addressed)."""
        return self.root / "images"


CORPUS_FILES = ("corpus/images.parquet", "corpus/texts.parquet")


def shard_name(index: int, prefix: str = "part", ext: str = "parquet") -> str:
    return f"{prefix}-{index:05d}.{ext}"


def candidate_shard(index: int) -> str:
    """A candidate shard's path inside RUN/mine."""
    return f"candidates/{shard_name(index)}"


def pair_shard(index: int) -> str:
    """A pair-score shard's path inside RUN/teacher."""
    return f"pairs/{shard_name(index)}"


EASY = "easy"
LISTS = ("hard", "easy")   # which candidate lists: the mined top k, or mine --easy's


def easy_shard(index: int) -> str:
    """An easy-candidate shard's path inside RUN/mine (mine --easy), and its teacher shard's inside RUN/teacher."""
    return f"{EASY}/{shard_name(index)}"


def teacher_shard_of(mine_shard: str) -> str:
    """The teacher shard that holds a mine shard's rows with their teacher scores: candidates/part-N.parquet ->
    part-N.parquet, easy/part-N.parquet -> easy/part-N.parquet."""
    return mine_shard if mine_shard.startswith(f"{EASY}/") else Path(mine_shard).name


def teacher_shards(manifest: dict, which: str = "hard") -> list[str]:
    """The teacher shards of a complete RUN/teacher manifest, in order: the hard candidates' (one per candidate
    shard), or with which="easy" the easy candidates' (none unless mine ran with --easy)."""
    if which not in LISTS:
        raise ValueError(f"teacher_shards: which must be one of {', '.join(LISTS)}, got {which!r}")
    easy = [f for f in manifest["expected_shards"] if f.startswith(f"{EASY}/")]
    return easy if which == "easy" else [f for f in manifest["expected_shards"]
                                         if not f.startswith("pairs/") and f not in easy]


# ---------------------------------------------------------------- schemas
def _field(name: str, typ: pa.DataType, description: str) -> pa.Field:
    return pa.field(name, typ, metadata={"description": description})


CANDIDATE_SCHEMA = pa.schema([
    _field("direction", pa.string(), "i2t: the query is an image, candidates are captions; t2i: the reverse"),
    _field("query_id", pa.string(), "image_id (i2t) or text_id (t2i) of the query"),
    _field("positive_ids", pa.list_(pa.string()), "ids of the query's matches (never among the candidates)"),
    _field("candidate_ids", pa.list_(pa.string()), "the k mined hard negatives, most similar first"),
    _field("student_scores", pa.list_(pa.float32()), "student cosine of each candidate at mining time"),
])

TEACHER_SCHEMA = pa.schema(list(CANDIDATE_SCHEMA) + [
    _field("teacher_scores", pa.list_(pa.float32()),
           "teacher score of each candidate, aligned with candidate_ids (which score: the manifest's config.score)"),
    _field("positive_teacher_scores", pa.list_(pa.float32()),
           "teacher score of each positive, aligned with positive_ids"),
])

PAIR_SCHEMA = pa.schema([
    _field("image_id", pa.string(), "the pair's image"),
    _field("text_id", pa.string(), "the pair's caption"),
    _field("score", pa.float32(), "teacher score: ITM log-odds, plus itc_weight x ITC cosine for itm+itc"),
])


# ---------------------------------------------------------------- pair keys and work split
def pair_key(image_rows: np.ndarray, text_rows: np.ndarray, num_texts: int) -> np.ndarray:
    """One int64 per (image row, text row): sorted keys group pairs by image."""
    return np.asarray(image_rows, dtype=np.int64) * num_texts + np.asarray(text_rows, dtype=np.int64)


def split_key(keys: np.ndarray, num_texts: int) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, text rows) of pair keys."""
    return keys // num_texts, keys % num_texts


def rank_share(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of numbered work: items rank, rank + W, rank + 2W, ... (independent of W on resume,
    since each item is a fixed shard)."""
    return [item for i, item in enumerate(items) if i % world_size == rank]
