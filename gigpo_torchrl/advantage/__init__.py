"""Key-driven torchrl modules: the GIGPO value estimator and its replay-buffer transform."""

from gigpo_torchrl.advantage.estimator import GIGPOAdvantage, read_rows
from gigpo_torchrl.advantage.transform import GIGPOTransform

__all__ = ["GIGPOAdvantage", "GIGPOTransform", "read_rows"]
