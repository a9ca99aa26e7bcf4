"""CPRD's ordered pairs: each row in teacher order, the valid positions j and where "below j" starts.

Shared by `cprd` (a softmax of s(j) against everything below it) and the pairwise losses over the same pairs
(`partial-ranknet`, `partial-hinge`), so that all of them teach exactly the same (j, l) pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import option
from ._common import NEG, check_pair

REDUCTIONS = ("mean", "sum")   # how a row's terms over its valid positions are combined


@dataclass(frozen=True)
class TeacherOrder:
    """One batch sorted by teacher score, descending (stable); padding sorts last.

    | field | shape  | meaning                                                                        |
    | ----- | ------ | ------------------------------------------------------------------------------ |
    | s     | [B, N] | student logits in teacher order (float32), padding replaced by NEG             |
    | t     | [B, N] | teacher scores in that order, padding -inf                                     |
    | real  | [B, N] | True = a real candidate                                                        |
    | valid | [B, N] | True = position j's order is taught (a valid hard negative)                    |
    | first | [B, N] | the first position "below" j: j + 1, or with tie_margin d the first t <= t(j) - d |
    | n     | [B, 1] | real candidates per row                                                        |
    """
    s: torch.Tensor
    t: torch.Tensor
    real: torch.Tensor
    valid: torch.Tensor
    first: torch.Tensor
    n: torch.Tensor

    def below(self) -> torch.Tensor:
        """[B, N, N] bool: (j, l) is one of the ordered pairs, j valid and l a real candidate below j."""
        pos = torch.arange(self.s.shape[1], device=self.s.device)
        return self.valid[:, :, None] & self.real[:, None, :] & (pos[None, None, :] >= self.first[:, :, None])


def teacher_order(name: str, student_logits: torch.Tensor, teacher_scores: torch.Tensor,
                  mask: Optional[torch.Tensor], num_valid: Optional[int], min_teacher_score: Optional[float],
                  tie_margin: Optional[float]) -> TeacherOrder:
    """The rows in teacher order with CPRD's valid positions: the first m of the order, at most `num_valid`, only
    those with teacher score >= `min_teacher_score`, never more than n - 1; with `tie_margin` d, "below j" is the
    candidates scored at least d lower, and a j with none is not valid."""
    mask = check_pair(name, student_logits, teacher_scores, mask)
    if tie_margin is not None and not tie_margin > 0:
        raise ValueError(f"{name}: tie_margin must be > 0 (or None for the plain order), got {tie_margin}")
    s = student_logits.float()
    t = teacher_scores.float().masked_fill(~mask, float("-inf"))
    order = torch.sort(t, dim=1, descending=True, stable=True).indices          # padding sorts last
    s = torch.gather(s, 1, order)
    real = torch.gather(mask, 1, order)
    t = torch.gather(t, 1, order)
    s = torch.where(real, s, torch.full_like(s, NEG))
    n = real.sum(1, keepdim=True)
    pos = torch.arange(s.shape[1], device=s.device).unsqueeze(0)
    valid = real & (pos < n - 1)
    if num_valid is not None:
        valid &= pos < num_valid
    if min_teacher_score is not None:
        valid &= t >= min_teacher_score
    if tie_margin is None:
        first = (pos + 1).expand_as(s)                                                      # everything below j
    else:
        # the first position scored tie_margin below each j: t is descending, so -t is sorted ascending
        first = torch.searchsorted(-t.contiguous(), (tie_margin - t).contiguous())         # [B, N]
        first = torch.maximum(first, pos + 1)   # never j itself, even where t - d rounds back to t
        valid &= first < n
    return TeacherOrder(s, t, real, valid, first, n)


def reduce_rows(terms: torch.Tensor, valid: torch.Tensor, reduction: str, name: str) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """(row loss [B], m [B]): the row's terms [B, N] over its m valid positions, summed or averaged."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    m = valid.sum(1)
    row_loss = terms.sum(1)
    return (row_loss / m.clamp(min=1) if reduction == "mean" else row_loss), m


def pair_terms(o: TeacherOrder, pair_loss: torch.Tensor) -> torch.Tensor:
    """[B, N]: each valid j's mean of `pair_loss` [B, N, N] (entry j, l: the loss of ordering j above l) over the
    l below it; 0 elsewhere. Entries outside the pairs (padding included) are never read, nor their gradients."""
    below = o.below()                                                            # [B, N, N]
    total = torch.where(below, pair_loss, torch.zeros_like(pair_loss)).sum(2)   # [B, N]
    return total / below.sum(2).clamp(min=1)


@dataclass
class PartialOrderOptions:
    """The options that say which of the teacher's pairs are taught (cprd's, shared by the pairwise losses over
    the same pairs)."""
    num_valid: Optional[int] = option(4, "at most this many of the teacher's top candidates have their order taught",
                                      at_least=1)
    min_teacher_score: Optional[float] = option(None, "a candidate is valid only if its teacher score >= this")
    include_positive: bool = option(False, "the positive joins the list with its teacher score (LoopITR's list)")
    student_temperature: float = option(1.0, "the ranking term's student logits are divided by this (apart from "
                                             "the contrastive term's learned scale)", above=0)
    tie_margin: Optional[float] = option(None, "order only pairs the teacher scores at least this far apart (ties "
                                               "and near-ties are not taught)", added=True, above=0)
    reduction: str = option("mean", "a query's terms over its valid positions: mean (the default: the term's "
                                    "weight does not grow with --num-valid) or sum (the CPRD paper's formula, "
                                    "sum_{j<J*}; the distill weight then scales with the valid positions)",
                            choices=REDUCTIONS, added=True)
