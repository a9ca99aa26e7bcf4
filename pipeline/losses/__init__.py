"""Losses: pure tensor functions, each a mean over rows (queries), one file each.

The distillation losses also register themselves by name (`registry`); `distill --loss NAME` looks them up.
"""
from . import registry
from .cprd import cprd_loss
from .hard_negatives import hard_negative_loss
from .itc import itc_loss
from .sigmoid import sigmoid_loss
from .kl import kl_loss
from .listmle import listmle_loss
from .margin_mse import margin_mse_loss
from .partial_hinge import partial_hinge_loss
from .partial_ranknet import partial_ranknet_loss
from .ranknet import ranknet_loss
from .registry import DistillInputs, DistillLoss

__all__ = ["itc_loss", "sigmoid_loss", "cprd_loss", "listmle_loss", "kl_loss", "margin_mse_loss", "ranknet_loss",
           "partial_ranknet_loss", "partial_hinge_loss", "hard_negative_loss", "registry", "DistillInputs",
           "DistillLoss"]
