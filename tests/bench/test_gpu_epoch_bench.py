"""bench/gpu_epoch_bench.py: its rows encode the demo's per-step counts, through distill's own towers; on a GPU
the budget, the cut and the checkpoint take less memory than the whole lists."""
import pytest
import torch

from bench import gpu_epoch_bench
from bench.gpu_epoch_bench import CLIP_B16, ROWS, TINY, main, step_flops, towers


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


def test_without_cuda_the_full_size_run_is_recorded_as_skipped_with_its_flops(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full-size run would run")
    monkeypatch.setattr(gpu_epoch_bench, "epoch_flops", lambda geometry: {"counted at": geometry})  # 30 s: below
    result = main()
    assert "no CUDA" in result["skipped"] and result["flops"] == {"counted at": CLIP_B16}


def test_a_rows_flops_multiplied_out_from_one_item_of_each_kind_are_its_steps_counted_whole(tiny):
    flops = tiny["flops"]
    assert list(flops) == list(ROWS) and flops["none (batch 64)"]["flops_vs_none"] == 1.0
    models = {False: towers(TINY, "cpu"), True: towers(TINY, "cpu", grad_checkpointing=True)}
    for name in ("default (768 outside items by teacher rank)", "default, --frozen-negatives",
                 "default, --outside-grad-layers 1", "default, --grad-checkpointing"):
        model = models[bool(ROWS[name].get("checkpointed"))]
        row, per = ROWS[name], {k[len("gflops_per_"):]: v * 1e9 for k, v in flops[name].items() if "gflops" in k}
        n = lambda key: max(1, round(row[key] * 0.1))     # the tiny run's counts, as step_inputs makes them
        predicted = per["pair"] + per["pair_image"] * (n("pair_images") - 1) + \
            per["pair_text"] * (n("pair_texts") - 1) + per["other_image"] * (n("images") - n("pair_images")) + \
            per["other_text"] * (n("texts") - n("pair_texts"))
        assert step_flops(model, row, TINY, scale=0.1) == pytest.approx(predicted, rel=1e-9), name
    ratio = {name: flops[name]["flops_vs_none"] for name in ROWS}
    assert ratio["default, --frozen-negatives"] < ratio["default, --outside-grad-layers 1"] < \
        ratio["default, --outside-grad-layers 3"] < ratio["default (768 outside items by teacher rank)"] < \
        ratio["whole lists (--out-of-batch encode)"]
    # the checkpoint runs each block's forward again in the backward: more arithmetic than the default, not another
    # step (a forward is about a third of a forward and backward)
    assert 1.0 < ratio["default, --grad-checkpointing"] / ratio["default (768 outside items by teacher rank)"] < 1.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak GPU memory needs CUDA")
def test_on_a_gpu_the_budget_and_the_cut_take_less_memory_than_the_whole_lists(tiny):
    peak = {name: row["peak_memory_gib"] for name, row in tiny["rows"].items()}
    assert peak["default, --outside-grad-layers 1"] < peak["default (768 outside items by teacher rank)"]
    assert peak["default (768 outside items by teacher rank)"] < peak["whole lists (--out-of-batch encode)"]
    assert peak["default, --grad-checkpointing"] < peak["default (768 outside items by teacher rank)"]
