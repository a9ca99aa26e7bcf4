"""Fault injection: how the tests kill a stage at a chosen point, as a crash or `kill -9` would.

Set `CPRD_FAULT` to `POINT:N` and the process SIGKILLs itself there; unset (always, in production), every
call here is a dictionary lookup that returns.

| point   | where it fires                                                          |
| ------- | ----------------------------------------------------------------------- |
| `shard` | after this process recorded its N-th shard (any stage's StageWriter)    |
| `step`  | after distill's optimizer step N (its checkpoint, if one was due, saved) |
"""
from __future__ import annotations

import os
import signal

ENV = "CPRD_FAULT"
POINTS = ("shard", "step")
_counts: dict[str, int] = {}


def _target(point: str) -> int | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, n = spec.partition(":")
    if name not in POINTS or not n.isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected POINT:N with POINT one of {', '.join(POINTS)}")
    return int(n) if name == point else None


def count(point: str) -> None:
    """Count one occurrence of `point`; die at the N-th."""
    target = _target(point)
    if target is None:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= target:
        os.kill(os.getpid(), signal.SIGKILL)


def at(point: str, value: int) -> None:
    """Die when `point` reaches `value` (e.g. the optimizer step)."""
    if _target(point) == value:
        os.kill(os.getpid(), signal.SIGKILL)
