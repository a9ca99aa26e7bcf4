"""partial-ranknet and partial-hinge: pairwise losses over exactly the ordered pairs cprd teaches."""
import math

import pytest
import torch

from pipeline.losses import cprd_loss, partial_hinge_loss, partial_ranknet_loss, ranknet_loss

from reference import assert_same_value_and_grad, hinge_pair, partial_pairs_ref, random_case, ranknet_pair

LOSSES = {"ranknet": (partial_ranknet_loss, ranknet_pair), "hinge": (partial_hinge_loss, hinge_pair(1.0))}


def softplus(x):
    return math.log1p(math.exp(x))


def test_ranknet_golden_value_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0]])   # teacher order = index order
    # num_valid=2: j=0 against {1, 2, 3}, j=1 against {2, 3}; pair (j, l) costs log(1 + exp(s_l - s_j))
    j0 = (softplus(1.0) + softplus(2.0) + softplus(-1.0)) / 3
    j1 = (softplus(1.0) + softplus(-2.0)) / 2
    assert partial_ranknet_loss(s, t, num_valid=2).item() == pytest.approx((j0 + j1) / 2, abs=1e-6)
    assert partial_ranknet_loss(s, t, num_valid=2).item() == pytest.approx(0.985623, abs=1e-5)


def test_hinge_golden_value_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    # margin 1.5: j=0: max(0, 1.5 - (1 - l)) for l = 2, 3, 0 -> 2.5, 3.5, 0.5; j=1: l = 3, 0 -> 2.5, 0
    want = ((2.5 + 3.5 + 0.5) / 3 + (2.5 + 0.0) / 2) / 2
    assert partial_hinge_loss(s, t, num_valid=2, margin=1.5).item() == pytest.approx(want, abs=1e-6)   # 1.7083...
    assert partial_hinge_loss(s, t, num_valid=2, margin=0.0).item() == pytest.approx(((1 + 2) / 3 + 1 / 2) / 2)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_valid,min_score,margin", [(None, None, None), (1, None, None), (3, None, None),
                                                        (None, 0.0, None), (2, -0.5, None), (None, None, 0.3),
                                                        (3, None, 1.5), (2, -0.5, 0.3), (None, None, 100.0)])
def test_matches_loop_reference_values_and_grads(name, seed, num_valid, min_score, margin):
    fn, pair = LOSSES[name]
    student, teacher, mask = random_case(seed, ties=seed % 2 == 1)
    fast = fn(student, teacher, mask, num_valid=num_valid, min_teacher_score=min_score, tie_margin=margin)
    ref = partial_pairs_ref(student, teacher, pair, mask, num_valid, min_score, margin)
    if ref is None:   # nothing to teach in any row
        assert fast.item() == 0.0 and fast.requires_grad
    else:
        assert_same_value_and_grad(fast, ref, student)


@pytest.mark.parametrize("margin", [0.0, 0.5, 4.0])
def test_hinge_margin_matches_the_reference(margin):
    student, teacher, mask = random_case(5)
    fast = partial_hinge_loss(student, teacher, mask, num_valid=3, margin=margin)
    assert_same_value_and_grad(fast, partial_pairs_ref(student, teacher, hinge_pair(margin), mask, 3), student)


@pytest.mark.parametrize("name", LOSSES)
def test_the_pairs_are_cprds(name):
    """Where cprd's gradient is zero for a candidate (never valid, never below a valid one), so is this loss's;
    where cprd teaches a pair, this loss moves both ends."""
    fn, _ = LOSSES[name]
    s = torch.tensor([[0.0, 0.1, -0.2, 0.3, 0.2, -0.1]], requires_grad=True)
    t = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    (g_cprd,) = torch.autograd.grad(cprd_loss(s, t, mask, num_valid=2, tie_margin=1.5), s)
    (g,) = torch.autograd.grad(fn(s, t, mask, num_valid=2, tie_margin=1.5), s)
    # j=0 (t=5) is above l in {2, 3, 4}, j=1 (t=4) above {3, 4}: index 5 is padding; all real indices are touched
    assert ((g_cprd != 0) == (g != 0)).all()
    assert g[0, 5] == 0 and g[0, 0] < 0 and g[0, 1] < 0 and (g[0, 2:5] > 0).all()


def test_every_position_valid_is_ranknet_averaged_per_position():
    """With every position valid and no ties, the pairs are ranknet's; only the weighting differs (per j)."""
    student, teacher, _ = random_case(2, with_mask=False)
    full = partial_ranknet_loss(student, teacher, num_valid=None)
    ref = partial_pairs_ref(student, teacher, ranknet_pair, None, None)
    assert_same_value_and_grad(full, ref, student)
    N = student.shape[1]
    s, t = student[:1], teacher[:1]
    # a row of two candidates: one pair, the same value in both
    assert partial_ranknet_loss(s[:, :2], t[:, :2]).item() == pytest.approx(ranknet_loss(s[:, :2], t[:, :2]).item())
    assert N > 2


@pytest.mark.parametrize("name", LOSSES)
def test_padding_is_ignored(name):
    fn, _ = LOSSES[name]
    student, teacher, _ = random_case(7, B=3, N=5, with_mask=False)
    padded_s = torch.cat([student, torch.full((3, 2), 50.0, dtype=student.dtype)], 1)
    padded_t = torch.cat([teacher, torch.full((3, 2), 99.0, dtype=teacher.dtype)], 1)  # would rank first
    mask = torch.cat([torch.ones(3, 5, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool)], 1)
    torch.testing.assert_close(fn(padded_s, padded_t, mask, num_valid=2), fn(student, teacher, num_valid=2))


@pytest.mark.parametrize("name", LOSSES)
def test_empty_and_degenerate_rows_give_a_zero_with_a_graph(name):
    fn, _ = LOSSES[name]
    s = torch.randn(3, 4, requires_grad=True)
    out = fn(s, torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert fn(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4)).item() == 0.0
    one = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])       # row 1: one candidate, nothing to learn
    assert fn(one, t, mask, num_valid=1).item() == pytest.approx(fn(one[:1], t[:1], num_valid=1).item())
    assert fn(one[:1], t[:1], min_teacher_score=10.0).item() == 0.0      # no valid position


def test_errors_say_how_to_fix():
    with pytest.raises(ValueError, match="unsqueeze"):
        partial_ranknet_loss(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="partial_hinge_loss: tie_margin must be > 0"):
        partial_hinge_loss(torch.randn(2, 3), torch.randn(2, 3), tie_margin=0.0)
    with pytest.raises(ValueError, match="partial_hinge_loss: margin must be >= 0"):
        partial_hinge_loss(torch.randn(2, 3), torch.randn(2, 3), margin=-1.0)
