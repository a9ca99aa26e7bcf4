import math

import pytest
import torch

from pipeline.losses import hard_negative_loss

from reference import assert_same_value_and_grad, hard_negatives_ref, random_case


def test_golden_value_by_hand():
    pos = torch.tensor([2.0])
    neg = torch.tensor([[1.0, 0.0]])
    expected = math.log(math.exp(2) + math.exp(1) + 1) - 2  # 0.40760596
    assert hard_negative_loss(pos, neg).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference_values_and_grads(seed):
    student, _, mask = random_case(seed)
    pos = torch.randn(student.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fast = hard_negative_loss(pos, student, mask)
    assert_same_value_and_grad(fast, hard_negatives_ref(pos, student, mask), student)


def test_rows_without_negatives_are_skipped_and_all_empty_gives_zero_with_graph():
    pos = torch.tensor([1.0, 3.0])
    neg = torch.tensor([[0.5, 9.0], [7.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, False]])
    assert hard_negative_loss(pos, neg, mask).item() == pytest.approx(math.log(math.e + math.exp(0.5)) - 1, abs=1e-6)
    zero = hard_negative_loss(pos, neg, torch.zeros(2, 2, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad


def test_shape_errors_say_how_to_fix():
    with pytest.raises(ValueError, match="one positive per row"):
        hard_negative_loss(torch.zeros(3), torch.zeros(2, 4))
