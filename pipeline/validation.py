"""Validation while training: retrieval on a held-out corpus with the student as it is now.

    val = Validator(corpus, teacher, k_test=16, itc_weight=w, cache=ScoreCache(...))
    row = val(encoder)    # {"val_rsum", "val_i2t_R@1", ..., "val_kendall_tau", "val_rerank_rsum"}

With a teacher, each query's top `k_test` is scored by it (the pairs are cached across validations, so later
validations score only the pairs the student newly ranks there) for the rank agreement the loss optimises.
Validation runs beside the training state on the same GPU: a batch that does not fit (the student's or the
teacher's) is retried at half the size (and later validations keep it), down to one item, before the run stops
with one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .corpus import Corpus
from .errors import PipelineError
from .metrics import KS
from .retrieval import ScoreCache, evaluate_retrieval


def flatten(metrics: dict, prefix: str = "val_") -> dict[str, float]:
    """evaluate_retrieval's nested metrics as flat `val_*` numbers for metrics.jsonl and trackers."""
    row = {f"{prefix}rsum": metrics["rsum"]}
    for d in ("i2t", "t2i"):
        row.update({f"{prefix}{d}_R@{k}": metrics[d][f"R@{k}"] for k in KS})
    if "agreement" in metrics:
        for d in ("i2t", "t2i"):
            row[f"{prefix}{d}_kendall_tau"] = metrics["agreement"][d]["kendall_tau"]
        row[f"{prefix}kendall_tau"] = float(np.nanmean([row[f"{prefix}i2t_kendall_tau"],
                                                        row[f"{prefix}t2i_kendall_tau"]]))
        row[f"{prefix}rerank_rsum"] = metrics["rerank"]["rsum"]
    return row


@dataclass
class Validator:
    corpus: Corpus
    teacher: Optional[Any] = None        # a CrossEncoder, for the rank agreement
    k_test: int = 16
    itc_weight: float = 0.0
    cache: Optional[ScoreCache] = None
    batch_size: int = 64
    # the advice when one item per batch does not fit beside training
    out_of_memory: str = ("the training state leaves no room: rerun without --val-data and with --force (a new run), "
                          "then evaluate the student apart")

    def __call__(self, encoder: Any) -> dict[str, float]:
        """Encoder: a DualEncoder sharing the training model; it is put in eval mode and back."""
        model = encoder.model
        was_training = model.training
        model.eval()
        try:
            # the random state is left as it was (a DataLoader draws a seed): training is the same with or
            # without validation
            with torch.random.fork_rng(devices=[]):
                metrics = self._fitting(encoder)
        finally:
            model.train(was_training)
        return flatten(metrics)

    def _fitting(self, encoder: Any) -> dict:
        """evaluate_retrieval at the largest batch (halving from batch_size) that fits beside training: the
        student's (batch_size images, 4 x as many captions) and the teacher's (as many images, 4 x as many pairs)."""
        while True:
            try:
                return evaluate_retrieval(self.corpus, encoder, self.teacher, self.k_test, self.itc_weight,
                                          self.batch_size, progress=False, cache=self.cache,
                                          teacher_image_batch=self.batch_size)
            except torch.cuda.OutOfMemoryError as e:
                if self.batch_size == 1:
                    raise PipelineError("out of GPU memory validating, at one item per batch, beside the training "
                                        f"state: {self.out_of_memory}") from e
            # outside the handler: the failed attempt's tensors are gone with its traceback
            torch.cuda.empty_cache()
            self.batch_size //= 2
