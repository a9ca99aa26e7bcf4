"""SigLIP's pairwise sigmoid loss against a naive loop (values and the gradients of both towers, the scale and the
bias), and what a bias does to the distillation losses: nothing, since each compares logits of one list."""
import dataclasses
import math

import pytest
import torch

from pipeline.losses import DistillInputs, registry, sigmoid_loss

from reference import random_case, sigmoid_ref


def _leaves(seed, B=5, D=4):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-2.5], dtype=torch.float64, requires_grad=True)   # SigLIP keeps it as a [1] parameter
    return img, txt, log_scale, bias


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("duplicates", [False, True])
def test_matches_loop_reference_values_and_grads(seed, duplicates):
    leaves = _leaves(seed)
    positive = None
    if duplicates:  # rows 0 and 1 show the same image: pairs (0,1) and (1,0) are matches too
        same = torch.tensor([0, 0, 1, 2, 3])
        positive = same[:, None] == same[None, :]
    img, txt, log_scale, bias = leaves
    fast = sigmoid_loss(img, txt, log_scale.exp(), bias, positive)
    ref = sigmoid_ref(img, txt, log_scale, bias[0], positive)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
    g_fast = torch.autograd.grad(fast, leaves, retain_graph=True)
    g_ref = torch.autograd.grad(ref, leaves)
    for name, a, b in zip(("image", "text", "logit_scale", "logit_bias"), g_fast, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    assert abs(float(g_fast[3])) > 1e-3   # the bias is learned: it gets a gradient


def test_golden_value_by_hand():
    eye = torch.eye(2)
    # t=1, b=0: logits = I; diagonal terms log(1+e^-1), off-diagonal log(1+e^0) = log 2; 2 of each over B=2
    expected = (2 * math.log(1 + math.exp(-1)) + 2 * math.log(2)) / 2
    assert sigmoid_loss(eye, eye, 1.0, 0.0).item() == pytest.approx(expected, abs=1e-6)


def test_the_bias_moves_the_value():
    """Unlike the softmax loss, a shift of every logit changes the sigmoid loss: the bias must be trained."""
    img, txt, _, _ = _leaves(0)
    assert sigmoid_loss(img, txt, 10.0, -3.0).item() != pytest.approx(sigmoid_loss(img, txt, 10.0, 0.0).item())


def test_shape_errors():
    with pytest.raises(ValueError, match="row i of each forming a positive pair"):
        sigmoid_loss(torch.randn(3, 4), torch.randn(2, 4), 1.0, 0.0)
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        sigmoid_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, torch.zeros(3))
    with pytest.raises(ValueError, match="True diagonal"):
        sigmoid_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, 0.0, torch.zeros(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.get(n).fn is not None])
def test_every_distillation_loss_ignores_a_shared_bias(name):
    """distill feeds the distillation terms scale x cosine, never the bias: that is no loss of information, as
    each registered loss compares logits of one list (softmax, logsumexp, differences), where a shift of all
    of them cancels. A loss on absolute logits (BCE against teacher probabilities, logit MSE) would not be."""
    student, teacher, mask = random_case(3)
    g = torch.Generator().manual_seed(7)
    s_pos = torch.randn(student.shape[0], generator=g, dtype=torch.float64) * 3
    t_pos = torch.randn(student.shape[0], generator=g, dtype=torch.float64) + 1
    loss = registry.get(name)
    for include in (False, True):
        options = loss.options()
        if any(f.name == "include_positive" for f in dataclasses.fields(options)):
            options = dataclasses.replace(options, include_positive=include)
        plain = loss.fn(DistillInputs(student, teacher, mask, s_pos, t_pos), options)
        shifted = loss.fn(DistillInputs(student - 7.5, teacher, mask, s_pos - 7.5, t_pos), options)
        for key, value in registry.named_terms(plain).items():
            torch.testing.assert_close(registry.named_terms(shifted)[key], value, msg=f"{name} {key}")
