"""Action parsing: from a model's reply to the action text sent to the environment."""

from __future__ import annotations

import re
from collections.abc import Sequence

_TAG = re.compile(r"<action>(.*?)(?:</action>|$)", re.IGNORECASE | re.DOTALL)
_NUMBER = re.compile(r"^\(?#?(\d+)[.):]?$")
_NUMBERED = re.compile(r"^\(?#?\d+[.):]\s*(.+)$")


def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()


def parse_action(reply: str, admissible: Sequence[str] = ()) -> str:
    """The action a reply names.

    Looks, in order, for the content of the first ``<action>...</action>`` tag (a missing
    closing tag is tolerated), else the whole reply; then, when the env lists admissible
    actions, maps it to one of them, trying in order: an exact match ignoring case and
    spacing; a number choosing from the numbered list (``2``, ``2.``, ``(2)``); a list line
    copied whole (``2. down``: the name wins over a wrong number); the first line naming
    exactly one admissible action as a whole word (``I go left.``). A reply that names
    nothing admissible, or several, comes back as its stripped text, which the environment
    then rejects as an invalid action (so the agent sees why). Without an admissible list,
    the stripped text is the action.

    Args:
        reply: the model's generated text.
        admissible: the actions valid now, in the order shown to the model.

    Returns:
        The action text.
    """
    tagged = _TAG.search(reply)
    candidate = (tagged.group(1) if tagged else reply).strip()
    if not admissible:
        return candidate
    wanted = _squash(candidate).rstrip(".")
    for action in admissible:
        if _squash(action) == wanted:
            return action
    number = _NUMBER.match(wanted)
    if number and 1 <= int(number.group(1)) <= len(admissible):
        return admissible[int(number.group(1)) - 1]
    # "2. down" copied from the list: the name decides (small models misnumber).
    first_line = _squash(candidate.split("\n", 1)[0]).rstrip(".")
    numbered = _NUMBERED.match(first_line)
    if numbered:
        for action in admissible:
            if _squash(action) == numbered.group(1).rstrip("."):
                return action
    # One admissible action named in the first line, and no other: that one.
    named = {
        action
        for action in admissible
        if re.search(rf"(?<!\w){re.escape(_squash(action))}(?!\w)", first_line)
    }
    if len(named) == 1:
        return named.pop()
    return candidate
