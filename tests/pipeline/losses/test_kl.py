import math

import pytest
import torch

from pipeline.losses import kl_loss

from reference import assert_same_value_and_grad, kl_ref, random_case


def test_golden_value_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4), q = (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # 0.13081203
    assert kl_loss(s, t).item() == pytest.approx(expected, abs=1e-6)
    # temperature 2 flattens the teacher: p = softmax(0, ln3/2)
    p1 = 1 / (1 + math.sqrt(3))
    expected_t2 = p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5)
    assert kl_loss(s, t, teacher_temperature=2.0).item() == pytest.approx(expected_t2, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_matches_loop_reference(seed, T):
    student, teacher, mask = random_case(seed)
    assert_same_value_and_grad(kl_loss(student, teacher, mask, T), kl_ref(student, teacher, mask, T), student)


def test_zero_when_student_equals_teacher_and_degenerate_rows():
    t = torch.randn(3, 5)
    assert kl_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 3, requires_grad=True)
    out = kl_loss(s, torch.randn(2, 3), torch.tensor([[True, False, False], [False, False, False]]))
    assert out.item() == 0.0 and out.requires_grad


def test_bad_temperature():
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        kl_loss(torch.randn(1, 2), torch.randn(1, 2), teacher_temperature=0)
