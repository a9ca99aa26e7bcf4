"""The BLIP-2 teacher: its scores against transformers' own Blip2ForImageTextRetrieval forward (ITM and ITC),
the cached Q-Former keys and values, the structure check, and a whole run through it."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import cli, parse_report_html
from pipeline.tiny_models import save_tiny_blip2


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    # two Q-Former layers, cross-attention in the first only (the public checkpoint: every other layer)
    return save_tiny_blip2(tmp_path_factory.mktemp("models") / "tiny-blip2", cross_attention_frequency=2)


def own_forward(model_dir, pixels, tokens, itm: bool) -> torch.Tensor:
    """transformers' Blip2ForImageTextRetrieval on B (image, caption) pairs, the pair's image repeated per pair."""
    from transformers import Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    use_image_text_matching_head=itm)
    logits = out.logits_per_image
    return logits[:, 1] - logits[:, 0] if itm else torch.diagonal(logits)   # ITC: [B images, B texts]


def pairs(teacher, n_images=3):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(n_images, 3, 32, 32, generator=g)
    index = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 2])        # not grouped: the rewrite groups and restores the order
    tokens = teacher.tokenize([f"caption {i} " + "word " * i for i in range(len(index))])   # padding differs
    return pixels, index, tokens


@pytest.mark.parametrize("kv_cache", [True, False])
def test_itm_scores_equal_transformers_forward(tiny_blip2, kv_cache):
    from pipeline.teachers import load_teacher

    teacher = load_teacher(str(tiny_blip2), kv_cache=kv_cache)
    pixels, index, tokens = pairs(teacher)
    with torch.no_grad():
        got = teacher.score_indexed(teacher.encode_images(pixels, None), index, tokens)
    want = own_forward(tiny_blip2, pixels[index], tokens, itm=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert want.std() > 1e-4   # the pairs' scores differ: the comparison is not between constants


def test_itc_equals_transformers_forward(tiny_blip2):
    from pipeline.teachers import load_teacher

    teacher = load_teacher(str(tiny_blip2))
    pixels, index, tokens = pairs(teacher)
    with torch.no_grad():
        got = teacher.itc_indexed(teacher.encode_images(pixels, None), index, tokens)
    want = own_forward(tiny_blip2, pixels[index], tokens, itm=False)   # the max over query tokens of the cosine
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert want.std() > 1e-4


def test_keys_and_values_are_computed_once_per_image_of_a_batch(tiny_blip2):
    from pipeline.teachers import load_teacher

    teacher = load_teacher(str(tiny_blip2))
    pixels, index, tokens = pairs(teacher)
    calls = []
    key = teacher.model.qformer.encoder.layer[0].crossattention.attention.key
    handle = key.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        teacher.score_indexed(teacher.encode_images(pixels, None), index, tokens)
    handle.remove()
    assert calls == [3]   # three images, not nine pairs
    assert not teacher.model.qformer.encoder.layer[1].has_cross_attention


def test_a_model_whose_structure_differs_is_refused(tiny_blip2, monkeypatch):
    from transformers.models.blip_2 import modeling_blip_2

    from pipeline.errors import PipelineError
    from pipeline.teachers import load_teacher

    monkeypatch.delattr(modeling_blip_2.Blip2QFormerLayer, "feed_forward_chunk_query")
    with pytest.raises(PipelineError, match=r"BLIP-2 .*missing: qformer.encoder.layer\[0\].feed_forward_chunk_query"
                                            r".*--no-kv-cache"):
        load_teacher(str(tiny_blip2))


def test_max_length_and_vocabulary_come_from_the_qformer(tiny_blip2):
    from pipeline.teachers import load_teacher

    teacher = load_teacher(str(tiny_blip2))
    assert teacher.max_length == 64   # the Q-Former's positions, not the (absent) language model's 2048


def test_bf16_keeps_the_qformer_in_fp32(tiny_blip2):
    from pipeline.teachers import load_teacher

    teacher = load_teacher(str(tiny_blip2), dtype=torch.bfloat16)
    assert teacher.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert teacher.model.qformer.layernorm.weight.dtype == torch.float32
    assert teacher.model.query_tokens.dtype == torch.float32
    pixels, index, tokens = pairs(teacher)
    with torch.no_grad():
        got = teacher.score_indexed(teacher.encode_images(pixels, None), index, tokens)
    want = own_forward(tiny_blip2, pixels[index], tokens, itm=True)
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2)   # bf16 vision tower: rounding, not a different model


def test_a_run_with_a_blip2_teacher(tmp_path, mined_run, tiny_blip2, tiny_clip):
    """score-teacher -> distill -> evaluate (re-ranked by BLIP-2) -> report, and train-teacher on its ITM head."""
    run = tmp_path / "run"
    shutil.copytree(mined_run, run)
    shutil.rmtree(run / "teacher", ignore_errors=True)
    cli("score-teacher", "--run", run, "--teacher", tiny_blip2, "--score", "itm+itc", "--itc-weight", "2",
        "--images-per-shard", "8")
    manifest = json.loads((run / "teacher" / "manifest.json").read_text())
    rows = [r for f in sorted((run / "teacher").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert rows and all(np.isfinite(r["teacher_scores"]).all() for r in rows)
    assert manifest["identity"]["teacher"]["files"]

    cli("distill", "--run", run, "--max-steps", "2", "--batch-size", "8", "--num-negatives", "4", "--device", "cpu")
    train = json.loads((run / "mine" / "manifest.json").read_text())["config"]["data"]
    cli("evaluate", "--run", run, "--data", train, "--allow-overlap", "--rerank-teacher", tiny_blip2,
        "--k-test", "4", "--device", "cpu")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["rerank"]["rsum"] >= 0
    cli("report", "--run", run)
    assert parse_report_html(run / "report" / "index.html").sections

    cli("train-teacher", "--run", run, "--teacher", tiny_blip2, "--train", "head", "--max-steps", "2",
        "--batch-size", "8", "--lr", "1e-3", "--device", "cpu")
    assert (run / "teacher-train" / "final" / "config.json").exists()
    result = cli("train-teacher", "--run", run, "--teacher", tiny_blip2, "--itc-weight", "1", "--max-steps", "1",
                 "--out", tmp_path / "itc", expect=2)
    assert "--itc-weight" in result.output and "Blip2ForImageTextRetrieval" in result.output
