"""LR schedules against their formulas, written out."""
import math

import pytest

from pipeline.training import ramped_cosine_lr, warmup_cosine


def test_warmup_then_cosine():
    assert [warmup_cosine(s, 3, 10) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert warmup_cosine(3, 3, 10) == pytest.approx(1.0)
    assert warmup_cosine(3 + 7 // 2, 3, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 7)))
    assert warmup_cosine(10, 3, 10) == pytest.approx(0.0, abs=1e-12) and warmup_cosine(50, 3, 10) == pytest.approx(0.0, abs=1e-12)


def test_ramp_times_cosine_over_all_steps():
    base, total, warmup = 1e-3, 100, 10
    for step in (0, 4, 9, 10, 50, 99, 150):
        want = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
        assert ramped_cosine_lr(base, step, total, warmup) == want  # bit-identical: the demo assets depend on it
    assert ramped_cosine_lr(base, 4, total, warmup) < base / 2
