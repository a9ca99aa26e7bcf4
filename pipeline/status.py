"""`cprd-pipeline status`: what each stage directory of a run holds."""
from __future__ import annotations

from pathlib import Path

from .artifacts import stage_state

STAGES = ("mine", "teacher", "distill")
UPSTREAM = {"teacher": "mine", "distill": "teacher"}


def describe(run: Path) -> list[str]:
    lines, fingerprints = [], {}
    for stage in STAGES:
        st = stage_state(run / stage)
        m = st["manifest"]
        if m:
            fingerprints[stage] = m["fingerprint"]
        if st["state"] == "absent":
            text = "absent"
        elif st["state"] == "partial":
            text = f"partial {st['done']}/{st['total']} shards"
        else:
            text = f"complete ({st['total']} shards, fingerprint {m['fingerprint'][:12]})"
            up = UPSTREAM.get(stage)
            recorded = (m.get("identity") or {}).get("upstream")
            if up and recorded and recorded != fingerprints.get(up):
                text = f"stale: {up} changed since it was made (run it again, or with --force)"
        lines.append(f"{stage:<8} {text}")
    ev = run / "eval" / "metrics.json"
    lines.append(f"{'eval':<8} {'complete' if ev.exists() else 'absent'}")
    return lines
