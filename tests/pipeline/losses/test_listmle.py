import math

import pytest
import torch

from pipeline.losses import listmle_loss

from reference import assert_same_value_and_grad, cprd_ref, random_case


def test_golden_value_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[1.0, 2.0, 3.0]])  # teacher order: index 2, 1, 0 -> s = 3, 2, 1
    lse321 = 3 + math.log(1 + math.exp(-1) + math.exp(-2))
    lse21 = 2 + math.log(1 + math.exp(-1))
    assert listmle_loss(s, t).item() == pytest.approx(((lse321 - 3) + (lse21 - 2)) / 2, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(seed):
    student, teacher, mask = random_case(seed, ties=seed % 2 == 0)
    assert_same_value_and_grad(listmle_loss(student, teacher, mask), cprd_ref(student, teacher, mask), student)


def test_all_degenerate_is_zero_with_graph():
    s = torch.randn(2, 1, requires_grad=True)  # one candidate per row: no order to learn
    out = listmle_loss(s, torch.randn(2, 1))
    assert out.item() == 0.0 and out.requires_grad
