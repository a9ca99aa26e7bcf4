"""`status` over a run's folders: each stage on its own line, outputs in other folders found by their manifest."""
import json

import pyarrow as pa

from pipeline.artifacts import StageWriter
from pipeline.dist import Dist
from pipeline.status import StageDir, describe

ONE = Dist(rank=0, world_size=1, local_rank=0)
TABLE = [StageDir("mine", "mine"), StageDir("score-teacher", "teacher", ("mine",)),
         StageDir("distill", "distill", ("score-teacher",))]


def _complete(directory, identity):
    w = StageWriter(directory, identity, force=False, dist=ONE, log=lambda *a: None)
    w.begin()
    w.write_table("a.parquet", pa.table({"x": [1]}))
    return w.finish(["a.parquet"])


def _lines(run):
    return {line.split()[0]: line for line in describe(run, TABLE)}


def test_a_damaged_manifest_is_reported_on_its_own_line_and_hides_nothing(tmp_path):
    mine = _complete(tmp_path / "mine", {"stage": "mine", "config": {}})
    _complete(tmp_path / "teacher", {"stage": "teacher", "config": {}, "upstream": mine["fingerprint"]})
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "manifest.json").write_text("{torn")
    lines = _lines(tmp_path)
    assert lines["mine"].split()[1] == "complete" and lines["score-teacher"].split()[1] == "complete"
    assert lines["distill"].startswith("distill") and "damaged:" in lines["distill"] and "corrupt JSON" in lines["distill"]


def test_outputs_in_other_folders_are_listed_and_checked_against_their_input(tmp_path):
    mine = _complete(tmp_path / "mine", {"stage": "mine", "config": {}})
    teacher = _complete(tmp_path / "teacher", {"stage": "teacher", "config": {}, "upstream": mine["fingerprint"]})
    _complete(tmp_path / "students" / "a", {"stage": "distill", "config": {}, "upstream": teacher["fingerprint"]})
    _complete(tmp_path / "students" / "b", {"stage": "distill", "config": {}, "upstream": "0" * 64})
    _complete(tmp_path / "eval-start", {"stage": "evaluate", "config": {}, "upstream": None})
    lines = _lines(tmp_path)
    assert lines["students/a"].split()[1] == "complete" and lines["eval-start"].split()[1] == "complete"
    assert "stale: its input changed or is gone since it was made" in lines["students/b"]
    assert "a.parquet" not in json.dumps(lines)          # shards are not outputs
