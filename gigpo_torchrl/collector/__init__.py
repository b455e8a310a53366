"""Group rollouts: B tasks × N generations of multi-step episodes as flat step rows."""

from gigpo_torchrl.collector.group_collector import GroupCollector

__all__ = ["GroupCollector"]
