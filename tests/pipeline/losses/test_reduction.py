"""reduction="sum" (the CPRD paper's sum over a query's valid positions) for cprd and the pairwise losses over its
pairs, against the loop references; mean stays the default."""
import math

import pytest
import torch

from pipeline.losses import cprd_loss, partial_hinge_loss, partial_ranknet_loss, registry
from pipeline.losses.registry import DistillInputs

from reference import (assert_same_value_and_grad, assert_same_value_and_grads, cprd_ref, cprd_tie_margin_ref,
                       hinge_pair, partial_pairs_ref, random_case, ranknet_pair)


def test_cprd_sum_golden_value_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 2.0, 1.0]])
    lse123 = 3 + math.log(1 + math.exp(-1) + math.exp(-2))
    lse23 = 3 + math.log(1 + math.exp(-1))
    want = (lse123 - 1) + (lse23 - 2)    # L = -sum_{j<J*} log(exp(s_j) / sum_{k>=j} exp(s_k)), J* = 2: 3.72086765
    assert cprd_loss(s, t, num_valid=2, reduction="sum").item() == pytest.approx(want, abs=1e-6)
    assert cprd_loss(s, t, num_valid=2, reduction="sum").item() == pytest.approx(3.720868, abs=1e-5)
    assert cprd_loss(s, t, num_valid=2).item() == pytest.approx(want / 2, abs=1e-6)     # the default: mean


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_valid,min_score,margin", [(None, None, None), (1, None, None), (3, None, None),
                                                        (2, -0.5, None), (None, None, 0.3), (3, None, 1.5)])
def test_cprd_sum_matches_the_loop_reference(seed, num_valid, min_score, margin):
    student, teacher, mask = random_case(seed, ties=seed % 2 == 1)
    fast = cprd_loss(student, teacher, mask, num_valid=num_valid, min_teacher_score=min_score, tie_margin=margin,
                     reduction="sum")
    if margin is None:
        ref = cprd_ref(student, teacher, mask, num_valid, min_score, reduction="sum")
    else:
        ref = cprd_tie_margin_ref(student, teacher, mask, num_valid, margin, reduction="sum")
    assert_same_value_and_grad(fast, ref, student)


@pytest.mark.parametrize("lift", ["positive", "only"])
def test_cprd_sum_with_lift_matches_the_loop_reference(lift):
    student, teacher, mask = random_case(1, ties=True)
    positive = torch.randn(student.shape[0], dtype=student.dtype, requires_grad=True)
    fast = cprd_loss(student, teacher, mask, num_valid=3, lift=lift, positive=positive, reduction="sum")
    ref = cprd_ref(student, teacher, mask, num_valid=3, lift=lift, positive=positive, reduction="sum")
    assert_same_value_and_grads(fast, ref, (student, positive))


@pytest.mark.parametrize("fn,pair", [(partial_ranknet_loss, ranknet_pair), (partial_hinge_loss, hinge_pair(1.0))])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_valid,margin", [(None, None), (3, None), (2, 0.3)])
def test_pairwise_sum_matches_the_loop_reference(fn, pair, seed, num_valid, margin):
    student, teacher, mask = random_case(seed, ties=seed % 2 == 1)
    fast = fn(student, teacher, mask, num_valid=num_valid, tie_margin=margin, reduction="sum")
    assert_same_value_and_grad(fast, partial_pairs_ref(student, teacher, pair, mask, num_valid, None, margin, "sum"),
                               student)


def test_sum_weighs_a_row_by_its_valid_positions():
    """One row with 3 valid positions and one with 1: mean weighs them alike, sum 3 : 1."""
    s = torch.tensor([[1.0, 2.0, 3.0, 0.5], [1.0, 2.0, 3.0, 0.5]])
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    per_row_sum = [cprd_loss(s[r:r + 1], t[r:r + 1], mask[r:r + 1], num_valid=3, reduction="sum").item()
                   for r in range(2)]
    per_row_mean = [cprd_loss(s[r:r + 1], t[r:r + 1], mask[r:r + 1], num_valid=3).item() for r in range(2)]
    assert per_row_sum[0] == pytest.approx(3 * per_row_mean[0]) and per_row_sum[1] == pytest.approx(per_row_mean[1])
    assert cprd_loss(s, t, mask, num_valid=3, reduction="sum").item() == pytest.approx(sum(per_row_sum) / 2)


def test_an_unknown_reduction_is_an_error():
    with pytest.raises(ValueError, match="cprd_loss: reduction must be one of mean, sum, got 'max'"):
        cprd_loss(torch.randn(2, 3), torch.randn(2, 3), reduction="max")


@pytest.mark.parametrize("name,ref", [
    ("cprd", lambda x: cprd_ref(x.student, x.teacher, x.mask, 3, reduction="sum")),
    ("partial-ranknet", lambda x: partial_pairs_ref(x.student, x.teacher, ranknet_pair, x.mask, 3, reduction="sum")),
    ("partial-hinge", lambda x: partial_pairs_ref(x.student, x.teacher, hinge_pair(1.0), x.mask, 3, reduction="sum")),
])
def test_the_reduction_option_reaches_each_loss_and_mean_is_the_default(name, ref):
    student, teacher, mask = random_case(2)
    x = DistillInputs(student, teacher, mask, torch.zeros(student.shape[0]), torch.zeros(student.shape[0]))
    spec = registry.get(name)
    assert spec.options().reduction == "mean"
    got = spec.fn(x, spec.options(num_valid=3, reduction="sum"))
    torch.testing.assert_close(got.double(), ref(x).double(), rtol=1e-5, atol=1e-6)
    assert float(got.detach()) != pytest.approx(float(spec.fn(x, spec.options(num_valid=3)).detach()))
    both = registry.get("cprd-kl").fn(x, registry.get("cprd-kl").options(num_valid=3, reduction="sum"))
    torch.testing.assert_close(both["cprd"].double(), cprd_ref(student, teacher, mask, 3, reduction="sum").double(),
                               rtol=1e-5, atol=1e-6)
