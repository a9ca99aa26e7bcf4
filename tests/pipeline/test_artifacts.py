import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.artifacts import SUCCESS, StageLock, StageWriter, stage_state
from pipeline.dist import Dist
from pipeline.errors import PipelineError
from pipeline.policy import diff

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


# ---------------------------------------------------------------- the policy, as a table
from pipeline.artifacts import fingerprint  # noqa: E402
from pipeline.policy import Found, comparable, decide  # noqa: E402

ok = dict(manifest="ok")
POLICY = [  # (what is found, --force, what the stage does)
    (Found(), False, "start"),
    (Found(leftovers=True), False, "refuse-foreign"),
    (Found(leftovers=True), True, "start-over"),
    (Found(manifest="damaged"), False, "refuse-damaged"),
    (Found(manifest="damaged"), True, "start-over"),
    (Found(**ok, same=True, complete=True), False, "up-to-date"),
    (Found(**ok, same=True, complete=True), True, "start-over"),      # --force starts over, whatever it finds
    (Found(**ok, same=True, complete=True, bad_shards=True), False, "redo-shards"),
    (Found(**ok, same=True), False, "resume"),
    (Found(**ok, same=True), True, "start-over"),
    (Found(**ok, finished_work=False), False, "start"),               # other settings, nothing worth keeping
    (Found(**ok, finished_work=True), False, "refuse-settings"),
    (Found(**ok, finished_work=True), True, "start-over"),
    (Found(**ok, finished_work=True, same_config=True), False, "remake"),   # only the inputs changed
    (Found(**ok, finished_work=True, extends=True), False, "extend"),
]


@pytest.mark.parametrize("found,force,action", POLICY)
def test_policy_table(found, force, action):
    assert decide(found, force) == action


REPLACE = [  # what demo --force and loop --force ask of each stage: other settings replaced, the rest as usual
    (Found(**ok, finished_work=True), "start-over"),
    (Found(manifest="damaged"), "start-over"),
    (Found(**ok, same=True, complete=True), "up-to-date"),
    (Found(**ok, same=True), "resume"),
    (Found(**ok, finished_work=True, same_config=True), "remake"),
    (Found(**ok, finished_work=True, extends=True), "extend"),
    (Found(leftovers=True), "refuse-foreign"),
]


@pytest.mark.parametrize("found,action", REPLACE)
def test_replace_changes_only_the_refusal_of_other_settings(found, action):
    assert decide(found, force=False, replace=True) == action


def test_force_starts_a_complete_up_to_date_output_over(tmp_path):
    _complete(tmp_path / "s")
    w = _writer(tmp_path / "s", force=True)
    assert w.begin() is True
    assert not (tmp_path / "s" / "a.parquet").exists() and not (tmp_path / "s" / SUCCESS).exists()


def test_force_replaces_a_damaged_manifest_and_plain_reruns_refuse_it(tmp_path):
    _complete(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{torn")
    with pytest.raises(PipelineError, match="corrupt JSON.*--force to start it over"):
        _writer(tmp_path / "s").begin()
    assert _writer(tmp_path / "s", force=True).begin() is True


def test_changed_inputs_under_the_same_settings_are_made_again_without_force(tmp_path):
    said = []
    w = StageWriter(tmp_path / "s", {"stage": "t", "config": {"k": 1}, "upstream": "aaa"}, force=False, dist=ONE,
                    log=quiet)
    assert w.begin()
    w.write_table("a.parquet", pa.table({"x": [1]}))
    w.finish(["a.parquet"])
    w = StageWriter(tmp_path / "s", {"stage": "t", "config": {"k": 1}, "upstream": "bbb"}, force=False, dist=ONE,
                    log=said.append)
    assert w.begin() is True and not (tmp_path / "s" / "a.parquet").exists()
    assert said == ['[s] its inputs changed since it was made (upstream: "aaa" -> "bbb"); making it again']


def test_refusals_name_the_stages_own_way_out(tmp_path):
    _complete(tmp_path / "s", k=1)
    w = StageWriter(tmp_path / "s", {"stage": "t", "config": {"k": 2}}, force=False, dist=ONE, log=quiet,
                    elsewhere="another --out folder")
    with pytest.raises(PipelineError, match="use --force to replace it, or another --out folder$"):
        w.begin()


def test_an_output_recorded_with_model_paths_is_up_to_date_under_its_old_name(tmp_path):
    """Earlier versions kept a model folder's path and the --student option in the identity; the same files
    at another path are the same model, and the output keeps the fingerprint downstream stages know it by."""
    old = {"stage": "t", "config": {"k": 1, "student": "models/a"}, "student": {"path": "/x/models/a",
                                                                              "files": {"w.bin": "00"}}}
    w = StageWriter(tmp_path / "s", old, force=False, dist=ONE, log=quiet)
    w.begin()
    w.finish([])
    name = fingerprint({"schema_version": 1, **old})
    new = {"stage": "t", "config": {"k": 1}, "student": {"files": {"w.bin": "00"}}}
    w = StageWriter(tmp_path / "s", new, force=False, dist=ONE, log=quiet)
    assert w.begin() is False and w.fingerprint == name
    changed = {**new, "student": {"files": {"w.bin": "11"}}}
    assert comparable(old, changed)[0] != comparable(old, changed)[1]


def test_the_manifest_records_versions_duration_and_locations(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"w")
    w = StageWriter(tmp_path / "s", {"stage": "t", "config": {}, "student": {"files": {"w.bin": "00"}}},
                    force=False, dist=ONE, log=quiet, locations={"student": str(folder), "data": None})
    w.begin()
    m = w.finish([])
    assert m["versions"]["torch"] and m["versions"]["pyarrow"] and m["versions"]["python"]
    assert m["seconds"] >= 0 and m["locations"] == {"student": str(folder.resolve())}
    assert m["location_stats"]["student"]["w.bin"][0] == 1


def test_a_failed_write_names_the_file_and_leaves_no_partial_copy(tmp_path, monkeypatch):
    import errno
    import os

    from pipeline.artifacts import atomic_write_bytes

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "shard.parquet", b"x" * 10)
    assert e.value.filename == str(tmp_path / "shard.parquet") and e.value.strerror == "No space left on device"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the policy's words, as a table
from pipeline.policy import announcement, changes, refusal  # noqa: E402

SAID = lambda: "config.k: 1 -> 2"
WORDS = [  # (action, force, old manifest, had files, the line logged)
    ("up-to-date", False, {}, True, "[s] up to date (fingerprint 0123456789ab); nothing to do"),
    ("redo-shards", False, {}, True, "[s] 2 shard(s) missing or failing their checksum; redoing them"),
    ("resume", False, {}, True, "[s] resuming an incomplete run (fingerprint 0123456789ab)"),
    ("start-over", False, {}, True, "[s] replacing output made with other settings (config.k: 1 -> 2)"),
    ("start-over", False, "damaged", True, "[s] replacing output made with other settings (its manifest was damaged)"),
    ("start-over", True, {}, True, "[s] --force: starting over"),
    ("start-over", True, None, False, None),
    ("start", False, {}, True, "[s] replacing an attempt with other settings that finished no shard"),
    ("start", False, None, False, None),
    ("remake", False, {}, True, "[s] its inputs changed since it was made (config.k: 1 -> 2); making it again"),
    ("extend", False, {}, True, None),                                  # the extension says itself
]


@pytest.mark.parametrize("action,force,old,had_files,line", WORDS)
def test_what_each_action_says(action, force, old, had_files, line):
    assert announcement(action, "[s]", "0123456789abcdef", force=force, old=old, said=SAID, bad=2,
                        had_files=had_files) == line
    assert refusal(action, "s", old, SAID, lambda: [], "another --run directory") is None


def test_refusals_say_why_and_the_way_out(tmp_path):
    out = lambda action, old="": refusal(action, tmp_path, old, SAID, lambda: ["a", "b", "c", "d"], "elsewhere")
    assert out("refuse-damaged", "m.json: corrupt") == "m.json: corrupt; rerun the stage with --force to start it over"
    assert out("refuse-foreign") == (f"{tmp_path} holds files but no manifest.json (a, b, c); it was not written by "
                                     "this tool; use --force to replace it, or elsewhere")
    assert out("refuse-settings") == (f"{tmp_path} was made with different settings (config.k: 1 -> 2); use --force "
                                      "to replace it, or elsewhere")


def test_changes_are_at_most_four_and_a_key_can_say_itself():
    old = {"config": {f"k{i}": i for i in range(6)}, "corpus": "aaa"}
    new = {"config": {f"k{i}": i + 1 for i in range(6)}, "corpus": "bbb"}
    assert changes(old, new) == "config.k0: 0 -> 1; config.k1: 1 -> 2; config.k2: 2 -> 3; config.k3: 3 -> 4; and 3 more"
    assert changes(old, new, {"corpus": lambda: "1 image changed: a.jpg"}).startswith(
        "corpus: 1 image changed: a.jpg; config.k0: 0 -> 1;")
    assert changes(old, new, {"corpus": lambda: None}).endswith("and 3 more")   # no words: the diff stands
    assert changes(old, old) == "(fingerprint only)"
