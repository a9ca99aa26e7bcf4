import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.artifacts import SUCCESS, StageLock, StageWriter, diff, stage_state
from pipeline.dist import Dist
from pipeline.errors import PipelineError

ONE = Dist(rank=0, world_size=1, local_rank=0)
quiet = lambda *a, **k: None


def _writer(path, k=1, force=False):
    return StageWriter(path, {"stage": "t", "config": {"k": k}}, force=force, dist=ONE, log=quiet)


def _complete(path, k=1):
    w = _writer(path, k)
    assert w.begin()
    w.plan(["a.parquet", "b.npy"])
    w.write_table("a.parquet", pa.table({"x": [1, 2, 3]}))
    w.write_npy("b.npy", np.arange(4, dtype=np.float32))
    return w.finish(["a.parquet", "b.npy"])


def test_complete_stage_records_rows_and_checksums(tmp_path):
    manifest = _complete(tmp_path / "s")
    assert manifest["status"] == "complete"
    assert manifest["shards"]["a.parquet"]["rows"] == 3 and manifest["shards"]["b.npy"]["rows"] == 4
    assert len(manifest["shards"]["a.parquet"]["sha256"]) == 64
    assert (tmp_path / "s" / SUCCESS).read_text().strip() == manifest["fingerprint"]
    assert stage_state(tmp_path / "s")["state"] == "complete"


def test_up_to_date_returns_false(tmp_path):
    _complete(tmp_path / "s")
    assert _writer(tmp_path / "s").begin() is False


def test_changed_identity_is_refused_with_the_difference(tmp_path):
    _complete(tmp_path / "s", k=1)
    with pytest.raises(PipelineError, match=r"config\.k: 1 -> 2.*--force"):
        _writer(tmp_path / "s", k=2).begin()
    w = _writer(tmp_path / "s", k=2, force=True)
    assert w.begin() and not (tmp_path / "s" / "a.parquet").exists()


def test_corrupt_shard_fails_its_checksum(tmp_path):
    _complete(tmp_path / "s")
    shard = tmp_path / "s" / "a.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    assert stage_state(tmp_path / "s") == {**stage_state(tmp_path / "s"), "state": "partial", "done": 1}
    w = _writer(tmp_path / "s")
    assert w.begin() is True and not w.is_done("a.parquet") and w.is_done("b.npy")
    assert not (tmp_path / "s" / SUCCESS).exists()


def test_lock_names_the_holder(tmp_path):
    lock = StageLock(tmp_path)
    lock.acquire()
    try:
        with pytest.raises(PipelineError, match=r"being written by another process \(pid \d+"):
            StageLock(tmp_path).acquire()
    finally:
        lock.release()
    StageLock(tmp_path).acquire()  # free again once released


def test_foreign_directory_is_not_clobbered(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("x")
    with pytest.raises(PipelineError, match="not written by this tool"):
        _writer(tmp_path / "s").begin()
    assert (tmp_path / "s" / "precious.txt").exists()


def test_finish_refuses_missing_shards(tmp_path):
    w = _writer(tmp_path / "s")
    w.begin()
    w.write_table("a.parquet", pa.table({"x": [1]}))
    with pytest.raises(PipelineError, match="b.npy: shard missing"):
        w.finish(["a.parquet", "b.npy"])
    assert not (tmp_path / "s" / SUCCESS).exists()


def test_diff_lists_nested_changes():
    assert diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 4}}) == ["a.c: 2 -> 3", "a.d: (absent) -> 4"]


def test_attempt_without_finished_shards_is_replaced_without_force(tmp_path):
    w = _writer(tmp_path / "s", k=1)
    w.begin()  # e.g. the model failed to load: a manifest, no shard
    w.abort()
    w2 = _writer(tmp_path / "s", k=2)
    assert w2.begin() is True
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["identity"]["config"]["k"] == 2


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b"{}", b"\xff\xfe"])
def test_a_damaged_manifest_is_one_line_and_force_recovers(tmp_path, content):
    _complete(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_bytes(content)
    with pytest.raises(PipelineError, match=r"manifest\.json: .*--force"):
        stage_state(tmp_path / "s")
    with pytest.raises(PipelineError, match=r"manifest\.json: .*--force"):
        _writer(tmp_path / "s").begin()
    assert _writer(tmp_path / "s", force=True).begin()            # replaced: the stage starts over
    assert not (tmp_path / "s" / "a.parquet").exists()


def test_orphan_temporary_files_of_killed_writers_are_removed(tmp_path):
    _complete(tmp_path / "s")
    orphans = [tmp_path / "s" / ".a.parquet.tmp-99999", tmp_path / "s" / "sub" / ".x.json.tmp-1",
               tmp_path / "s" / ".final.tmp"]
    for p in orphans[:2]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    orphans[2].mkdir()
    assert not _writer(tmp_path / "s").begin()                     # up to date, and tidied
    assert not any(p.exists() for p in orphans)
    assert (tmp_path / "s" / "a.parquet").exists()


def test_a_torn_last_line_of_a_log_is_dropped_and_a_damaged_middle_line_named(tmp_path):
    from pipeline.artifacts import read_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\nxx\n{"step": 3}\n')
    with pytest.raises(PipelineError, match="metrics.jsonl: line 2 is not JSON"):
        read_jsonl(log)


def test_an_upstream_is_locked_while_read_and_checked_before_success(tmp_path):
    _complete(tmp_path / "up")
    down = StageWriter(tmp_path / "down", {"stage": "d", "config": {}}, force=False, dist=ONE, log=quiet,
                       reads=[tmp_path / "up"])
    assert down.begin()
    with pytest.raises(PipelineError, match="is being read by another stage"):
        _writer(tmp_path / "up", k=2, force=True).begin()           # a --force rerun of the input waits
    down.plan([])
    down.finish([])                                                 # releases the shared lock
    assert _writer(tmp_path / "up", k=2, force=True).begin()

    # the input changed under a reader (between its start and its end): no _SUCCESS
    _complete(tmp_path / "up2")
    down2 = StageWriter(tmp_path / "down2", {"stage": "d", "config": {}}, force=False, dist=ONE, log=quiet,
                        reads=[tmp_path / "up2"])
    assert down2.begin()
    manifest = json.loads((tmp_path / "up2" / "manifest.json").read_text())
    (tmp_path / "up2" / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "other"}))
    down2.plan([])
    with pytest.raises(PipelineError, match="changed while this stage read it"):
        down2.finish([])
    assert not (tmp_path / "down2" / SUCCESS).exists()
