"""distill --teacher-scale: the loss sees sigmoid(log-odds) with prob, and prob is refused for an itm+itc cache."""
import math
from pathlib import Path

import pytest
import torch

from pipeline import teacher_scale
from pipeline.errors import PipelineError
from pipeline.losses import DistillInputs


def _inputs():
    g = torch.Generator().manual_seed(0)
    return DistillInputs(torch.randn(2, 3, generator=g), torch.tensor([[-2.0, 0.0, 3.0], [1.0, -40.0, 40.0]]),
                         torch.tensor([[True, True, False], [True, True, True]]), torch.randn(2, generator=g),
                         torch.tensor([0.5, -1.0]))


def test_logodds_is_the_stored_scores_untouched():
    x = _inputs()
    assert teacher_scale.rescale(x, "logodds") is x


def test_prob_is_the_sigmoid_of_every_teacher_score():
    x = _inputs()
    y = teacher_scale.rescale(x, "prob")
    want = [1 / (1 + math.exp(-v)) for v in x.teacher.ravel().tolist()]
    assert y.teacher.ravel().tolist() == pytest.approx(want, abs=1e-7)
    assert y.teacher_positive.tolist() == pytest.approx([1 / (1 + math.exp(-v)) for v in (0.5, -1.0)], abs=1e-7)
    assert y.teacher[0, 1].item() == 0.5 and 0 <= y.teacher.min() and y.teacher.max() <= 1
    assert y.student is x.student and y.mask is x.mask and y.student_positive is x.student_positive


def test_an_unknown_scale_is_an_error():
    with pytest.raises(ValueError, match="teacher scale must be one of logodds, prob, got 'logits'"):
        teacher_scale.rescale(_inputs(), "logits")


def test_prob_is_refused_for_an_itm_itc_cache_naming_the_option_and_the_cache():
    teacher_scale.check("prob", {"config": {"score": "itm"}}, Path("RUN/teacher"))
    teacher_scale.check("logodds", {"config": {"score": "itm+itc"}}, Path("RUN/teacher"))
    with pytest.raises(PipelineError, match=r"^--teacher-scale prob: RUN/teacher-itc holds --score itm\+itc "):
        teacher_scale.check("prob", {"config": {"score": "itm+itc"}}, Path("RUN/teacher-itc"))
