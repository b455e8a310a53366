"""Prompts: what the agent reads at each step, always as the same two chat messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant playing a text game."
# Measured with SmolLM2-135M-Instruct: a numbered list closed by this one short instruction
# is answered with a valid action far more often than tag formats or free-form lists.
ANSWER_INSTRUCTION = "Answer with the action only."


@dataclass(frozen=True)
class PromptBuilder:
    """Builds the chat messages of one step.

    Every prompt is exactly ``[system, user]``: the task, the last ``memory`` (observation,
    action) pairs, the current observation and, when the env lists them, the admissible
    actions as a numbered list. Batches therefore never differ in message count (torchrl's
    chat tooling fails on ragged conversations), and long episodes do not grow the prompt
    past ``memory`` steps.

    Attributes:
        system_prompt: the system message.
        memory: number of past (observation, action) pairs shown (0 for none).
    """

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    memory: int = 2

    def __post_init__(self):
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 0:
            raise ValueError(f"memory={self.memory!r} must be a non-negative integer")

    def user_message(
        self,
        task: str,
        observation: str,
        history: Sequence[tuple[str, str]] = (),
        admissible: Sequence[str] = (),
    ) -> str:
        """The user message text of one step (see the class docstring for its parts)."""
        parts = [task] if task else []
        recent = list(history)[-self.memory :] if self.memory else []
        if recent:
            start = len(history) - len(recent) + 1
            lines = [
                f"Step {start + i}:\nObservation:\n{obs}\nAction: {action}"
                for i, (obs, action) in enumerate(recent)
            ]
            parts.append("Recent steps:\n" + "\n\n".join(lines))
        parts.append(f"Current observation:\n{observation}")
        if admissible:
            numbered = "\n".join(f"{i}. {a}" for i, a in enumerate(admissible, 1))
            parts.append(f"Choose one action:\n{numbered}\n{ANSWER_INSTRUCTION}")
        else:
            parts.append(ANSWER_INSTRUCTION)
        return "\n\n".join(parts)

    def messages(
        self,
        task: str,
        observation: str,
        history: Sequence[tuple[str, str]] = (),
        admissible: Sequence[str] = (),
    ) -> list[dict[str, str]]:
        """``[{"role": "system", ...}, {"role": "user", ...}]`` for one step."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_message(task, observation, history, admissible)},
        ]

    def render(self, tokenizer, messages: list[dict[str, str]]) -> str:
        """The prompt text: ``messages`` through the tokenizer's chat template, ready to reply."""
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
