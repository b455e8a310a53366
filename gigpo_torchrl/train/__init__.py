"""Training: ``TrainConfig``, ``Trainer`` and the ``gigpo-train`` command line."""

from gigpo_torchrl.train.config import TrainConfig
from gigpo_torchrl.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
