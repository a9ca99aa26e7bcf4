"""bench/distill_bench.py's timed steps run distill's own step (towers, loss, optimizer) on real batches."""
import pytest

from bench import distill_bench


def test_the_timed_steps_train_on_the_streamed_and_the_materialised_batches(scored_run, monkeypatch):
    monkeypatch.setattr(distill_bench, "WARMUP", 1)   # the fixture's corpus makes 3 batches of 64
    streamed = distill_bench._batches(scored_run, 0, steps=3, num_negatives=5)
    materialised = list(distill_bench._batches(scored_run, 0, steps=3, num_negatives=5))
    assert len(materialised) == 3
    assert distill_bench._time_steps(scored_run, streamed) > 0
    assert distill_bench._time_steps(scored_run, materialised) > 0


@pytest.mark.parametrize("loss", ["cprd", "none"])
def test_the_frozen_negatives_comparison_times_both_steps(scored_run, monkeypatch, loss):
    monkeypatch.setattr(distill_bench, "K_FROZEN", 5)   # the fixture mined 6 per query
    got = distill_bench._time_frozen(scored_run, loss, steps=2)
    assert got["step_s_grad"] > 0 and got["step_s_frozen"] > 0
    assert got["unique_images_per_batch"] > got["pair_images_per_batch"] > 0
