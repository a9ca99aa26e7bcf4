"""What a stage does with what it finds in its directory, as `make` would (docs/design.md, "The policy"), and
how it says so: pure functions of the facts, tested as tables (tests/pipeline/test_artifacts.py).

`StageWriter` (pipeline/artifacts.py) reads the facts (`Found`), asks `decide`, and words its refusals and
log lines with `changes`, `refusal` and `announcement`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

LOCATION_KEYS = ("student", "teacher", "model", "rerank_teacher", "val_data")   # see `comparable`


@dataclass(frozen=True)
class Found:
    """What a stage directory holds, as far as the policy needs to know (StageWriter._found reads it)."""
    manifest: str = "absent"       # absent | damaged | ok
    same: bool = False             # made with this identity (or an equal one recorded by an earlier version)
    same_config: bool = False      # the stage's own settings are unchanged (only its inputs differ)
    complete: bool = False         # _SUCCESS present
    bad_shards: bool = False       # some recorded shard is missing or fails its checksum
    finished_work: bool = False    # anything that took more than seconds to make (see StageFolder.finished_work)
    leftovers: bool = False        # files, but no manifest
    extends: bool = False          # the new settings only lengthen a training run (pipeline/extension.py)


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


# ---------------------------------------------------------------- wording
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


def changes(old: dict[str, Any], new: dict[str, Any],
            explain: Mapping[str, Callable[[], str | None]] | None = None) -> str:
    """What differs between an old identity and a new one, in words, at most four items. `explain` says a key's
    change in its own words where a diff of hashes would not (mine: the image files, by name)."""
    said = diff(comparable(old, new)[0], new) or ["(fingerprint only)"]
    for key, words in (explain or {}).items():
        if any(c.startswith(f"{key}:") for c in said) and (text := words()):
            said = [f"{key}: {text}"] + [c for c in said if not c.startswith(f"{key}:")]
    return "; ".join(said[:4]) + (f"; and {len(said) - 4} more" if len(said) > 4 else "")


def refusal(action: str, where: Path, old: Any, said: Callable[[], str], leftovers: Callable[[], list[str]],
            elsewhere: str) -> str | None:
    """The one-line error of a refusal (None for the other actions). `old` is the error of a damaged manifest;
    `said` the changes in words; `leftovers` the files of a folder this tool did not write."""
    if action == "refuse-damaged":
        return f"{old}; rerun the stage with --force to start it over"
    if action == "refuse-foreign":
        return (f"{where} holds files but no manifest.json ({', '.join(leftovers()[:3])}); it was not written by "
                f"this tool; use --force to replace it, or {elsewhere}")
    if action == "refuse-settings":
        return f"{where} was made with different settings ({said()}); use --force to replace it, or {elsewhere}"
    return None


def announcement(action: str, name: str, fingerprint: str, *, force: bool, old: Any, said: Callable[[], str],
                 bad: int, had_files: bool) -> str | None:
    """The line a stage logs for what it does (None: nothing to say). `old` is the old manifest (a dict), the
    error of a damaged one (a str) or None; `bad` the shards failing their checksum; `had_files` whether the
    folder held anything. An extension says itself (pipeline/extension.py)."""
    if action == "up-to-date":
        return f"{name} up to date (fingerprint {fingerprint[:12]}); nothing to do"
    if action == "redo-shards":
        return f"{name} {bad} shard(s) missing or failing their checksum; redoing them"
    if action == "resume":
        return f"{name} resuming an incomplete run (fingerprint {fingerprint[:12]})"
    if action == "start-over" and not force:
        return (f"{name} replacing output made with other settings "
                f"({said() if isinstance(old, dict) else 'its manifest was damaged'})")
    if action == "start-over" and had_files:
        return f"{name} --force: starting over"
    if action == "start" and old is not None:
        return f"{name} replacing an attempt with other settings that finished no shard"
    if action == "remake":
        return f"{name} its inputs changed since it was made ({said()}); making it again"
    return None
