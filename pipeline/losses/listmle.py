"""ListMLE: the full-ranking special case of CPRD."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from .cprd import cprd_loss
from .registry import DistillInputs, register


def listmle_loss(student_logits: torch.Tensor, teacher_scores: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Plackett-Luce likelihood of the teacher's full order under the student logits:

        row_loss = (1/(n-1)) * sum_{j=1..n-1} [ logsumexp_{l=j..n} s(l) - s(j) ]

    with s(j) the student logit of the j-th candidate in teacher order (descending, stable). This is
    `cprd_loss` with every position valid. Rows with fewer than two real candidates are skipped.

    | input          | shape  | meaning                                  |
    | -------------- | ------ | ---------------------------------------- |
    | student_logits | [B, N] | student logit_scale * cos                |
    | teacher_scores | [B, N] | teacher scores (only their order is used) |
    | mask           | [B, N] | optional bool, True = real candidate     |
    """
    return cprd_loss(student_logits, teacher_scores, mask)


@dataclass
class ListMLEOptions:
    include_positive: bool = option(False, "the positive joins the list with its teacher score (LoopITR's list)")


@register("listmle", ListMLEOptions, "the teacher's full order (CPRD with every position valid)")
def listmle(x: DistillInputs, o: ListMLEOptions) -> torch.Tensor:
    if o.include_positive:
        x = x.with_positive()
    return listmle_loss(x.student, x.teacher, x.mask)
