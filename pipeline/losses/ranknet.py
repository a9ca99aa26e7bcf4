"""RankNet (Burges et al., 2005): pairwise logistic loss on the teacher's preferences."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_pair, mean_over_rows
from .registry import DistillInputs, NoOptions, register


def ranknet_loss(student_logits: torch.Tensor, teacher_scores: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per row, the mean over pairs of real candidates (i, j) with t_i > t_j of

        log(1 + exp(-(s_i - s_j)))

    then the mean over rows with at least one such pair (ties teach nothing).

    | input          | shape  | meaning                              |
    | -------------- | ------ | ------------------------------------ |
    | student_logits | [B, N] | student logit_scale * cos            |
    | teacher_scores | [B, N] | teacher scores                       |
    | mask           | [B, N] | optional bool, True = real candidate |
    """
    mask = check_pair("ranknet_loss", student_logits, teacher_scores, mask)
    s, t = student_logits.float(), teacher_scores.float()
    prefer = (t[:, :, None] > t[:, None, :]) & mask[:, :, None] & mask[:, None, :]   # [B, N, N]: i over j
    pair_loss = F.softplus(-(s[:, :, None] - s[:, None, :]))
    count = prefer.sum((1, 2))
    row = torch.where(prefer, pair_loss, torch.zeros_like(pair_loss)).sum((1, 2)) / count.clamp(min=1)
    return mean_over_rows(row, count > 0, student_logits)


@register("ranknet", NoOptions, "the teacher's pairwise preferences")
def ranknet(x: DistillInputs, o: NoOptions) -> torch.Tensor:
    return ranknet_loss(x.student, x.teacher, x.mask)
