"""CPRD with a KL term over the same list: the teacher's order among its top negatives, and its soft scores."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from .cprd import CPRDOptions, cprd
from .kl import kl
from .registry import DistillInputs, register


@dataclass
class CPRDKLOptions(CPRDOptions):
    teacher_temperature: float = option(1.0, "teacher scores are divided by this", above=0)
    kl_weight: float = option(1.0, "weight of the KL term next to the ranking term (weight 1)", at_least=0)


@register("cprd-kl", CPRDKLOptions, "cprd plus kl over the same list, logged as two terms")
def cprd_kl(x: DistillInputs, o: CPRDKLOptions) -> dict[str, torch.Tensor]:
    r"""Named terms {cprd, kl}, summed by the loop:

        cprd_loss(s / student_temperature, t; num_valid, min_teacher_score, tie_margin)
        + kl_weight * kl_loss(s, t; teacher_temperature)

    over one list per query (with the positive prepended to both when `include_positive`). CPRD teaches the order
    among the teacher's top negatives and nothing about how far apart they are; KL at a high teacher temperature
    teaches small score differences in proportion to the teacher's and no strict order, so each supplies what the
    other leaves out.
    """
    # the two registered losses on these options (a superset of each one's): checks and the positive as theirs
    return {"cprd": cprd(x, o), "kl": o.kl_weight * kl(x, o)}
