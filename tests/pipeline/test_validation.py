"""Validation while training: the numbers are evaluate_retrieval's, and the random state is left untouched."""
import pytest
import torch

from conftest import write_albef_corpus
from pipeline.corpus import read_corpus
from pipeline.metrics import KS
from pipeline.models import DualEncoder
from pipeline.retrieval import evaluate_retrieval
from pipeline.validation import Validator


def test_numbers_and_random_state(tmp_path, tiny_clip):
    corpus = read_corpus(str(write_albef_corpus(tmp_path / "val", n_images=10)), log=lambda *_: None)
    enc = DualEncoder(str(tiny_clip))
    enc.model.train()
    torch.manual_seed(3)
    before = torch.get_rng_state()
    row = Validator(corpus)(enc)
    # a DataLoader draws a seed from the global generator: without care, validation would shift training's
    # dropout and sampling
    assert torch.equal(torch.get_rng_state(), before)
    assert enc.model.training                                   # back in training mode
    want = evaluate_retrieval(corpus, enc, progress=False)
    assert row["val_rsum"] == pytest.approx(want["rsum"])
    assert {f"val_{d}_R@{k}" for d in ("i2t", "t2i") for k in KS} <= set(row)
    assert row["val_t2i_R@5"] == pytest.approx(want["t2i"]["R@5"])
