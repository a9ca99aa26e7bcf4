"""Vanilla logit distillation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ._common import NEG, check_pair, mean_over_rows
from .registry import DistillInputs, register


def kl_loss(student_logits: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None,
            teacher_temperature: float = 1.0) -> torch.Tensor:
    r"""KL(p_teacher || p_student) per row, over the row's real candidates:

        p = softmax(teacher_scores / T),  q = softmax(student_logits),  row_loss = sum_j p_j (log p_j - log q_j)

    Rows with fewer than two real candidates (nothing to learn) are skipped; the mean is over the others.

    | input               | shape  | meaning                               |
    | ------------------- | ------ | ------------------------------------- |
    | student_logits      | [B, N] | student logit_scale * cos             |
    | teacher_scores      | [B, N] | teacher log-odds                      |
    | mask                | [B, N] | optional bool, True = real candidate  |
    | teacher_temperature | float  | T > 0, divides the teacher scores     |
    """
    mask = check_pair("kl_loss", student_logits, teacher_scores, mask)
    if teacher_temperature <= 0:
        raise ValueError(f"kl_loss: teacher_temperature must be > 0, got {teacher_temperature}")
    s = torch.where(mask, student_logits.float(), torch.full_like(student_logits, NEG, dtype=torch.float32))
    t = torch.where(mask, teacher_scores.float() / teacher_temperature,
                    torch.full_like(student_logits, NEG, dtype=torch.float32))
    log_q, log_p = torch.log_softmax(s, dim=1), torch.log_softmax(t, dim=1)
    terms = torch.where(mask, log_p.exp() * (log_p - log_q), torch.zeros_like(s))
    return mean_over_rows(terms.sum(1), mask.sum(1) >= 2, student_logits)


@dataclass
class KLOptions:
    teacher_temperature: float = option(1.0, "teacher scores are divided by this", above=0)
    include_positive: bool = option(False, "the positive joins the list with its teacher score (LoopITR's list)")


@register("kl", KLOptions, "the teacher's softmax distribution over the list")
def kl(x: DistillInputs, o: KLOptions) -> torch.Tensor:
    if o.include_positive:
        x = x.with_positive()
    return kl_loss(x.student, x.teacher, x.mask, o.teacher_temperature)
