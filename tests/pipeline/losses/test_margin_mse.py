import pytest
import torch

from pipeline.losses import margin_mse_loss

from reference import assert_same_value_and_grad, margin_mse_ref, random_case


def test_golden_value_by_hand():
    # margins: (1 - 0) - (3 - 1) = -1 -> 1;  (1 - 2) - (3 - 1) = -3 -> 9;  mean 5
    out = margin_mse_loss(torch.tensor([1.0]), torch.tensor([[0.0, 2.0]]), torch.tensor([3.0]), torch.tensor([[1.0, 1.0]]))
    assert out.item() == pytest.approx(5.0)


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(seed):
    s_neg, t_neg, mask = random_case(seed)
    g = torch.Generator().manual_seed(seed + 100)
    s_pos = torch.randn(s_neg.shape[0], generator=g, dtype=torch.float64)
    t_pos = torch.randn(s_neg.shape[0], generator=g, dtype=torch.float64)
    fast = margin_mse_loss(s_pos, s_neg, t_pos, t_neg, mask)
    assert_same_value_and_grad(fast, margin_mse_ref(s_pos, s_neg, t_pos, t_neg, mask), s_neg)


def test_masks_and_degenerate():
    s_neg = torch.randn(2, 3, requires_grad=True)
    out = margin_mse_loss(torch.zeros(2), s_neg, torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    with pytest.raises(ValueError, match="one positive per row"):
        margin_mse_loss(torch.zeros(3), torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3))
