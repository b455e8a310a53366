"""Losses: ``GIGPOLoss``, the clipped-ratio objective over each step's reply tokens."""

from gigpo_torchrl.objectives.reply_loss import LOSS_AGG_MODES, GIGPOLoss, token_weights

__all__ = ["LOSS_AGG_MODES", "GIGPOLoss", "token_weights"]
