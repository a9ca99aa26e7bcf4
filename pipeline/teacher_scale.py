"""The scale the distillation losses see the teacher's scores on (`distill --teacher-scale`).

The teacher cache stores raw scores (`docs/design.md`, shard schemas): for `score-teacher --score itm`, BLIP's
match log-odds `logit[match] - logit[no match]` (ViLT's one logit, read as log-odds). `logodds` hands them to the
loss as they are; `prob` hands it the match probability sigmoid(log-odds), for the negatives and the positive
alike, before any loss sees them. The order of the scores is the same on both scales, so a loss that reads only
the order (cprd, listmle, ranknet) changes only through its options measured in score units (cprd's minimum
teacher score and tie margin); kl and margin-mse see other numbers.

A `--score itm+itc` cache holds log-odds + itc_weight x cosine, whose sigmoid is no probability, and the cache
does not keep the log-odds apart: `prob` is refused for it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .errors import PipelineError
from .losses.registry import DistillInputs

SCALES = ("logodds", "prob")


def check(scale: str, teacher_manifest: dict, where: Path) -> None:
    """Refuse `prob` over a cache whose scores are not match log-odds (one line naming the option and the cache)."""
    score = (teacher_manifest.get("config") or {}).get("score", "itm")
    if scale == "prob" and score != "itm":
        raise PipelineError(f"--teacher-scale prob: {where} holds --score {score} scores (ITM log-odds plus "
                            "itc_weight x ITC cosine), whose sigmoid is no match probability; use --teacher-scale "
                            "logodds, or a cache made with score-teacher --score itm")


def rescale(x: DistillInputs, scale: str) -> DistillInputs:
    """The inputs with the teacher's scores (negatives [B, N] and positives [B]) on `scale`."""
    if scale == "logodds":
        return x
    if scale != "prob":
        raise ValueError(f"teacher scale must be one of {', '.join(SCALES)}, got {scale!r}")
    # padded entries (mask False) become sigmoid(0) = 0.5: never read, as before
    return dataclasses.replace(x, teacher=torch.sigmoid(x.teacher.float()),
                               teacher_positive=torch.sigmoid(x.teacher_positive.float()))
