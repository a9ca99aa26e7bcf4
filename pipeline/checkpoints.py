"""A training stage's resumable checkpoints: written so that a kill at any moment leaves the last complete one
readable, and checked before a resume trusts it.

    OUT/checkpoints/step-N/      Accelerate save_state (model, optimizer, RNG) + trainer_state.json (the
                                 trainer's state, the scheduler's, and the SHA-256 of every file of the folder)
    OUT/checkpoints/latest.json  {"dir": "step-N", "step": N}: the last complete checkpoint, written after it;
                                 older checkpoints are removed once it names the new one
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .artifacts import atomic_write_json, read_json, sha256_file
from .errors import PipelineError

LATEST = "checkpoints/latest.json"


def latest(out: Path) -> Optional[Path]:
    """The last complete checkpoint of OUT, if any."""
    named = read_json(out / LATEST)
    return None if named is None else out / "checkpoints" / named["dir"]


def save(acc: Any, out: Path, step: int, state: dict[str, Any]) -> None:
    """save_state, then trainer_state.json (`state` + the files' SHA-256), then latest.json: a checkpoint counts
    once latest.json names it. Collective: every process calls it."""
    ckpt = out / "checkpoints" / f"step-{step}"
    try:
        acc.save_state(str(ckpt))
    except RuntimeError as e:   # torch's writer reports a full disk as "[enforce fail at inline_container.cc]"
        free = shutil.disk_usage(out).free
        raise PipelineError(f"{ckpt}: the checkpoint could not be written ({free // 2**20} MiB free on that disk: "
                            f"{str(e).splitlines()[0][:120]}); free some space and rerun to resume from the last "
                            "complete checkpoint") from None
    acc.wait_for_everyone()   # every rank's files are written before they are hashed
    if acc.is_main_process:
        files = {f.name: sha256_file(f) for f in sorted(ckpt.iterdir()) if f.is_file()}
        atomic_write_json(ckpt / "trainer_state.json", {**state, "files": files})
        previous = read_json(out / LATEST)
        atomic_write_json(out / LATEST, {"dir": ckpt.name, "step": step})
        if previous and previous["dir"] != ckpt.name:  # keep only the newest complete checkpoint
            shutil.rmtree(out / "checkpoints" / previous["dir"], ignore_errors=True)
    acc.wait_for_everyone()


def load(acc: Any, optimizer: Any, ckpt: Path) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from `ckpt` after checking its files; returns the trainer state
    saved with it (without the file digests)."""
    state = verified(ckpt)
    acc.load_state(str(ckpt))
    finite(optimizer, ckpt)
    state.pop("files", None)
    return state


def verified(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, after checking every file against the SHA-256 recorded when it was written."""
    state = read_json(ckpt / "trainer_state.json")
    if state is None:
        raise PipelineError(f"{ckpt}: trainer_state.json is missing (the checkpoint is damaged); remove "
                            f"{ckpt.parent} to train from the start")
    for name, digest in (state.get("files") or {}).items():
        path = ckpt / name
        if not path.exists() or sha256_file(path) != digest:
            raise PipelineError(f"{path}: {'missing' if not path.exists() else 'damaged'} (its SHA-256 differs from "
                                f"the one recorded when the checkpoint was written); remove {ckpt.parent} to train "
                                "from the start")
    return state


def finite(optimizer: Any, ckpt: Path) -> None:
    """Refuse to resume from weights or optimizer moments that are not finite."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            tensors = [p.data] + [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise PipelineError(f"{ckpt}: the checkpoint holds non-finite weights or optimizer state; remove "
                                    f"{ckpt.parent} to train from the start")
