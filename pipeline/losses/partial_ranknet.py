"""RankNet over exactly CPRD's ordered pairs: the same pairs, a pairwise logistic loss instead of a softmax."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import mean_over_rows
from ._partial import PartialOrderOptions, pair_terms, reduce_rows, teacher_order
from .registry import DistillInputs, register


def partial_ranknet_loss(student_logits: torch.Tensor, teacher_scores: torch.Tensor,
                         mask: torch.Tensor | None = None, num_valid: int | None = None,
                         min_teacher_score: float | None = None, tie_margin: float | None = None,
                         reduction: str = "mean") -> torch.Tensor:
    r"""CPRD's pairs, each taught on its own (no contrast among the candidates below j).

    Per row, in teacher order (descending, stable), with j ranging over CPRD's m valid positions and
    below(j) the real candidates ranked below j (with `tie_margin` d: scored at least d lower), as `cprd_loss`:

        row_loss = (1/m) * sum_{j valid} (1/|below(j)|) * sum_{l in below(j)} log(1 + exp(-(s(j) - s(l))))

    CPRD's term for j is log(1 + sum_l exp(s(l) - s(j))): one softmax of j against all below it, whose gradient
    goes mostly to the highest of them. Here each pair (j, l) weighs the same within j's term, and a pair the
    student already orders well adds little. Averaging over l keeps a term on CPRD's scale whatever the list's
    length. `reduction="sum"` drops the 1/m (as `cprd_loss`'s, whose docstring says why mean is the default).
    Rows with m = 0 are skipped; the result is the mean over the other rows, or a zero that still
    carries a graph when there are none.

    | input             | shape  | meaning                                                            |
    | ----------------- | ------ | ------------------------------------------------------------------ |
    | student_logits    | [B, N] | student logit_scale * cos(query, candidate)                        |
    | teacher_scores    | [B, N] | teacher scores (only their order, and tie_margin's gaps, are used) |
    | mask              | [B, N] | optional bool, True = real candidate, False = padding              |
    | num_valid         | int    | optional cap on valid positions j per row                          |
    | min_teacher_score | float  | optional: j is valid only if its teacher score >= this             |
    | tie_margin        | float  | optional d > 0: only pairs the teacher scores d or more apart      |
    | reduction         | str    | a row's terms over its valid positions: mean (1/m, the default) or sum |
    """
    o = teacher_order("partial_ranknet_loss", student_logits, teacher_scores, mask, num_valid, min_teacher_score,
                      tie_margin)
    pair_loss = F.softplus(-(o.s[:, :, None] - o.s[:, None, :]))                # [B, N, N]: j over l
    row_loss, m = reduce_rows(pair_terms(o, pair_loss), o.valid, reduction, "partial_ranknet_loss")
    return mean_over_rows(row_loss, m > 0, student_logits)


@dataclass
class PartialRankNetOptions(PartialOrderOptions):
    pass


@register("partial-ranknet", PartialRankNetOptions, "pairwise logistic loss over exactly cprd's ordered pairs")
def partial_ranknet(x: DistillInputs, o: PartialRankNetOptions) -> torch.Tensor:
    if o.include_positive:
        x = x.with_positive()
    return partial_ranknet_loss(x.student / o.student_temperature, x.teacher, x.mask, o.num_valid,
                                o.min_teacher_score, o.tie_margin, o.reduction)
