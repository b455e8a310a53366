"""LLM policy: prompts, action parsing, the actor, model factories."""

from gigpo_torchrl.policy.tiny_model import make_char_tokenizer, make_tiny_model

__all__ = ["make_char_tokenizer", "make_tiny_model"]
