"""Validation while training: the numbers are evaluate_retrieval's, and the random state is left untouched."""
import pytest
import torch

import pipeline.validation as validation

from conftest import write_albef_corpus
from pipeline.corpus import read_corpus
from pipeline.errors import PipelineError
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


def test_a_batch_that_does_not_fit_the_gpu_is_halved(tmp_path, tiny_clip, monkeypatch):
    corpus = read_corpus(str(write_albef_corpus(tmp_path / "val", n_images=10)), log=lambda *_: None)
    enc = DualEncoder(str(tiny_clip))
    want = evaluate_retrieval(corpus, enc, batch_size=64, progress=False)
    tried = []

    def fits_up_to_16(*args, teacher_image_batch, **kwargs):
        tried.append(args[5])                      # evaluate_retrieval's batch_size
        assert teacher_image_batch == args[5]      # the teacher's batch halves with the student's
        if args[5] > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return evaluate_retrieval(*args, progress=False)

    monkeypatch.setattr(validation, "evaluate_retrieval", fits_up_to_16)
    val = Validator(corpus)
    row = val(enc)
    assert tried == [64, 32, 16]
    assert row["val_rsum"] == pytest.approx(want["rsum"], abs=1e-6)    # the same ranks at a smaller batch
    val(enc)                                                             # later validations start where it fit
    assert tried == [64, 32, 16, 16]


def test_out_of_gpu_memory_at_one_item_is_one_line(tmp_path, tiny_clip, monkeypatch):
    corpus = read_corpus(str(write_albef_corpus(tmp_path / "val", n_images=4)), log=lambda *_: None)
    tried = []

    def never_fits(*args, **kwargs):
        tried.append(args[5])
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(validation, "evaluate_retrieval", never_fits)
    enc = DualEncoder(str(tiny_clip))
    enc.model.train()
    with pytest.raises(PipelineError, match=r"^out of GPU memory validating, at one item per batch, beside the "
                                            r"training state: use less$"):
        Validator(corpus, out_of_memory="use less")(enc)
    assert tried == [64, 32, 16, 8, 4, 2, 1]
    assert enc.model.training                                   # back in training mode all the same
