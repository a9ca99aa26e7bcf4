"""Margin-MSE (Hofstaetter et al., 2020): match the teacher's positive-negative margins."""
from __future__ import annotations

import torch

from ._common import check_pair, mean_over_rows
from .registry import DistillInputs, NoOptions, register


def margin_mse_loss(student_pos: torch.Tensor, student_neg: torch.Tensor, teacher_pos: torch.Tensor,
                    teacher_neg: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per row, the mean over its real negatives of

        ((s_pos - s_neg_j) - (t_pos - t_neg_j))^2

    then the mean over rows with at least one real negative.

    | input       | shape  | meaning                                    |
    | ----------- | ------ | ------------------------------------------ |
    | student_pos | [B]    | student logit of the query's positive      |
    | student_neg | [B, N] | student logits of its negatives            |
    | teacher_pos | [B]    | teacher score of the positive              |
    | teacher_neg | [B, N] | teacher scores of the negatives            |
    | mask        | [B, N] | optional bool, True = real negative        |
    """
    mask = check_pair("margin_mse_loss", student_neg, teacher_neg, mask)
    b = student_neg.shape[0]
    if student_pos.shape != (b,) or teacher_pos.shape != (b,):
        raise ValueError(f"margin_mse_loss: student_pos {tuple(student_pos.shape)} and teacher_pos "
                         f"{tuple(teacher_pos.shape)} must be [{b}], one positive per row of student_neg")
    diff = (student_pos.float()[:, None] - student_neg.float()) - (teacher_pos.float()[:, None] - teacher_neg.float())
    sq = torch.where(mask, diff.square(), torch.zeros_like(diff))
    n = mask.sum(1)
    return mean_over_rows(sq.sum(1) / n.clamp(min=1), n > 0, student_neg)


@register("margin-mse", NoOptions, "the teacher's positive-negative margins")
def margin_mse(x: DistillInputs, o: NoOptions) -> torch.Tensor:
    return margin_mse_loss(x.student_positive, x.student, x.teacher_positive, x.teacher, x.mask)
