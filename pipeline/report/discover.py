"""The stage outputs under a report's root, found by their manifests: a folder is a stage's output when it holds
a `manifest.json` naming a stage, whatever the folder is called."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import MANIFEST, SUCCESS, read_json


@dataclass
class Found:
    """A stage directory under the report's root, with its manifest."""
    path: Path
    manifest: dict
    complete: bool

    def label(self, root: Path) -> str:
        rel = os.path.relpath(self.path, root)
        return rel if rel != "." else self.path.name


def _natural(name: str) -> list:
    """Sort key that orders round-2 before round-10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def discover(root: Path, max_depth: int = 4) -> dict[str, list[Found]]:
    """Stage directories under root, by manifest stage (mine, teacher, distill, evaluate), in path order.

    A folder whose manifest names a stage is that stage's output, and its subfolders (checkpoints, corpus,
    embeddings, ...) are its own, so the walk does not enter it; every other folder is walked, to max_depth.
    Only hidden folders (temporary files of a writer) are passed over; no folder is skipped for its name. A
    link to a folder under root (a round that re-uses another run's output, as the demo's loops do) is not
    followed: the output is reported once, where it lives."""
    found: dict[str, list[Found]] = {}
    inside = Path(root).resolve()

    def elsewhere_under_root(e: os.DirEntry) -> bool:
        return e.is_symlink() and Path(e.path).resolve().is_relative_to(inside)

    def walk(d: Path, depth: int) -> None:
        m = read_json(d / MANIFEST) if (d / MANIFEST).is_file() else None
        if m is not None and "stage" in m:
            found.setdefault(m["stage"], []).append(Found(d, m, (d / SUCCESS).exists()))
            return
        if depth == max_depth:
            return
        with os.scandir(d) as entries:   # DirEntry.is_dir needs no stat per file (large image folders)
            subs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")
                    and not elsewhere_under_root(e)]
        for name in sorted(subs, key=_natural):
            walk(d / name, depth + 1)

    walk(Path(root), 0)
    return found
