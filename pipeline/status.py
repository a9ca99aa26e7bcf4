"""`cprd-pipeline status`: what each stage directory of a run holds."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .artifacts import read_json, read_jsonl, stage_state


@dataclass(frozen=True)
class StageDir:
    """What status needs of a stage: its name, directory and the names of its upstream stages."""
    name: str
    directory: str
    upstream: tuple[str, ...] = ()


def describe(run: Path, stages: list[StageDir]) -> list[str]:
    """One line per stage. A stage is stale when its input changed since it was made, or when its input is
    itself stale (so is everything after it)."""
    lines, fingerprints, stale = [], {}, set()
    width = max(len(s.name) for s in stages)
    for s in stages:
        st = stage_state(run / s.directory)
        m = st["manifest"]
        if m:
            fingerprints[s.name] = m["fingerprint"]
        if st["state"] == "absent":
            text = "absent"
        elif st["state"] == "partial":
            text = _progress(run / s.directory) or f"partial {st['done']}/{st['total']} shards"
        else:
            text = f"complete ({st['total']} shards, fingerprint {m['fingerprint'][:12]})"
            recorded = (m.get("identity") or {}).get("upstream")
            for up in s.upstream:
                if up in stale:
                    text = f"stale: {up} is stale (rerun it, then this)"
                elif recorded and up in fingerprints and recorded != fingerprints[up]:
                    text = f"stale: {up} changed since it was made (run it again, or with --force)"
            if text.startswith("stale"):
                stale.add(s.name)
        lines.append(f"{s.name:<{width}} {text}")
    return lines


def _progress(directory: Path) -> str | None:
    """A training stage's progress: the last checkpoint's step and the last logged step."""
    latest = read_json(directory / "checkpoints" / "latest.json")
    logged = read_jsonl(directory / "metrics.jsonl")
    if latest is None and not logged:
        return None
    saved = f"checkpoint at step {latest['step']}" if latest else "no checkpoint yet"
    return f"training: {saved}, logged to step {logged[-1]['step'] if logged else 0} (rerun to resume)"
