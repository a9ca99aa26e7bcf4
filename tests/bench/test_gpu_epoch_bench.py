"""bench/gpu_epoch_bench.py: its rows encode the demo's per-step counts, through distill's own towers; on a GPU
the budget and the cut take less memory than the whole lists."""
import pytest
import torch

from bench.gpu_epoch_bench import ROWS, main


@pytest.fixture(scope="module")
def tiny():
    return main(tiny=True, timed=1)


def test_each_row_encodes_its_share_of_the_demos_counts_for_an_epoch_of_steps(tiny):
    rows = tiny["rows"]
    assert list(rows) == list(ROWS)
    for name, row in ROWS.items():
        got = rows[name]
        assert got["images_per_step"] == round(row["images"] * 0.1)
        assert got["texts_per_step"] == round(row["texts"] * 0.1)
        assert got["epoch_s"] == pytest.approx(got["step_s"] * row["steps"]) and got["step_s"] > 0
    assert rows["none (batch 64)"]["epoch_time_vs_none"] == pytest.approx(1.0)
    assert tiny["geometry"] == "tiny"


def test_without_cuda_the_full_size_run_is_recorded_as_skipped():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full-size run would run")
    assert "no CUDA" in main()["skipped"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak GPU memory needs CUDA")
def test_on_a_gpu_the_budget_and_the_cut_take_less_memory_than_the_whole_lists(tiny):
    peak = {name: row["peak_memory_gib"] for name, row in tiny["rows"].items()}
    assert peak["default, --outside-grad-layers 1"] < peak["default (768 outside items by teacher rank)"]
    assert peak["default (768 outside items by teacher rank)"] < peak["whole lists (--out-of-batch encode)"]
