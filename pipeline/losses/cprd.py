"""Contrastive Partial Ranking Distillation (Chen et al., CVPR 2024)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import option
from ._common import NEG, check_pair, mean_over_rows
from .registry import DistillInputs, register


def cprd_loss(student_logits: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None,
              num_valid: int | None = None, min_teacher_score: float | None = None) -> torch.Tensor:
    r"""Teach the student the teacher's order among the top hard negatives only.

    Per row, order the n real candidates by teacher score, descending (stable); s(j) is the student logit of
    the j-th. The valid hard negatives are the first m of that order: at most `num_valid`, only those with
    teacher score >= `min_teacher_score` (when given), and never more than n - 1. Then

        row_loss = (1/m) * sum_{j=1..m} [ logsumexp_{l=j..n} s(l) - s(j) ]

    each valid negative contrasted against everything the teacher ranks below it; the order among the rest
    (easy negatives) is not taught. Rows with m = 0 are skipped; the result is the mean over the other rows,
    or a zero that still carries a graph when there are none.

    | input             | shape  | meaning                                                            |
    | ----------------- | ------ | ------------------------------------------------------------------ |
    | student_logits    | [B, N] | student logit_scale * cos(query, candidate)                        |
    | teacher_scores    | [B, N] | teacher match log-odds (any monotone score works: only order is used) |
    | mask              | [B, N] | optional bool, True = real candidate, False = padding              |
    | num_valid         | int    | optional cap on valid hard negatives per row                       |
    | min_teacher_score | float  | optional: a negative is valid only if its teacher score >= this    |
    """
    mask = check_pair("cprd_loss", student_logits, teacher_scores, mask)
    s = student_logits.float()
    t = teacher_scores.float().masked_fill(~mask, float("-inf"))
    order = torch.sort(t, dim=1, descending=True, stable=True).indices          # padding sorts last
    s = torch.gather(s, 1, order)
    real = torch.gather(mask, 1, order)
    t = torch.gather(t, 1, order)
    s = torch.where(real, s, torch.full_like(s, NEG))
    tail_lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)                     # [B, N]: logsumexp_{l>=j}
    n = real.sum(1, keepdim=True)
    pos = torch.arange(s.shape[1], device=s.device).unsqueeze(0)
    valid = real & (pos < n - 1)
    if num_valid is not None:
        valid &= pos < num_valid
    if min_teacher_score is not None:
        valid &= t >= min_teacher_score
    terms = torch.where(valid, tail_lse - s, torch.zeros_like(s))
    m = valid.sum(1)
    row_loss = terms.sum(1) / m.clamp(min=1)
    return mean_over_rows(row_loss, m > 0, student_logits)


@dataclass
class CPRDOptions:
    num_valid: Optional[int] = option(4, "at most this many of the teacher's top candidates have their order taught")
    min_teacher_score: Optional[float] = option(None, "a candidate is valid only if its teacher score >= this")
    include_positive: bool = option(False, "the positive joins the list with its teacher score (LoopITR's list)")
    student_temperature: float = option(1.0, "the ranking term's student logits are divided by this (apart from "
                                             "the contrastive term's learned scale)")


@register("cprd", CPRDOptions, "the teacher's order among its top hard negatives only")
def cprd(x: DistillInputs, o: CPRDOptions) -> torch.Tensor:
    if o.student_temperature <= 0:
        raise ValueError(f"cprd: student_temperature must be > 0, got {o.student_temperature}")
    if o.include_positive:
        x = x.with_positive()
    return cprd_loss(x.student / o.student_temperature, x.teacher, x.mask, o.num_valid, o.min_teacher_score)
