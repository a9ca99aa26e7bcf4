"""`cprd-pipeline status`: what each stage directory of a run holds."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .artifacts import stage_state


@dataclass(frozen=True)
class StageDir:
    """What status needs of a stage: its name, directory and the names of its upstream stages."""
    name: str
    directory: str
    upstream: tuple[str, ...] = ()


def describe(run: Path, stages: list[StageDir]) -> list[str]:
    lines, fingerprints = [], {}
    width = max(len(s.name) for s in stages)
    for s in stages:
        st = stage_state(run / s.directory)
        m = st["manifest"]
        if m:
            fingerprints[s.name] = m["fingerprint"]
        if st["state"] == "absent":
            text = "absent"
        elif st["state"] == "partial":
            text = f"partial {st['done']}/{st['total']} shards"
        else:
            text = f"complete ({st['total']} shards, fingerprint {m['fingerprint'][:12]})"
            recorded = (m.get("identity") or {}).get("upstream")
            for up in s.upstream:
                if recorded and up in fingerprints and recorded != fingerprints[up]:
                    text = f"stale: {up} changed since it was made (run it again, or with --force)"
        lines.append(f"{s.name:<{width}} {text}")
    return lines
