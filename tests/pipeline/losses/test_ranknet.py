import math

import pytest
import torch

from pipeline.losses import ranknet_loss

from reference import assert_same_value_and_grad, random_case, ranknet_ref


def test_golden_value_by_hand():
    # one preferred pair (0 over 1): log(1 + exp(-(0 - 1))) = log(1 + e)
    out = ranknet_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert out.item() == pytest.approx(math.log(1 + math.e), abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(seed):
    student, teacher, mask = random_case(seed, ties=True)
    assert_same_value_and_grad(ranknet_loss(student, teacher, mask), ranknet_ref(student, teacher, mask), student)


def test_ties_teach_nothing():
    s = torch.randn(1, 3, requires_grad=True)
    out = ranknet_loss(s, torch.ones(1, 3))
    assert out.item() == 0.0 and out.requires_grad
