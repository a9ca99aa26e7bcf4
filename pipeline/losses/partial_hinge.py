"""A margin ranking (hinge) loss over exactly CPRD's ordered pairs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ._common import mean_over_rows
from ._partial import PartialOrderOptions, pair_terms, reduce_rows, teacher_order
from .registry import DistillInputs, register


def partial_hinge_loss(student_logits: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None,
                       num_valid: int | None = None, min_teacher_score: float | None = None,
                       tie_margin: float | None = None, margin: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    r"""CPRD's pairs as margin constraints: s(j) should exceed each s(l) below it by `margin`.

    Per row, in teacher order (descending, stable), with j ranging over CPRD's m valid positions and
    below(j) the real candidates ranked below j (with `tie_margin` d: scored at least d lower), as `cprd_loss`:

        row_loss = (1/m) * sum_{j valid} (1/|below(j)|) * sum_{l in below(j)} max(0, margin - (s(j) - s(l)))

    A pair ordered by at least `margin` teaches nothing (no gradient); CPRD's softmax never stops pushing.
    `reduction="sum"` drops the 1/m (as `cprd_loss`'s, whose docstring says why mean is the default). Rows with
    m = 0 are skipped; the result is the mean over the other rows, or a zero that still carries a graph when
    there are none.

    Inputs: `partial_ranknet_loss`'s table (student_logits, teacher_scores, mask, num_valid, min_teacher_score,
    tie_margin, reduction: the same pairs), and

    | input  | shape | meaning                                                         |
    | ------ | ----- | --------------------------------------------------------------- |
    | margin | float | >= 0, in student logits: how far s(j) should be above each s(l) |
    """
    if not margin >= 0:
        raise ValueError(f"partial_hinge_loss: margin must be >= 0 (in student logits), got {margin}")
    o = teacher_order("partial_hinge_loss", student_logits, teacher_scores, mask, num_valid, min_teacher_score,
                      tie_margin)
    pair_loss = torch.relu(margin - (o.s[:, :, None] - o.s[:, None, :]))        # [B, N, N]: j over l
    row_loss, m = reduce_rows(pair_terms(o, pair_loss), o.valid, reduction, "partial_hinge_loss")
    return mean_over_rows(row_loss, m > 0, student_logits)


@dataclass
class PartialHingeOptions(PartialOrderOptions):
    hinge_margin: float = option(1.0, "how far (in the ranking term's student logits, after "
                                      "--student-temperature) each valid candidate should score above each one "
                                      "the teacher ranks below it", at_least=0)


@register("partial-hinge", PartialHingeOptions, "margin ranking loss over exactly cprd's ordered pairs")
def partial_hinge(x: DistillInputs, o: PartialHingeOptions) -> torch.Tensor:
    if o.include_positive:
        x = x.with_positive()
    return partial_hinge_loss(x.student / o.student_temperature, x.teacher, x.mask, o.num_valid,
                              o.min_teacher_score, o.tie_margin, o.hinge_margin, o.reduction)
