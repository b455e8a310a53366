"""LLM policy: prompts, action parsing, the actor, model factories."""

from gigpo_torchrl.policy.actor import LLMPolicy, scoring_wrapper
from gigpo_torchrl.policy.factory import make_policy
from gigpo_torchrl.policy.models import load_model, load_smollm2
from gigpo_torchrl.policy.parsing import parse_action
from gigpo_torchrl.policy.prompts import PromptBuilder
from gigpo_torchrl.policy.tiny_model import make_char_tokenizer, make_tiny_model

__all__ = [
    "LLMPolicy",
    "PromptBuilder",
    "load_model",
    "load_smollm2",
    "make_char_tokenizer",
    "make_policy",
    "make_tiny_model",
    "parse_action",
    "scoring_wrapper",
]
