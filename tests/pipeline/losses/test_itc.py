import math

import pytest
import torch

from pipeline.losses import itc_loss

from reference import itc_ref


def test_golden_value_by_hand():
    eye = torch.eye(2)
    # logits = I: each row's CE = log(1 + e^-1) = 0.31326169
    assert itc_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_matches_loop_reference_values_and_grads(seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(6, 4, generator=g, dtype=torch.float64)
    fast, ref = itc_loss(img, txt, 7.0), itc_ref(img, txt, 7.0)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(fast, img, retain_graph=True)
    (g2,) = torch.autograd.grad(ref, img)
    torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=1e-6)


def test_soft_targets_for_known_duplicates():
    g = torch.Generator().manual_seed(9)
    img, txt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    same = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 show the same image
    positive = same[:, None] == same[None, :]
    torch.testing.assert_close(itc_loss(img, txt, 5.0, positive), itc_ref(img, txt, 5.0, positive).float())
    torch.testing.assert_close(itc_loss(img, txt, 5.0, torch.eye(4, dtype=torch.bool)), itc_loss(img, txt, 5.0))


def test_shape_errors():
    with pytest.raises(ValueError, match="row i of each forming a positive pair"):
        itc_loss(torch.randn(3, 4), torch.randn(2, 4), 1.0)
    with pytest.raises(ValueError, match="True diagonal"):
        itc_loss(torch.randn(2, 4), torch.randn(2, 4), 1.0, torch.zeros(2, 2, dtype=torch.bool))
