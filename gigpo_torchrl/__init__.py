"""gigpo-torchrl: train LLM agents in multi-step text environments with GIGPO on TorchRL."""

from gigpo_torchrl.advantage import GIGPOAdvantage, GIGPOTransform

__version__ = "0.1.0"

__all__ = ["GIGPOAdvantage", "GIGPOTransform", "__version__"]
