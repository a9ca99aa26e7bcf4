"""`cprd-pipeline status`: what each stage directory of a run holds, and whether it is still up to date."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .artifacts import MANIFEST, read_json, read_jsonl, sha256_file, stage_state
from .errors import PipelineError


@dataclass(frozen=True)
class StageDir:
    """What status needs of a stage: its name, directory and the names of its upstream stages."""
    name: str
    directory: str
    upstream: tuple[str, ...] = ()


def describe(run: Path, stages: list[StageDir]) -> list[str]:
    """One line per stage, then one per other stage output found under the run (`--out` folders, a loop's
    eval-start). A stage is stale when its input changed since it was made (an upstream stage made again, an
    image or a model file changed), or when its input is itself stale (so is everything after it). Each line
    stands on its own: a damaged manifest is reported on its line and hides nothing else."""
    named = {s.directory for s in stages}
    others = [StageDir(str(d.relative_to(run)), str(d.relative_to(run))) for d in _outputs(run)
              if str(d.relative_to(run)) not in named]
    rows = [(s, _state(run / s.directory)) for s in stages + others]
    fingerprints = {s.name: st["manifest"]["fingerprint"] for s, st in rows if st.get("manifest")}
    known = set(fingerprints.values())
    lines, stale = [], set()
    width = max(len(s.name) for s, _ in rows)
    for s, st in rows:
        text = _text(run / s.directory, st)
        if st["state"] == "complete":
            m = st["manifest"]
            recorded = (m.get("identity") or {}).get("upstream")
            why = None
            for up in s.upstream:
                if up in stale:
                    why = f"{up} is stale (run it again, then this)"
                elif recorded and up in fingerprints and recorded != fingerprints[up]:
                    why = f"{up} changed since it was made (run {s.name} again)"
            if why is None and not s.upstream and recorded and recorded not in known:
                why = "its input changed or is gone since it was made (run its stage again)"
            why = why or _inputs_changed(run / s.directory, m)
            if why:
                text, _ = f"stale: {why}", stale.add(s.name)
        lines.append(f"{s.name:<{width}} {text}")
    return lines


def _state(directory: Path) -> dict:
    try:
        return stage_state(directory)
    except PipelineError as e:
        return {"state": "damaged", "error": str(e)}


def _text(directory: Path, st: dict) -> str:
    if st["state"] == "damaged":
        return f"damaged: {st['error']}"
    if st["state"] == "absent":
        return "absent"
    if st["state"] == "partial":
        return _progress(directory) or f"partial {st['done']}/{st['total']} shards"
    m = st["manifest"]
    return f"complete ({st['total']} shards, fingerprint {m['fingerprint'][:12]})"


def _outputs(run: Path, depth: int = 2) -> list[Path]:
    """Stage output folders under the run (a manifest of this tool), not below another one's (its shards and
    checkpoints), down to `depth` levels; a loop's rounds are shown on their own."""
    found: list[Path] = []

    def walk(d: Path, level: int) -> None:
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if level == 0 and sub.name.startswith("round-") and sub.name[6:].isdigit():
                continue
            if (sub / MANIFEST).exists():
                found.append(sub)
            elif level + 1 < depth:
                walk(sub, level + 1)

    walk(run, 0)
    return found


def _inputs_changed(directory: Path, manifest: dict) -> str | None:
    """Why a complete output no longer matches the files it was made from: mine's images (stat'ed, hashed only
    where size or mtime differ) or a model folder's files (the ones whose size or mtime differ from the
    stats recorded beside the hashes)."""
    if manifest.get("stage") == "mine" and (directory / "corpus" / "images.parquet").exists():
        from .corpus import changed_images, load_tables

        try:
            changed, missing = changed_images(load_tables(directory / "corpus"))
        except PipelineError:
            return None   # the images' folder moved: later stages take --image-root; nothing is known to differ
        if changed or missing:
            return (f"{len(changed)} image file(s) changed{f', {len(missing)} missing' if missing else ''} since it "
                    f"was made (e.g. {(changed + missing)[0]}; run mine again)")
    identity = manifest.get("identity") or {}
    for key, stats in (manifest.get("location_stats") or {}).items():
        folder, files = (manifest.get("locations") or {}).get(key), (identity.get(key) or {}).get("files")
        if not folder or not files or not Path(folder).is_dir():
            continue
        for rel, digest in files.items():
            path = Path(folder) / rel
            if not path.is_file():
                return f"{key} file {path} is gone (run the stage again, with the model's new folder)"
            st = os.stat(path)
            if [st.st_size, st.st_mtime_ns] != stats.get(rel) and sha256_file(path) != digest:
                return f"{key} file {path} changed since it was made (run the stage again)"
    return None


def _progress(directory: Path) -> str | None:
    """A training stage's progress: the last checkpoint's step and the last logged step."""
    try:
        latest = read_json(directory / "checkpoints" / "latest.json")
        logged = read_jsonl(directory / "metrics.jsonl")
    except PipelineError as e:
        return f"damaged: {e}"
    if latest is None and not logged:
        return None
    saved = f"checkpoint at step {latest['step']}" if latest else "no checkpoint yet"
    return f"training: {saved}, logged to step {logged[-1]['step'] if logged else 0} (rerun to resume)"
