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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import faults
from .errors import PipelineError

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


def diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values: ['config.k: 32 -> 16', ...]."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old:
                out.append(f"{sub}: (absent) -> {_short(new[key])}")
            elif key not in new:
                out.append(f"{sub}: {_short(old[key])} -> (absent)")
            else:
                out.extend(diff(old[key], new[key], sub))
        return out
    return [] if old == new else [f"{path}: {_short(old)} -> {_short(new)}"]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _record_ok(directory: Path, rel: str) -> bool:
    rec = read_json(_record_path(directory, rel))
    path = directory / rel
    if rec is None or not path.exists() or path.stat().st_size != rec["bytes"]:
        return False
    return sha256_file(path) == rec["sha256"]


# ---------------------------------------------------------------- writer
@dataclass(frozen=True)
class Growth:
    """How a training output may continue instead of being replaced: when its identity differs only in `keys`
    (the length options) and the new length, `steps`, is not below the steps it has trained (the checkpoint that
    `checkpoints` names, or the finished run's `steps`), the run resumes from that checkpoint; `outputs` (made at
    the end, e.g. final/) are removed since the manifest no longer vouches for them."""
    keys: tuple[str, ...]
    steps: int
    checkpoints: str          # the file naming the last complete checkpoint, {"step": N, ...}
    outputs: tuple[str, ...]


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


# ---------------------------------------------------------------- the policy
@dataclass(frozen=True)
class Found:
    """What a stage directory holds, as far as the policy needs to know (StageWriter._found reads it)."""
    manifest: str = "absent"       # absent | damaged | ok
    same: bool = False             # made with this identity (or an equal one recorded by an earlier version)
    same_config: bool = False      # the stage's own settings are unchanged (only its inputs differ)
    complete: bool = False         # _SUCCESS present
    bad_shards: bool = False       # some recorded shard is missing or fails its checksum
    finished_work: bool = False    # anything that took more than seconds to make (see _has_finished_work)
    leftovers: bool = False        # files, but no manifest
    extends: bool = False          # the new settings only lengthen a training run (Growth)


ACTIONS = ("up-to-date", "redo-shards", "resume", "start", "start-over", "extend", "remake",
           "refuse-foreign", "refuse-damaged", "refuse-settings")


def decide(found: Found, force: bool, replace: bool = False) -> str:
    """What a stage does with what it finds, as `make` would: one of ACTIONS.

    --force starts over whatever is there. Otherwise an output made with the same identity is kept (complete),
    repaired (shards failing their checksum) or resumed; one whose own settings are unchanged but whose inputs
    changed (upstream fingerprint, corpus, model files) is made again; one made with other settings is refused,
    unless it finished nothing worth keeping or the new settings only extend a training run; `replace` (what
    the demo and loop pass for their --force) turns that refusal, and only that, into starting over.
    """
    if force:
        return "start-over"
    if found.manifest == "damaged":
        return "start-over" if replace else "refuse-damaged"
    if found.manifest == "absent":
        return "refuse-foreign" if found.leftovers else "start"
    if found.same:
        if found.complete:
            return "redo-shards" if found.bad_shards else "up-to-date"
        return "resume"
    if not found.finished_work:
        return "start"
    if found.extends:
        return "extend"
    if found.same_config:
        return "remake"
    return "start-over" if replace else "refuse-settings"


def comparable(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two identities as an earlier version and this one both record them: an earlier version kept model
    folders' paths (`path` beside `files`) and the location options (--student, --teacher, --model, ...) in the
    identity; this one keeps their contents only. Facets this version added and the old one lacks are left out."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not (k == "path" and "files" in value)}
        return value
    old = strip(old)
    if isinstance(old.get("config"), dict):
        old["config"] = {k: v for k, v in old["config"].items() if k not in LOCATION_KEYS}
    return old, {k: v for k, v in new.items() if k in old}


LOCATION_KEYS = ("student", "teacher", "model", "rerank_teacher", "val_data")   # see `comparable`


class StageWriter:
    """Writes one stage directory under the contract. See the module docstring for the call sequence."""

    def __init__(
        self,
        directory: Path,
        identity: dict[str, Any],
        *,
        force: bool,
        dist: Dist,
        replace: bool = False,
        keep: Iterable[str] = (),
        config: dict[str, Any] | None = None,
        log=print,
        reads: Iterable[Path] = (),
        precheck: Callable[[], Any] | None = None,
        derived: Iterable[str] = (),
        growth: Growth | None = None,
        explain: dict[str, Callable[[], str | None]] | None = None,
        elsewhere: str = "another --run directory",
        locations: dict[str, str] | None = None,
    ):
        self.dir = Path(directory)
        self.identity = {"schema_version": SCHEMA_VERSION, **identity}
        self.fingerprint = fingerprint(self.identity)
        self.force, self.replace = force, replace
        self.dist = dist
        self.keep = set(keep) | {LOCK}
        self.config = config
        self.log = log if dist.is_main else (lambda *a, **k: None)
        self._lock = StageLock(self.dir)
        # upstream stage directories this stage reads: locked shared from begin to the end, re-checked at finish
        self._reads = [ReadLock(d) for d in reads]
        # run before an existing output is deleted (--force, or an attempt with other settings): loads the new
        # models, so that a bad one fails with the old output still there
        self.precheck = precheck
        self.derived = list(derived)   # shards that do not count as finished work (see _has_finished_work)
        self.growth = growth
        self.explain = explain or {}   # identity key -> what changed in it, in words (mine: the files by name)
        self.extended: list[dict[str, Any]] = []   # the runs this one continues: [{"fingerprint", "steps"}]
        self.elsewhere = elsewhere     # the refusals' other way out: "another --out folder" where the stage has --out
        # where the inputs were found (absolute paths), for the record and for later stages: not identity
        self.locations = {k: str(Path(v).resolve()) if Path(v).exists() else v
                          for k, v in (locations or {}).items() if v}
        self._started, self._base = _dt.datetime.now(), None
        self.location_stats = self._location_stats()

    # -- start
    def begin(self) -> bool:
        """Lock, check the existing output, write the manifest. False if complete and up to date."""
        error: BaseException | None = None
        if self.dist.is_main:
            try:
                self._lock.acquire()
                try:
                    for r in self._reads:
                        r.acquire()
                    self._prepare()
                except BaseException:
                    self._release()
                    raise
            except BaseException as e:  # other ranks must hear of it, not wait at a barrier
                error = e
        if not self.dist.all_true(error is None):  # also the barrier
            if error is not None:
                raise error
            raise PipelineError(f"{self.dir}: the main process could not start this stage (see its error)")
        # Every rank learns the outcome from the files rank 0 left: _SUCCESS stays only when up to date.
        up_to_date = (self.dir / SUCCESS).exists()
        if up_to_date and self.dist.is_main:
            self._release()
        return not up_to_date

    def _release(self) -> None:
        for r in self._reads:
            r.release()
        self._lock.release()

    def _prepare(self) -> None:
        self._remove_orphans()
        old, found = self._found()
        action = decide(found, self.force, self.replace)
        name = f"[{self.dir.name}]"
        if action == "refuse-damaged":
            raise PipelineError(f"{old}; rerun the stage with --force to start it over")
        if action == "refuse-foreign":
            leftovers = sorted(p.name for p in self.dir.iterdir() if p.name not in self.keep)
            raise PipelineError(f"{self.dir} holds files but no {MANIFEST} ({', '.join(leftovers[:3])}); it was not "
                                f"written by this tool; use --force to replace it, or {self.elsewhere}")
        if action == "refuse-settings":
            raise PipelineError(f"{self.dir} was made with different settings ({self._changes(old)}); use --force "
                                f"to replace it, or {self.elsewhere}")
        if action == "up-to-date":
            self.log(f"{name} up to date (fingerprint {self.fingerprint[:12]}); nothing to do")
            return
        if action == "redo-shards":
            self.log(f"{name} {len(self._bad)} shard(s) missing or failing their checksum; redoing them")
            (self.dir / SUCCESS).unlink()
        elif action == "resume":
            self.log(f"{name} resuming an incomplete run (fingerprint {self.fingerprint[:12]})")
        elif action == "extend":
            self._extend(old)
        else:
            if action == "start-over" and not self.force:
                said = self._changes(old) if isinstance(old, dict) else "its manifest was damaged"
                self.log(f"{name} replacing output made with other settings ({said})")
            elif action == "start-over" and self.dir.exists() and any(self.dir.iterdir()):
                self.log(f"{name} --force: starting over")
            elif action == "start" and old is not None:
                self.log(f"{name} replacing an attempt with other settings that finished no shard")
            elif action == "remake":
                self.log(f"{name} its inputs changed since it was made ({self._changes(old)}); making it again")
            self._wipe()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_manifest(status="running", shards=None)

    def _found(self) -> tuple[Any, Found]:
        """The old manifest (or the error reading it) and what the policy needs to know of the directory."""
        try:
            old = read_manifest(self.dir)
        except PipelineError as e:
            return str(e), Found(manifest="damaged")
        if old is None:
            leftovers = self.dir.exists() and any(p.name not in self.keep for p in self.dir.iterdir())
            return None, Found(leftovers=leftovers)
        identity = old.get("identity") if isinstance(old.get("identity"), dict) else {}
        old_view, new_view = comparable(identity, self.identity)
        same = old.get("fingerprint") == self.fingerprint
        if not same and fingerprint(old_view) == fingerprint(new_view):
            same, self.fingerprint = True, old["fingerprint"]   # keep the name downstream stages know it by
        complete = (self.dir / SUCCESS).exists()
        # each shard's checksum read once: redo-shards reports these
        self._bad = [rel for rel in old.get("expected_shards") or [] if not _record_ok(self.dir, rel)] if complete \
            else []
        return old, Found(manifest="ok", same=same, same_config=old_view.get("config") == self.identity.get("config"),
                          complete=complete, bad_shards=bool(self._bad),
                          finished_work=(work := not same and self._has_finished_work()),
                          extends=work and not self.force and self._continues(old))

    def _location_stats(self) -> dict[str, dict[str, list[int]]]:
        """Size and mtime of each model folder's hashed files (identity KEY: {"files": ...} found at location
        KEY), so that `status` can tell a changed model by hashing only the files whose stats differ."""
        out = {}
        for key, folder in self.locations.items():
            files = (self.identity.get(key) or {}).get("files") if isinstance(self.identity.get(key), dict) else None
            if files and Path(folder).is_dir():
                stats = {rel: os.stat(Path(folder) / rel) for rel in files if (Path(folder) / rel).is_file()}
                out[key] = {rel: [st.st_size, st.st_mtime_ns] for rel, st in stats.items()}
        return out

    def _changes(self, old: dict[str, Any]) -> str:
        """What differs between the old identity and this one, in words, at most four items."""
        changes = diff(comparable(old.get("identity", {}), self.identity)[0], self.identity) or ["(fingerprint only)"]
        for key, words in self.explain.items():
            if any(c.startswith(f"{key}:") for c in changes) and (said := words()):
                changes = [f"{key}: {said}"] + [c for c in changes if not c.startswith(f"{key}:")]
        return "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")

    def _continues(self, old: dict[str, Any]) -> bool:
        """True when the new settings only lengthen the old run (see Growth); an error when they shorten it."""
        g = self.growth
        if g is None or not isinstance(old.get("identity"), dict):
            return False
        strip = lambda identity: {**identity, "config": {k: v for k, v in identity.get("config", {}).items()
                                                         if k not in g.keys}}
        if strip(old["identity"]) != strip(self.identity):
            return False
        finished = (self.dir / SUCCESS).exists() and old.get("status") == "complete"
        latest = read_json(self.dir / g.checkpoints)
        trained = int(old.get("steps", 0)) if finished else int((latest or {}).get("step", 0))
        if g.steps < trained:
            flags = " / ".join("--" + k.replace("_", "-") for k in g.keys)
            raise PipelineError(f"{self.dir} has trained {trained} steps and {flags} now ask for {g.steps}: a run "
                                f"can be extended, not shortened; use --force to train again from the start, or "
                                f"{self.elsewhere}")
        self._trained = trained
        return True

    def _extend(self, old: dict[str, Any]) -> None:
        """Set the run to continue from its last checkpoint (see Growth)."""
        g, trained = self.growth, self._trained
        self.log(f"[{self.dir.name}] extending: {trained} steps trained, continuing to {g.steps} from its last "
                 "checkpoint (the learning-rate schedule is recomputed for the new length)")
        (self.dir / SUCCESS).unlink(missing_ok=True)
        for name in g.outputs:
            shutil.rmtree(self.dir / name, ignore_errors=True)
        self.extended = list(old.get("extended", [])) + [{"fingerprint": old.get("fingerprint"), "steps": trained}]

    def _remove_orphans(self) -> None:
        """Temporary files and folders of writers that were killed (this process holds the lock, so no writer
        is at work): `.NAME.tmp-PID` and `.NAME.tmp`."""
        if not self.dir.exists():
            return
        for p in sorted(self.dir.rglob(".*.tmp*"), reverse=True):
            if ".tmp" in p.name and p.exists():
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _has_finished_work(self) -> bool:
        """Anything beyond a manifest, the lock, kept folders and the `derived` shards (made from the inputs
        alone, in seconds): other shards, checkpoints, logs."""
        cheap = {_record_path(self.dir, rel).name for rel in self.derived}
        records = self.dir / RECORDS
        if records.is_dir() and any(p.name not in cheap for p in records.iterdir()):
            return True
        top = {rel.split("/")[0] for rel in self.derived} | {MANIFEST, RECORDS} | self.keep
        return any(p.name not in top for p in self.dir.iterdir())

    def _wipe(self) -> None:
        if not self.dir.exists():
            return
        if self.precheck is not None:   # the new inputs must load before the old output goes
            self.precheck()
            self.precheck = None
        for p in self.dir.iterdir():
            if p.name in self.keep:
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _write_manifest(self, status: str, shards: dict[str, Any] | None, expected: list[str] | None = None,
                        extra: dict[str, Any] | None = None) -> None:
        old = read_json(self.dir / MANIFEST) or {}
        if self._base is None:   # the first write of this attempt: the attempts before it
            kept = old.get("fingerprint") == self.fingerprint or self.extended
            self._base = float(old.get("seconds", 0.0)) if kept else 0.0
        extended = self.extended or old.get("extended")   # this writer's continuation, else the one recorded
        manifest = {
            "stage": self.identity.get("stage"),
            "status": status,
            "fingerprint": self.fingerprint,
            "identity": self.identity,
            "config": self.config,
            "created": old.get("created") if old.get("fingerprint") == self.fingerprint else None,
            "updated": _dt.datetime.now().isoformat(timespec="seconds"),
            "expected_shards": expected if expected is not None else old.get("expected_shards", []),
            "shards": shards if shards is not None else old.get("shards", {}),
            **({"extended": extended} if extended else {}),
            "locations": self.locations or old.get("locations", {}),
            "location_stats": self.location_stats or old.get("location_stats", {}),
            "versions": library_versions(),
            # wall time of the attempts at this output (a killed one's up to its last manifest write)
            "seconds": round(self._base + (_dt.datetime.now() - self._started).total_seconds(), 1),
            **(extra or {}),
        }
        manifest["created"] = manifest["created"] or manifest["updated"]
        atomic_write_json(self.dir / MANIFEST, manifest)

    # -- shards
    def is_done(self, rel: str) -> bool:
        return _record_ok(self.dir, rel)

    def _record(self, rel: str, rows: int) -> None:
        path = self.dir / rel
        atomic_write_json(
            _record_path(self.dir, rel), {"rows": rows, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
        faults.count("shard")

    def record_file(self, rel: str, rows: int = 0) -> None:
        """Record a file that was written by other means (e.g. save_pretrained), once it is complete."""
        self._record(rel, rows)

    def write_table(self, rel: str, table: pa.Table) -> None:
        atomic_write_table(self.dir / rel, table)
        self._record(rel, table.num_rows)

    def write_npy(self, rel: str, array: np.ndarray) -> None:
        atomic_write_npy(self.dir / rel, array)
        self._record(rel, int(array.shape[0]))

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
                shards = {}
                for rel in expected:
                    rec = read_json(_record_path(self.dir, rel))
                    if rec is None or not (self.dir / rel).exists():
                        raise PipelineError(f"{self.dir / rel}: shard missing at the end of the stage; rerun to finish it")
                    shards[rel] = rec
                for r in self._reads:   # the inputs are still the ones this output was made from
                    r.check()
                self._write_manifest(status="complete", shards=shards, expected=expected, extra=extra)
                (self.dir / SUCCESS).write_text(self.fingerprint + "\n")
                manifest = read_json(self.dir / MANIFEST) or {}
            finally:
                self._release()
        self.dist.barrier()
        return manifest

    def abort(self) -> None:
        if self.dist.is_main:
            self._release()

    def __enter__(self) -> "StageWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        """An error inside `with writer:` releases the locks (a retry in the same process can start)."""
        if exc_type is not None:
            self.abort()
