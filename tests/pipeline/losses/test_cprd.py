import math

import pytest
import torch

from pipeline.losses import cprd_loss, listmle_loss

from reference import assert_same_value_and_grad, assert_same_value_and_grads, cprd_ref, cprd_tie_margin_ref, random_case


def test_golden_value_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 2.0, 1.0]])  # teacher order = index order: s(1)=1, s(2)=2, s(3)=3
    lse123 = 3 + math.log(1 + math.exp(-1) + math.exp(-2))  # 3.40760596
    lse23 = 3 + math.log(1 + math.exp(-1))                   # 3.31326169
    assert cprd_loss(s, t, num_valid=1).item() == pytest.approx(lse123 - 1, abs=1e-6)             # 2.40760596
    assert cprd_loss(s, t, num_valid=2).item() == pytest.approx(((lse123 - 1) + (lse23 - 2)) / 2, abs=1e-6)
    assert cprd_loss(s, t, min_teacher_score=2.5).item() == pytest.approx(lse123 - 1, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_valid,min_score", [(None, None), (1, None), (3, None), (None, 0.0), (2, -0.5)])
def test_matches_loop_reference_values_and_grads(seed, num_valid, min_score):
    student, teacher, mask = random_case(seed, ties=seed % 2 == 1)
    fast = cprd_loss(student, teacher, mask, num_valid=num_valid, min_teacher_score=min_score)
    ref = cprd_ref(student, teacher, mask, num_valid=num_valid, min_teacher_score=min_score)
    assert_same_value_and_grad(fast, ref, student)


def test_padding_is_ignored():
    student, teacher, _ = random_case(7, B=3, N=5, with_mask=False)
    padded_s = torch.cat([student, torch.full((3, 2), 50.0, dtype=student.dtype)], 1)
    padded_t = torch.cat([teacher, torch.full((3, 2), 99.0, dtype=teacher.dtype)], 1)  # would rank first
    mask = torch.cat([torch.ones(3, 5, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool)], 1)
    torch.testing.assert_close(cprd_loss(padded_s, padded_t, mask, num_valid=2), cprd_loss(student, teacher, num_valid=2))


def test_rows_with_nothing_to_learn_are_skipped():
    s = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])  # row 1: one candidate, m = 0
    assert cprd_loss(s, t, mask, num_valid=1).item() == pytest.approx(cprd_loss(s[:1], t[:1], num_valid=1).item())
    # min_teacher_score above every score: m = 0 for row 0 too
    assert cprd_loss(s[:1], t[:1], min_teacher_score=10.0).item() == 0.0


def test_all_rows_degenerate_is_a_zero_with_a_graph():
    s = torch.randn(3, 4, requires_grad=True)
    out = cprd_loss(s, torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    empty = torch.zeros(0, 4, requires_grad=True)
    assert cprd_loss(empty, torch.zeros(0, 4)).item() == 0.0


def test_num_valid_at_least_n_minus_1_equals_listmle():
    student, teacher, mask = random_case(3, with_mask=True)
    torch.testing.assert_close(cprd_loss(student, teacher, mask, num_valid=6), listmle_loss(student, teacher, mask))
    torch.testing.assert_close(cprd_loss(student, teacher, mask, num_valid=100), listmle_loss(student, teacher, mask))


def test_order_below_the_cut_is_not_taught():
    """Permuting the teacher scores of the candidates below the valid ones leaves the loss unchanged."""
    s = torch.randn(1, 6)
    t = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    t_perm = torch.tensor([[6.0, 5.0, 1.0, 3.0, 2.0, 4.0]])  # indices 2..5 reordered, 0..1 stay on top
    assert cprd_loss(s, t, num_valid=2).item() == pytest.approx(cprd_loss(s, t_perm, num_valid=2).item(), abs=1e-6)
    assert cprd_loss(s, t, num_valid=3).item() != pytest.approx(cprd_loss(s, t_perm, num_valid=3).item(), abs=1e-3)


def test_only_order_of_teacher_scores_matters():
    student, teacher, mask = random_case(5)
    torch.testing.assert_close(cprd_loss(student, teacher, mask, num_valid=3),
                               cprd_loss(student, 10 * teacher + 4, mask, num_valid=3))


def test_shape_errors_say_how_to_fix():
    with pytest.raises(ValueError, match="unsqueeze"):
        cprd_loss(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="one teacher score per student logit"):
        cprd_loss(torch.randn(2, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match="True = real candidate"):
        cprd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 3, dtype=torch.bool))


def test_tie_margin_golden_value_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    t = torch.tensor([[3.0, 2.9, 1.0, 2.95]])   # 3.0, 2.95, 2.9 are within 0.5 of each other; 1.0 is far below
    # each of the three near-tied candidates is contrasted against the far one only; the far one has nothing below
    want = sum(math.log(math.exp(a) + math.exp(3.0)) - a for a in (1.0, 0.5, 2.0)) / 3
    assert cprd_loss(s, t, tie_margin=0.5).item() == pytest.approx(want, abs=1e-6)
    # num_valid counts positions in the teacher's order: the first two (t = 3.0 and 2.95)
    want2 = sum(math.log(math.exp(a) + math.exp(3.0)) - a for a in (1.0, 0.5)) / 2
    assert cprd_loss(s, t, num_valid=2, tie_margin=0.5).item() == pytest.approx(want2, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_valid,margin", [(None, 0.3), (2, 0.3), (None, 1e-6), (3, 1.5), (None, 100.0)])
def test_tie_margin_matches_loop_reference_values_and_grads(seed, num_valid, margin):
    student, teacher, mask = random_case(seed, ties=seed % 2 == 1)
    fast = cprd_loss(student, teacher, mask, num_valid=num_valid, tie_margin=margin)
    ref = cprd_tie_margin_ref(student, teacher, mask, num_valid=num_valid, tie_margin=margin)
    if ref is None:   # margin wider than every row's spread: nothing to teach
        assert fast.item() == 0.0 and fast.requires_grad
    else:
        assert_same_value_and_grad(fast, ref, student)


def test_tie_margin_below_every_gap_is_the_plain_order():
    student, teacher, mask = random_case(2, with_mask=True)       # distinct scores: no ties
    torch.testing.assert_close(cprd_loss(student, teacher, mask, num_valid=3, tie_margin=1e-9),
                               cprd_loss(student, teacher, mask, num_valid=3))


def test_tie_margin_must_be_positive():
    with pytest.raises(ValueError, match="tie_margin must be > 0"):
        cprd_loss(torch.randn(2, 3), torch.randn(2, 3), tie_margin=0.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lift", ["positive", "only"])
@pytest.mark.parametrize("num_valid,margin", [(None, None), (2, None), (None, 0.3), (3, 1.5)])
def test_lift_matches_loop_reference_values_and_grads(seed, lift, num_valid, margin):
    student, teacher, mask = random_case(seed, ties=seed % 2 == 1)
    positive = torch.randn(student.shape[0], dtype=student.dtype, generator=torch.Generator().manual_seed(seed))
    positive.requires_grad_()
    fast = cprd_loss(student, teacher, mask, num_valid=num_valid, tie_margin=margin, lift=lift, positive=positive)
    if margin is None:
        ref = cprd_ref(student, teacher, mask, num_valid=num_valid, lift=lift, positive=positive)
    else:
        ref = cprd_tie_margin_ref(student, teacher, mask, num_valid, margin, lift=lift, positive=positive)
    assert_same_value_and_grads(fast, ref, (student, positive))


def test_lift_keeps_the_value_and_moves_the_gradient():
    student, teacher, mask = random_case(1, ties=True)
    positive = torch.zeros(student.shape[0], dtype=student.dtype, requires_grad=True)
    plain = cprd_loss(student, teacher, mask, num_valid=3)
    to_positive = cprd_loss(student, teacher, mask, num_valid=3, lift="positive", positive=positive)
    only = cprd_loss(student, teacher, mask, num_valid=3, lift="only", positive=positive)
    assert to_positive.item() == pytest.approx(plain.item(), abs=1e-9)
    assert only.item() == pytest.approx(plain.item(), abs=1e-9)
    (g_plain,) = torch.autograd.grad(plain, student)
    g_neg, g_pos = torch.autograd.grad(to_positive, (student, positive))
    (g_only,) = torch.autograd.grad(only, student)
    assert (g_plain < 0).any() and (g_plain > 0).any()   # plain: the higher lifted, the lower lowered
    assert (g_neg >= 0).all() and (g_pos <= 0).all() and (g_pos < 0).any()   # to the positive: no negative lifted
    torch.testing.assert_close(g_neg.sum(1) + g_pos, torch.zeros_like(g_pos), atol=1e-7, rtol=0)  # zero-sum rows
    assert (g_only <= 0).all() and (g_only < 0).any()    # only: nothing lowered
    top = torch.where(mask, teacher, torch.full_like(teacher, -torch.inf)).argmax(1)
    rows = (mask.sum(1) > 1).nonzero().squeeze(1)
    assert (g_neg[rows, top[rows]] == 0).all()   # the teacher's first negative is never moved by lift="positive"
    # plain = lift to the negatives + push: the two halves add up to the plain gradient
    torch.testing.assert_close(g_only + g_neg, g_plain, atol=1e-7, rtol=0)


def test_lift_golden_gradients_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    p = torch.tensor([5.0], requires_grad=True)
    t = torch.tensor([[3.0, 2.0, 1.0]])
    e = [math.exp(v) for v in (1.0, 2.0, 3.0)]   # one term: logsumexp(s1, s2, s3) - s1
    g_s, g_p = torch.autograd.grad(cprd_loss(s, t, num_valid=1, lift="positive", positive=p), (s, p))
    assert g_s[0].tolist() == pytest.approx([0.0, e[1] / sum(e), e[2] / sum(e)], abs=1e-6)
    assert g_p.item() == pytest.approx(e[0] / sum(e) - 1, abs=1e-6)
    (g_s,) = torch.autograd.grad(cprd_loss(s, t, num_valid=1, lift="only"), s)
    assert g_s[0].tolist() == pytest.approx([e[0] / sum(e) - 1, 0.0, 0.0], abs=1e-6)


def test_lift_errors_say_how_to_fix():
    with pytest.raises(ValueError, match=r"lift='positive' needs positive of shape \[B\] = \[2\]"):
        cprd_loss(torch.randn(2, 3), torch.randn(2, 3), lift="positive", positive=torch.randn(2, 1))
    with pytest.raises(ValueError, match="lift must be one of negative, positive, only, got 'up'"):
        cprd_loss(torch.randn(2, 3), torch.randn(2, 3), lift="up")
