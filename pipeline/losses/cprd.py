"""Contrastive Partial Ranking Distillation (Chen et al., CVPR 2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ._common import check_pair, mean_over_rows
from ._partial import PartialOrderOptions, reduce_rows, teacher_order
from .registry import DistillInputs, register


LIFTS = ("negative", "positive", "only")   # where each ordered pair's gradient goes (cprd_loss's `lift`)


def cprd_loss(student_logits: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None,
              num_valid: int | None = None, min_teacher_score: float | None = None,
              tie_margin: float | None = None, lift: str = "negative",
              positive: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    r"""Teach the student the teacher's order among the top hard negatives only.

    Per row, order the n real candidates by teacher score, descending (stable); s(j) is the student logit of
    the j-th. The valid hard negatives are the first m of that order: at most `num_valid`, only those with
    teacher score >= `min_teacher_score` (when given), and never more than n - 1. Then

        row_loss = (1/m) * sum_{j=1..m} [ logsumexp_{l=j..n} s(l) - s(j) ]

    each valid negative contrasted against everything the teacher ranks below it; the order among the rest
    (easy negatives) is not taught. Rows with m = 0 are skipped; the result is the mean over the other rows,
    or a zero that still carries a graph when there are none.

    `reduction="sum"` drops the 1/m: the paper's L = -sum_i sum_{j<J_i*} log(exp(s_ij) / sum_{k>=j} exp(s_ik))
    sums a query's valid positions (the mean over queries stays, as for every loss). The mean is the default:
    under the sum a query's term grows with its m (up to `num_valid`), so what `distill_weight` means, and the
    balance against the contrastive term, would change with `num_valid` and with how many positions a row has.

    With `tie_margin` d > 0, "below" means scored at least d lower: the j-th is contrasted only against the l
    with t(l) <= t(j) - d,

        row_loss = (1/m) * sum_{j valid} [ logsumexp({s(j)} + {s(l) : t(l) <= t(j) - d}) - s(j) ]

    so candidates the teacher scores within d of each other (exact ties included: captions of the same text)
    are never ordered against each other, and a j with no candidate d below it is not valid.

    The value is always this; `lift` says where the gradient goes. Each term's gradient lifts s(j) and lowers
    the candidates below it by as much in total (the plain loss, `lift="negative"`): the teacher's top
    negatives are lifted toward the positive. With `lift="positive"` the lift goes to the query's positive
    logit (`positive`, [B]) instead, s(j) held fixed in its own term: each term lowers the candidates below j
    and raises the positive, no negative is lifted, and the gradients still sum to zero per term (a shared
    logit scale is not driven to zero, as it is when s(j) is merely held fixed). With `lift="only"` the lower
    candidates are held fixed and only s(j) is lifted over them: no negative is lowered.

    | input             | shape  | meaning                                                            |
    | ----------------- | ------ | ------------------------------------------------------------------ |
    | student_logits    | [B, N] | student logit_scale * cos(query, candidate)                        |
    | teacher_scores    | [B, N] | teacher match log-odds (any monotone score works: only order is used) |
    | mask              | [B, N] | optional bool, True = real candidate, False = padding              |
    | num_valid         | int    | optional cap on valid hard negatives per row                       |
    | min_teacher_score | float  | optional: a negative is valid only if its teacher score >= this    |
    | tie_margin        | float  | optional d > 0: only pairs the teacher scores d or more apart are ordered |
    | lift              | str    | where each term's gradient goes: negative (plain), positive, only  |
    | positive          | [B]    | the positives' student logits, needed for lift="positive"          |
    | reduction         | str    | a row's terms over its valid positions: mean (1/m) or sum           |
    """
    check_pair("cprd_loss", student_logits, teacher_scores, mask)
    if lift not in LIFTS:
        raise ValueError(f"cprd_loss: lift must be one of {', '.join(LIFTS)}, got {lift!r}")
    b = student_logits.shape[0]
    if lift == "positive" and (positive is None or positive.shape != (b,)):
        got = None if positive is None else tuple(positive.shape)
        raise ValueError(f"cprd_loss: lift='positive' needs positive of shape [B] = [{b}] (one positive logit per "
                         f"row), got {got}")
    o = teacher_order("cprd_loss", student_logits, teacher_scores, mask, num_valid, min_teacher_score, tie_margin)
    s = o.s
    tail_lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)                     # [B, N]: logsumexp_{l>=j}
    if tie_margin is None and lift == "negative":   # the plain order; the branch below gives the same value,
        terms = tail_lse - s                         # not the same last bits, and trained students stay as they were
    else:
        below = torch.gather(tail_lse, 1, o.first.clamp(max=s.shape[1] - 1))               # lse_{l>=first}
        anchor = s
        if lift == "positive":            # s(j)'s value, the positive's gradient
            p = positive.float()[:, None]
            anchor = s.detach() + (p - p.detach())
        elif lift == "only":
            below = below.detach()
        terms = torch.logaddexp(anchor, below) - anchor
    row_loss, m = reduce_rows(terms, o.valid, reduction, "cprd_loss")
    return mean_over_rows(row_loss, m > 0, student_logits)


@dataclass
class CPRDOptions(PartialOrderOptions):
    lift: str = option("negative", "where each ordered pair's gradient goes: negative (lift the higher-ranked "
                                   "negative, lower the lower one), positive (lift the positive instead), only (lift "
                                   "the higher one, lower nothing)", choices=LIFTS, added=True)


@register("cprd", CPRDOptions, "the teacher's order among its top hard negatives only")
def cprd(x: DistillInputs, o: CPRDOptions) -> torch.Tensor:
    if o.include_positive:
        x = x.with_positive()
    return cprd_loss(x.student / o.student_temperature, x.teacher, x.mask, o.num_valid, o.min_teacher_score,
                     o.tie_margin, o.lift, x.student_positive / o.student_temperature, o.reduction)
