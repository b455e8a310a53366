"""gigpo_envs: the environments shipped with gigpo-torchrl.

Each one registers itself through gigpo_torchrl's public registration API, exactly as a
user's own environment would.
"""
