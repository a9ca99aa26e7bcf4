"""What the stage outputs found under the root hold, as the sections need it: a teacher cache's scores per
direction (Parquet shards, sampled to MAX_QUERIES queries per direction), and every finished evaluation."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import read_json
from .discover import Found

MAX_QUERIES = 20000


@dataclass
class Direction:
    """One direction's rows of a teacher cache (sampled): [Q, k] candidate scores, and each query's positives."""
    student: np.ndarray
    teacher: np.ndarray
    positives: list[np.ndarray]
    total: int                      # queries before sampling


def read_teacher(teacher_dir: Path, manifest: dict, max_queries: int = MAX_QUERIES, seed: int = 0) -> dict[str, Direction]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ..layout import teacher_shards

    cols = ["direction", "student_scores", "teacher_scores", "positive_teacher_scores"]
    table = pa.concat_tables([pq.read_table(teacher_dir / f, columns=cols) for f in teacher_shards(manifest)])
    out = {}
    for d in ("i2t", "t2i"):
        sub = table.filter(pc.equal(table["direction"], d))
        if sub.num_rows == 0:
            continue
        lengths = pc.list_value_length(sub["student_scores"]).to_numpy(zero_copy_only=False)
        full = np.flatnonzero(lengths == lengths.max())   # rows with fewer candidates (tiny corpora) are left out
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(full, size=min(max_queries, len(full)), replace=False))
        rows = sub.take(pa.array(pick))                    # only the sampled rows become Python lists
        out[d] = Direction(np.array(rows["student_scores"].to_pylist(), np.float32),
                           np.array(rows["teacher_scores"].to_pylist(), np.float32),
                           [np.asarray(r, np.float32) for r in rows["positive_teacher_scores"].to_pylist()],
                           total=sub.num_rows)
    return out


@dataclass
class Cache:
    """A complete teacher cache, read: its label under the root, the teacher's score, its rows per direction."""
    label: str
    score: str
    dirs: dict[str, Direction]


def read_caches(teachers: list[Found], root: Path, max_queries: int = MAX_QUERIES) -> list[Cache]:
    caches = [Cache(t.label(root), t.manifest["config"].get("score", "teacher"),
                    read_teacher(t.path, t.manifest, max_queries)) for t in teachers]
    return [c for c in caches if c.dirs]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-np.clip(x.astype(np.float64), -500, 500)))).astype(np.float32)


def prob_views(caches: list[Cache], teachers: list[Found], students: list[Found], root: Path) -> list[Cache]:
    """The caches that a distill under the root read with `--teacher-scale prob`, again, with their teacher scores
    as match probabilities sigmoid(log-odds) (labelled `LABEL (prob)`): the report draws what those losses saw."""
    read_as_prob = {Path(where).resolve() for s in students
                    if (s.manifest.get("config") or {}).get("teacher_scale") == "prob"
                    and (where := (s.manifest.get("locations") or {}).get("scores"))}
    labels = {t.label(root) for t in teachers if Path(t.path).resolve() in read_as_prob}
    return [dataclasses.replace(c, label=f"{c.label} (prob)", score=f"sigmoid({c.score})",
                                dirs={d: dataclasses.replace(v, teacher=_sigmoid(v.teacher),
                                                             positives=[_sigmoid(p) for p in v.positives])
                                      for d, v in c.dirs.items()})
            for c in caches if c.label in labels]


@dataclass
class Evaluation:
    label: str
    model: str
    metrics: dict
    corpus: str
    starting: bool      # the evaluated model is the student that mined the run


def _found_at(manifest: dict, key: str) -> str | None:
    """Where a stage found its model `key`: the manifest's locations, or the path earlier versions kept in the
    identity; None for a hub model."""
    identity = manifest.get("identity", {}).get(key) or {}
    if "hub" in identity:
        return None
    return (manifest.get("locations") or {}).get(key) or identity.get("path")


def read_evaluations(found: list[Found], mines: list[Found], students: list[Found], root: Path) -> list[Evaluation]:
    """Finished evaluations. The starting student is a mine's student that no distill under root made (in a
    loop, round r mines with round r-1's distilled student)."""
    distilled = {str((s.path / "final").resolve()) for s in students}
    starting = [m.manifest["identity"].get("student") for m in mines
                if _found_at(m.manifest, "student") not in distilled]
    out = []
    for e in found:
        metrics = read_json(e.path / "metrics.json") if e.complete else None
        if metrics is None:
            continue
        ident = e.manifest.get("identity", {})
        model = ident.get("model") or {}
        where = _found_at(e.manifest, "model")
        name = where or model.get("hub") or metrics.get("model", "?")
        rel = os.path.relpath(name, root) if where else name
        out.append(Evaluation(e.label(root), rel if not rel.startswith("../..") else name, metrics,
                              ident.get("corpus", ""), model in starting))
    return out
