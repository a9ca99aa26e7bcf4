"""The teacher-free control: the mined hard negatives as extra negatives of the contrastive loss."""
from __future__ import annotations

import torch

from ._common import NEG, mean_over_rows
from .registry import DistillInputs, NoOptions, register


def hard_negative_loss(student_positive: torch.Tensor, student_neg: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""InfoNCE of each query's positive against its own mined hard negatives, with no teacher:

        row_loss = logsumexp(s_pos, s_neg_1..s_neg_n) - s_pos

    over the row's real negatives; rows without one are skipped. Run beside a teacher loss over the same
    negatives, it separates what the mined negatives give from what the teacher's scores give.

    | input            | shape  | meaning                               |
    | ---------------- | ------ | ------------------------------------- |
    | student_positive | [B]    | student logit of the query's positive |
    | student_neg      | [B, N] | student logits of its hard negatives  |
    | mask             | [B, N] | optional bool, True = real negative   |
    """
    if student_neg.dim() != 2 or student_positive.shape != student_neg.shape[:1]:
        raise ValueError(f"hard_negative_loss: student_positive {tuple(student_positive.shape)} must be [B] and "
                         f"student_neg {tuple(student_neg.shape)} [B, N], one positive per row")
    if mask is None:
        mask = torch.ones_like(student_neg, dtype=torch.bool)
    elif mask.shape != student_neg.shape:
        raise ValueError(f"hard_negative_loss: mask shape {tuple(mask.shape)} must equal student_neg shape "
                         f"{tuple(student_neg.shape)} (True = real negative)")
    neg = torch.where(mask.bool(), student_neg.float(), torch.full_like(student_neg, NEG, dtype=torch.float32))
    logits = torch.cat([student_positive.float()[:, None], neg], 1)            # [B, 1 + N]
    row = torch.logsumexp(logits, 1) - logits[:, 0]
    return mean_over_rows(row, mask.bool().any(1), student_neg)


@register("hard-negatives", NoOptions, "teacher-free control: the mined negatives in the contrastive denominator",
          uses_teacher=False)
def hard_negatives(x: DistillInputs, o: NoOptions) -> torch.Tensor:
    return hard_negative_loss(x.student_positive, x.student, x.mask)
