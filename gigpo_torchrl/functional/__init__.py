"""Pure tensor functions behind GIGPO: segments, discounted returns, group normalisation,
anchor keys."""

from gigpo_torchrl.functional.anchors import (
    history_anchor,
    parse_anchor,
    similar_text_anchor,
    text_hashes,
)
from gigpo_torchrl.functional.gigpo import (
    GIGPOOutput,
    anchor_groups,
    check_options,
    check_trajectories,
    episode_advantage,
    gigpo_advantage,
    step_advantage,
    verl_agent_episode_advantage,
)
from gigpo_torchrl.functional.normalize import group_normalize
from gigpo_torchrl.functional.returns import (
    TrajectoryLayout,
    check_done,
    check_finite,
    discounted_returns,
    reverse_discounted_cumsum,
    trajectory_layout,
)
from gigpo_torchrl.functional.segments import (
    dense_ids,
    segment_count,
    segment_ids,
    segment_is_constant,
    segment_mean_std,
    segment_sum,
)

__all__ = [
    "anchor_groups",
    "dense_ids",
    "GIGPOOutput",
    "TrajectoryLayout",
    "check_done",
    "check_finite",
    "check_options",
    "check_trajectories",
    "discounted_returns",
    "episode_advantage",
    "gigpo_advantage",
    "group_normalize",
    "history_anchor",
    "parse_anchor",
    "reverse_discounted_cumsum",
    "segment_count",
    "segment_ids",
    "segment_is_constant",
    "segment_mean_std",
    "segment_sum",
    "similar_text_anchor",
    "step_advantage",
    "text_hashes",
    "trajectory_layout",
    "verl_agent_episode_advantage",
]
