"""Losses: pure tensor functions, each a mean over rows (queries). See each module's docstring."""
from .cprd import cprd_loss
from .itc import itc_loss
from .kl import kl_loss
from .listmle import listmle_loss
from .margin_mse import margin_mse_loss
from .ranknet import ranknet_loss

DISTILL_LOSSES = ("cprd", "listmle", "kl", "margin-mse", "ranknet", "none")

__all__ = ["itc_loss", "cprd_loss", "listmle_loss", "kl_loss", "margin_mse_loss", "ranknet_loss", "DISTILL_LOSSES"]
