"""Extend, don't retrain (docs/design.md): how a training output continues when only its length grew.

A training stage (pipeline/loop.py, `Length.growth`) hands its `StageWriter` a `Growth`; the writer asks it,
for an output made with other settings, how many steps that run trained when the new settings only lengthen
it (`trained`), and, when the policy says "extend", sets the run to continue from its last checkpoint
(`extend`).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import PipelineError


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

    def _without_length(self, identity: dict[str, Any]) -> dict[str, Any]:
        return {**identity, "config": {k: v for k, v in identity.get("config", {}).items() if k not in self.keys}}

    def trained(self, directory: Path, old: dict[str, Any], identity: dict[str, Any], elsewhere: str) -> int | None:
        """The steps the run in `directory` (its manifest `old`) trained, when `identity` only lengthens it;
        None when it differs otherwise; a one-line error when it shortens it."""
        from .artifacts import SUCCESS, read_json   # the artifact contract imports this module

        if not isinstance(old.get("identity"), dict) or \
                self._without_length(old["identity"]) != self._without_length(identity):
            return None
        finished = (directory / SUCCESS).exists() and old.get("status") == "complete"
        latest = read_json(directory / self.checkpoints)
        trained = int(old.get("steps", 0)) if finished else int((latest or {}).get("step", 0))
        if self.steps < trained:
            flags = " / ".join("--" + k.replace("_", "-") for k in self.keys)
            raise PipelineError(f"{directory} has trained {trained} steps and {flags} now ask for {self.steps}: a "
                                f"run can be extended, not shortened; use --force to train again from the start, "
                                f"or {elsewhere}")
        return trained

    def extend(self, directory: Path, old: dict[str, Any], trained: int, log: Callable[[str], Any]) -> list[dict]:
        """Set the run to continue from its last checkpoint (the writer removes _SUCCESS): the outputs made at
        the end removed. Returns the runs it continues, for the manifest: [{"fingerprint", "steps"}, ...]."""
        log(f"[{directory.name}] extending: {trained} steps trained, continuing to {self.steps} from its last "
            "checkpoint (the learning-rate schedule is recomputed for the new length)")
        for name in self.outputs:
            shutil.rmtree(directory / name, ignore_errors=True)
        return list(old.get("extended", [])) + [{"fingerprint": old.get("fingerprint"), "steps": trained}]
