"""Prompts, action parsing and the LLM policy with a tiny random model."""

import pytest
import torch
from tensordict import NonTensorStack, TensorDict

from gigpo_torchrl.policy.actor import LLMPolicy
from gigpo_torchrl.policy.parsing import parse_action
from gigpo_torchrl.policy.prompts import PromptBuilder

ACTIONS = ["up", "down", "push box left"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("<action>down</action>", "down"),
        ("I think <ACTION>  Push   Box LEFT </action> is best", "push box left"),
        ("<action>up", "up"),  # generation stopped before the closing tag
        ("  UP  ", "up"),
        ("2", "down"),
        ("<action>(3)</action>", "push box left"),
        ("3.", "push box left"),
        ("4", "4"),  # out of the list: left for the env to reject
        ("jump", "jump"),
        ("", ""),
        ("<action>up</action><action>down</action>", "up"),
        ("1. down\n2. up", "down"),  # a list line copied: the name wins over the number
        ("3: up", "up"),
        ("I will go down.\nThen up.", "down"),  # one action named in the first line
        ("up or down", "up or down"),  # two named: ambiguous, invalid
        ("upstairs", "upstairs"),  # not a whole word
    ],
)
def test_parse_action(reply, expected):
    assert parse_action(reply, ACTIONS) == expected


def test_parse_action_without_an_action_list_keeps_the_text():
    assert parse_action("<action> open the door </action>") == "open the door"
    assert parse_action("look") == "look"


def test_prompts_keep_the_same_shape_and_the_last_k_steps():
    builder = PromptBuilder(memory=2)
    history = [("obs A", "up"), ("obs B", "down"), ("obs C", "up")]
    messages = builder.messages("Push the box.", "obs D", history, ACTIONS)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "obs A" not in user and "Step 2:\nObservation:\nobs B\nAction: down" in user
    assert "Step 3:" in user and "Current observation:\nobs D" in user
    assert user.endswith(
        "Choose one action:\n1. up\n2. down\n3. push box left\nAnswer with the action only."
    )
    first = builder.messages("Push the box.", "obs A", [], ACTIONS)
    assert [m["role"] for m in first] == ["system", "user"]
    assert "Recent steps" not in first[1]["content"]
    assert "Recent steps" not in PromptBuilder(memory=0).user_message("t", "o", history)
    with pytest.raises(ValueError, match="memory=-1"):
        PromptBuilder(memory=-1)


def test_policy_log_probs_equal_teacher_forcing(tiny):
    tokenizer, model = tiny
    policy = LLMPolicy(model, tokenizer, max_new_tokens=6, forbid_special=True)
    builder = PromptBuilder()
    prompts = [
        builder.render(tokenizer, builder.messages("task", obs, [], ACTIONS))
        for obs in ("a", "a longer observation")
    ]
    torch.manual_seed(0)
    out = policy(TensorDict({("text", "prompt"): NonTensorStack.from_list(prompts)}, [2]))
    for i in range(2):
        full = out[i]["tokens", "full"]
        prompt = out[i]["tokens", "prompt"]
        response = out[i]["tokens", "response"]
        assert torch.equal(full, torch.cat([prompt, response]))
        assert tokenizer.decode(prompt) == prompts[i]
        with torch.no_grad():
            logits = model(full[None]).logits[0, :-1]
        expected = logits.log_softmax(-1).gather(-1, full[1:, None]).squeeze(-1)
        got = out[i]["log_probs", "full"]
        torch.testing.assert_close(
            got[-len(response) :], expected[-len(response) :], atol=1e-4, rtol=0
        )
        assert out[i]["text", "response"] == tokenizer.decode(response, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ],
)
def test_policy_rejects_bad_settings(tiny, kwargs, message):
    tokenizer, model = tiny
    with pytest.raises(ValueError, match=message):
        LLMPolicy(model, tokenizer, **kwargs)
