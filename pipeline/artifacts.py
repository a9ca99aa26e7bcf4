"""The artifact contract every stage keeps (docs/design.md, "Rules every stage keeps").

A stage directory holds `manifest.json` (resolved config, schema version, input identities, fingerprint,
shard list), numbered shards and `_SUCCESS`, written last. While a process writes it, the directory is locked.

    writer = StageWriter(run / "mine", identity, force=cfg.force, dist=dist)
    if not writer.begin():          # up to date: nothing to do, nothing touched
        return
    for shard in plan:
        if writer.is_done(shard): continue
        writer.write_table(shard, table)   # temp name, fsync, rename, then a checksum record
    writer.finish(expected=plan)     # manifest with every shard, then _SUCCESS

Shard records live in `.records/` (one small JSON per shard, written after the shard) so that several ranks
can complete shards without sharing a file; `finish` folds them into the manifest. A shard counts as done
only when its record exists and the file's size and SHA-256 match it.

What a stage does with what it finds is `pipeline/policy.py` (pure); a training run's extension is
`pipeline/extension.py`; the writer here reads the folder (StageFolder), holds the locks (StageLocks) and
carries the decision out.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import faults
from .errors import PipelineError
from .extension import Growth   # also imported from here by the training loop
from .policy import Found, announcement, changes, comparable, decide, refusal

if TYPE_CHECKING:  # only a type here: importing it would pull in torch for `status`
    from .dist import Dist

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
LOCK = ".lock"
RECORDS = ".records"


# ---------------------------------------------------------------- hashing
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:   # disk full, read-only: named by the file it was writing, the partial copy removed
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, None if the file does not exist; a one-line error if it is damaged or not an object."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        what = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise PipelineError(f"{path}: corrupt JSON ({what}); rerun the stage with --force to replace it") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{path}: expected a JSON object, found {type(value).__name__}; rerun the stage with "
                            "--force to replace it")
    return value


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """A stage directory's manifest, checked to be one (an object with its stage and fingerprint)."""
    manifest = read_json(directory / MANIFEST)
    if manifest is not None and not all(k in manifest for k in ("stage", "fingerprint", "identity")):
        raise PipelineError(f"{directory / MANIFEST}: not a manifest of this tool (no stage, fingerprint or "
                            "identity); rerun the stage with --force to replace it")
    return manifest


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The lines of a JSON-lines log; a torn last line (a kill during the write) is left out, a damaged line
    elsewhere is an error naming it."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise PipelineError(f"{path}: line {i + 1} is not JSON; rerun the stage with --force to start over") \
                from None
    return rows


# ---------------------------------------------------------------- lock
def _flock(path: Path, mode: int) -> tuple[int | None, str]:
    """Open `path` and take a non-blocking flock in `mode`: (fd, "") or (None, the holder it names)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip()
        os.close(fd)
        return None, holder
    return fd, ""


def _unlock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class StageLock:
    """An exclusive `flock` on DIR/.lock; the file names the holder. The OS drops it if the holder dies."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, holder = _flock(self.path, fcntl.LOCK_EX)
        if fd is None:   # a reader (ReadLock) holds it shared and writes no name
            raise PipelineError(f"{self.path.parent} is being written by another process ({holder})" if holder else
                                f"{self.path.parent} is being read by another stage (as its input); wait for it "
                                "to finish")
        holder = (
            f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{_dt.datetime.now().isoformat(timespec='seconds')}: {' '.join(sys.argv[:3])}"
        )
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
        _unlock(self._fd)
        self._fd = None


class ReadLock:
    """A shared `flock` on an upstream stage's DIR/.lock while a stage reads it: its writer (a `--force` rerun)
    cannot start meanwhile, and the manifest fingerprint seen at the start is checked again at the end."""

    def __init__(self, directory: Path):
        self.dir, self._fd, self.fingerprint = Path(directory), None, None

    def acquire(self) -> None:
        fd, holder = _flock(self.dir / LOCK, fcntl.LOCK_SH)
        if fd is None:
            raise PipelineError(f"{self.dir} is being written by another process ({holder or 'unknown process'}); "
                                "wait for it to finish, then rerun")
        self._fd = fd
        self.fingerprint = (read_manifest(self.dir) or {}).get("fingerprint")

    def check(self) -> None:
        now = read_manifest(self.dir) if (self.dir / SUCCESS).exists() else None
        if now is None or now.get("fingerprint") != self.fingerprint:
            raise PipelineError(f"{self.dir} changed while this stage read it; rerun this stage")

    def release(self) -> None:
        _unlock(self._fd)
        self._fd = None


class StageLocks:
    """A writer's locks: its own directory exclusively (StageLock), the upstream directories it reads shared
    (ReadLock) from its start to its end; all are taken or none."""

    def __init__(self, directory: Path, reads: Iterable[Path] = ()):
        self.own, self.reads = StageLock(directory), [ReadLock(d) for d in reads]

    def acquire(self) -> None:
        self.own.acquire()
        try:
            for r in self.reads:
                r.acquire()
        except BaseException:
            self.release()
            raise

    def hold(self, work: Callable[[], Any]) -> None:
        """Take the locks and run `work`; release them if it fails."""
        self.acquire()
        try:
            work()
        except BaseException:
            self.release()
            raise

    def check(self) -> None:
        """The inputs are still the ones read at the start (see ReadLock.check)."""
        for r in self.reads:
            r.check()

    def release(self) -> None:
        for r in self.reads:
            r.release()
        self.own.release()


# ---------------------------------------------------------------- stage state (read side)
def stage_state(directory: Path) -> dict[str, Any]:
    """Read-only view of a stage directory: absent | partial | complete, with shard counts."""
    manifest = read_manifest(directory)
    if manifest is None:
        return {"state": "absent", "manifest": None}
    expected = manifest.get("expected_shards") or []
    done = sum(1 for rel in expected if _record_ok(directory, rel))
    complete = (directory / SUCCESS).exists() and done == len(expected)
    return {"state": "complete" if complete else "partial", "done": done, "total": len(expected), "manifest": manifest}


def require_complete(directory: Path, what: str, hint: str) -> dict[str, Any]:
    """The manifest of a complete upstream stage, or an error saying what to run."""
    state = stage_state(directory)
    if state["state"] == "absent":
        raise PipelineError(f"{directory}: no {what} output here; {hint}")
    if state["state"] != "complete":
        raise PipelineError(
            f"{directory}: {what} is incomplete ({state['done']}/{state['total']} shards); rerun it to finish: {hint}"
        )
    return state["manifest"]


def _record_path(directory: Path, rel: str) -> Path:
    return directory / RECORDS / (rel.replace("/", "__") + ".json")


def failing_shards(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """The manifest's expected shards that are missing or fail their checksum (each checksum read once)."""
    return [rel for rel in manifest.get("expected_shards") or [] if not _record_ok(directory, rel)]


def _record_ok(directory: Path, rel: str) -> bool:
    rec = read_json(_record_path(directory, rel))
    path = directory / rel
    if rec is None or not path.exists() or path.stat().st_size != rec["bytes"]:
        return False
    return sha256_file(path) == rec["sha256"]


# ---------------------------------------------------------------- writer
def library_versions() -> dict[str, str]:
    """The versions of the libraries that shape a stage's output, for its manifest (read from the installed
    packages' metadata: nothing is imported)."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("cprd-pipeline", "torch", "transformers", "faiss-cpu", "faiss-gpu", "pyarrow", "numpy", "accelerate",
                 "open-clip-torch", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def resolved(locations: dict[str, str | None]) -> dict[str, str]:
    """Where the inputs were found (absolute paths), for the record and for later stages: not identity."""
    return {k: str(Path(v).resolve()) if Path(v).exists() else v for k, v in locations.items() if v}


def location_stats(identity: dict[str, Any], locations: dict[str, str]) -> dict[str, dict[str, list[int]]]:
    """Size and mtime of each model folder's hashed files (identity KEY: {"files": ...} found at location KEY),
    so that `status` can tell a changed model by hashing only the files whose stats differ."""
    out = {}
    for key, folder in locations.items():
        files = (identity.get(key) or {}).get("files") if isinstance(identity.get(key), dict) else None
        if files and Path(folder).is_dir():
            stats = {rel: os.stat(Path(folder) / rel) for rel in files if (Path(folder) / rel).is_file()}
            out[key] = {rel: [st.st_size, st.st_mtime_ns] for rel, st in stats.items()}
    return out


def manifest(writer: StageWriter, old: dict[str, Any], status: str, shards: dict[str, Any] | None,
             expected: list[str] | None, seconds: float, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest a writer records (`old`: the one it replaces); shards and their list default to the old."""
    extended = writer.extended or old.get("extended")   # this writer's continuation, else the one recorded
    now = _dt.datetime.now().isoformat(timespec="seconds")
    return {
        "stage": writer.identity.get("stage"),
        "status": status,
        "fingerprint": writer.fingerprint,
        "identity": writer.identity,
        "config": writer.config,
        "created": (old.get("created") if old.get("fingerprint") == writer.fingerprint else None) or now,
        "updated": now,
        "expected_shards": expected if expected is not None else old.get("expected_shards", []),
        "shards": shards if shards is not None else old.get("shards", {}),
        **({"extended": extended} if extended else {}),
        "locations": writer.locations or old.get("locations", {}),
        "location_stats": writer.location_stats or old.get("location_stats", {}),
        "versions": library_versions(),
        "seconds": round(seconds, 1),
        **(extra or {}),
    }


def shard_records(directory: Path, expected: list[str]) -> dict[str, Any]:
    """Each expected shard's record, or an error naming the first shard missing."""
    shards = {}
    for rel in expected:
        rec = read_json(_record_path(directory, rel))
        if rec is None or not (directory / rel).exists():
            raise PipelineError(f"{directory / rel}: shard missing at the end of the stage; rerun to finish it")
        shards[rel] = rec
    return shards


def on_main(dist: Dist, work: Callable[[], None], where: Path) -> None:
    """Run `work` on the main process; every rank hears of its error instead of waiting at a barrier."""
    error: BaseException | None = None
    if dist.is_main:
        try:
            work()
        except BaseException as e:
            error = e
    if not dist.all_true(error is None):  # also the barrier
        if error is not None:
            raise error
        raise PipelineError(f"{where}: the main process could not start this stage (see its error)")


class StageFolder:
    """What a stage directory holds besides the contract's files: `keep`, entries a start-over leaves (mine's
    embeddings cache, checked by content), and `derived` shards, made from the inputs alone in seconds (mine's
    corpus tables), which do not count as finished work."""

    def __init__(self, directory: Path, keep: Iterable[str] = (), derived: Iterable[str] = ()):
        self.dir, self.keep, self.derived = directory, set(keep) | {LOCK}, list(derived)

    def leftovers(self) -> list[str]:
        """The entries a start-over would delete, by name."""
        return sorted(p.name for p in self.dir.iterdir() if p.name not in self.keep) if self.dir.exists() else []

    def finished_work(self) -> bool:
        """Anything beyond a manifest, the lock, kept entries and the derived shards: other shards,
        checkpoints, logs."""
        cheap = {_record_path(self.dir, rel).name for rel in self.derived}
        records = self.dir / RECORDS
        if records.is_dir() and any(p.name not in cheap for p in records.iterdir()):
            return True
        top = {rel.split("/")[0] for rel in self.derived} | {MANIFEST, RECORDS} | self.keep
        return any(p.name not in top for p in self.dir.iterdir())

    def remove_orphans(self) -> None:
        """Temporary files and folders of writers that were killed (the caller holds the lock, so no writer is
        at work): `.NAME.tmp-PID` and `.NAME.tmp`."""
        if not self.dir.exists():
            return
        for p in sorted(self.dir.rglob(".*.tmp*"), reverse=True):
            if ".tmp" in p.name and p.exists():
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def wipe(self) -> None:
        """Delete everything but the kept entries."""
        for p in self.dir.iterdir() if self.dir.exists() else ():
            if p.name not in self.keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


class StageWriter:
    """Writes one stage directory under the contract. See the module docstring for the call sequence.

    It carries out what `policy.decide` says of what the directory holds (StageFolder), under StageLocks;
    `growth` (pipeline/extension.py) lets a training run continue; `explain` words a key's change (mine)."""

    def __init__(self, directory: Path, identity: dict[str, Any], *, force: bool, dist: Dist, replace: bool = False,
                 keep: Iterable[str] = (), config: dict[str, Any] | None = None, log=print, reads: Iterable[Path] = (),
                 precheck: Callable[[], Any] | None = None, derived: Iterable[str] = (), growth: Growth | None = None,
                 explain: dict[str, Callable[[], str | None]] | None = None,
                 elsewhere: str = "another --run directory", locations: dict[str, str] | None = None):
        self.dir = Path(directory)
        self.identity = {"schema_version": SCHEMA_VERSION, **identity}
        self.fingerprint = fingerprint(self.identity)
        self.force, self.replace, self.dist, self.config = force, replace, dist, config
        self.log = log if dist.is_main else (lambda *a, **k: None)
        self.folder = StageFolder(self.dir, keep, derived)
        # upstream stage directories this stage reads: locked shared from begin to the end, re-checked at finish
        self._locks = StageLocks(self.dir, reads)
        # run before an existing output is deleted (--force, or an attempt with other settings): loads the new
        # models, so that a bad one fails with the old output still there
        self.precheck = precheck
        self.growth, self.explain, self.elsewhere = growth, explain or {}, elsewhere
        self.extended: list[dict[str, Any]] = []   # the runs this one continues: [{"fingerprint", "steps"}]
        self.locations = resolved(locations or {})
        self.location_stats = location_stats(self.identity, self.locations)
        self._started, self._base, self._bad, self._trained = _dt.datetime.now(), None, [], None

    # -- start
    def begin(self) -> bool:
        """Lock, check the existing output, write the manifest. False if complete and up to date."""
        on_main(self.dist, lambda: self._locks.hold(self._prepare), self.dir)
        # Every rank learns the outcome from the files rank 0 left: _SUCCESS stays only when up to date.
        up_to_date = (self.dir / SUCCESS).exists()
        if up_to_date and self.dist.is_main:
            self._locks.release()
        return not up_to_date

    def _prepare(self) -> None:
        self.folder.remove_orphans()
        old, found = self._found()
        action = decide(found, self.force, self.replace)
        said = lambda: changes(old.get("identity", {}), self.identity, self.explain)
        if error := refusal(action, self.dir, old, said, self.folder.leftovers, self.elsewhere):
            raise PipelineError(error)
        had_files = self.dir.exists() and any(self.dir.iterdir())
        if line := announcement(action, f"[{self.dir.name}]", self.fingerprint, force=self.force, old=old,
                                said=said, bad=len(self._bad), had_files=had_files):
            self.log(line)
        if action == "up-to-date":
            return
        if action in ("redo-shards", "extend"):
            (self.dir / SUCCESS).unlink(missing_ok=True)
        if action == "extend":
            self.extended = self.growth.extend(self.dir, old, self._trained, self.log)
        elif action not in ("redo-shards", "resume"):
            if self.precheck is not None and self.dir.exists():   # the new inputs load before the old output goes
                self.precheck()
                self.precheck = None
            self.folder.wipe()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_manifest(status="running", shards=None)

    def _found(self) -> tuple[Any, Found]:
        """The old manifest (or the error reading it) and what the policy needs to know of the directory."""
        try:
            old = read_manifest(self.dir)
        except PipelineError as e:
            return str(e), Found(manifest="damaged")
        if old is None:
            return None, Found(leftovers=bool(self.folder.leftovers()))
        identity = old.get("identity") if isinstance(old.get("identity"), dict) else {}
        old_view, new_view = comparable(identity, self.identity)
        same = old.get("fingerprint") == self.fingerprint
        if not same and fingerprint(old_view) == fingerprint(new_view):
            same, self.fingerprint = True, old["fingerprint"]   # keep the name downstream stages know it by
        complete = (self.dir / SUCCESS).exists()
        self._bad = failing_shards(self.dir, old) if complete else []   # redo-shards reports these
        work = not same and self.folder.finished_work()
        if work and not self.force and self.growth is not None:
            self._trained = self.growth.trained(self.dir, old, self.identity, self.elsewhere)
        return old, Found(manifest="ok", same=same, same_config=old_view.get("config") == self.identity.get("config"),
                          complete=complete, bad_shards=bool(self._bad), finished_work=work,
                          extends=self._trained is not None)

    def _write_manifest(self, status: str, shards: dict[str, Any] | None, expected: list[str] | None = None,
                        extra: dict[str, Any] | None = None) -> None:
        old = read_json(self.dir / MANIFEST) or {}
        if self._base is None:   # the first write of this attempt: the attempts before it
            kept = old.get("fingerprint") == self.fingerprint or self.extended
            self._base = float(old.get("seconds", 0.0)) if kept else 0.0
        # wall time of the attempts at this output (a killed one's up to its last manifest write)
        seconds = self._base + (_dt.datetime.now() - self._started).total_seconds()
        atomic_write_json(self.dir / MANIFEST, manifest(self, old, status, shards, expected, seconds, extra))

    # -- shards
    def is_done(self, rel: str) -> bool:
        return _record_ok(self.dir, rel)

    def record_file(self, rel: str, rows: int = 0) -> None:
        """Record a file once it is complete (written here, or by other means, e.g. save_pretrained)."""
        path = self.dir / rel
        atomic_write_json(
            _record_path(self.dir, rel), {"rows": rows, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
        faults.count("shard")

    def write_table(self, rel: str, table: pa.Table) -> None:
        atomic_write_table(self.dir / rel, table)
        self.record_file(rel, table.num_rows)

    def write_npy(self, rel: str, array: np.ndarray) -> None:
        atomic_write_npy(self.dir / rel, array)
        self.record_file(rel, int(array.shape[0]))

    def plan(self, expected: list[str]) -> None:
        """Record the full shard list up front, so that `status` can report n/m while the stage runs."""
        if self.dist.is_main:
            self._write_manifest(status="running", shards=None, expected=expected)

    # -- end
    def finish(self, expected: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Wait for every rank, fold the shard records into the manifest, then write _SUCCESS."""
        self.dist.barrier()
        manifest: dict[str, Any] = {}
        if self.dist.is_main:
            try:
                shards = shard_records(self.dir, expected)
                self._locks.check()   # the inputs are still the ones this output was made from
                self._write_manifest(status="complete", shards=shards, expected=expected, extra=extra)
                (self.dir / SUCCESS).write_text(self.fingerprint + "\n")
                manifest = read_json(self.dir / MANIFEST) or {}
            finally:
                self._locks.release()
        self.dist.barrier()
        return manifest

    def abort(self) -> None:
        if self.dist.is_main:
            self._locks.release()

    def __enter__(self) -> "StageWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        """An error inside `with writer:` releases the locks (a retry in the same process can start)."""
        if exc_type is not None:
            self.abort()
