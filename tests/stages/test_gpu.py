"""GPU paths: skipped without CUDA. They compare each stage on the GPU with the same stage on the CPU."""
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rows(run, stage):
    folder = run / stage / ("candidates" if stage == "mine" else "")
    return [r for f in sorted(folder.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_mine_on_cuda_matches_cpu(tmp_path, corpus_file, tiny_clip):
    for dev in ("cpu", "cuda"):
        cli("mine", "--run", tmp_path / dev, "--data", corpus_file, "--student", tiny_clip, "--k", "6", "--device", dev)
    a, b = _rows(tmp_path / "cpu", "mine"), _rows(tmp_path / "cuda", "mine")
    np.testing.assert_allclose([r["student_scores"] for r in a], [r["student_scores"] for r in b], atol=1e-4)


def test_score_teacher_bf16_on_cuda_is_close_to_fp32(tmp_path, mined_run, tiny_blip):
    for dtype in ("fp32", "bf16"):
        shutil.copytree(mined_run, tmp_path / dtype)
        cli("score-teacher", "--run", tmp_path / dtype, "--teacher", tiny_blip, "--device", "cuda", "--dtype", dtype)
    a = np.concatenate([r["teacher_scores"] for r in _rows(tmp_path / "fp32", "teacher")])
    b = np.concatenate([r["teacher_scores"] for r in _rows(tmp_path / "bf16", "teacher")])
    assert np.corrcoef(a, b)[0, 1] > 0.99


@pytest.mark.parametrize("extra", [(), ("--grad-checkpointing",)])
def test_distill_bf16_on_cuda(tmp_path, scored_run, extra):
    shutil.copytree(scored_run, tmp_path / "run")
    cli("distill", "--run", tmp_path / "run", "--num-negatives", "5", "--batch-size", "16", "--max-steps", "3",
        "--mixed-precision", "bf16", "--device", "cuda", *extra)
    assert (tmp_path / "run" / "distill" / "final" / "model.safetensors").exists()
