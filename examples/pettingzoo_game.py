"""Your own two-player game, written for PettingZoo, trained with GIGPO (tiny model, CPU).

The game is Nim: a pile of sticks, each player takes 1, 2 or 3 in turn, and whoever takes
the last stick wins. It is a standard PettingZoo AEC environment (``reset``, ``step``,
``observe``, an ``action_mask`` in each observation), so any PettingZoo tool works on it.
``PettingZooTextGame`` lets the LLM play one seat in text against an opponent policy (here
the random one); ``register_env`` makes it a name the whole toolkit takes. Pile sizes recur
across the attempts of a group, which is what GIGPO's step-level credit feeds on.

    python examples/pettingzoo_game.py

or, from the command line (importing this file registers the game; it trains only when run
as a script):

    gigpo-train --env examples/pettingzoo_game.py:nim --model tiny --iterations 3
"""

import numpy as np
from gymnasium import spaces
from pettingzoo import AECEnv
from pettingzoo.utils import AgentSelector

from gigpo_torchrl.envs import PettingZooTextGame, make_env, register_env
from gigpo_torchrl.train import TrainConfig, Trainer

MAX_TAKE = 3


class Nim(AECEnv):
    """Nim for two players in PettingZoo's AEC API: +1 to the winner, -1 to the loser."""

    metadata = {"name": "nim_v0", "render_modes": ["ansi"], "is_parallelizable": False}

    def __init__(self, largest_pile: int = 9, render_mode: str | None = "ansi"):
        super().__init__()
        self.render_mode = render_mode
        self.largest_pile = largest_pile
        self.possible_agents = ["player_0", "player_1"]
        self.pile = 0
        observation = spaces.Dict(
            {
                "observation": spaces.Box(0, largest_pile, (1,), dtype=np.int64),
                "action_mask": spaces.MultiBinary(MAX_TAKE),
            }
        )
        self.observation_spaces = dict.fromkeys(self.possible_agents, observation)
        # action i takes i + 1 sticks
        self.action_spaces = dict.fromkeys(self.possible_agents, spaces.Discrete(MAX_TAKE))

    def observation_space(self, agent):
        return self.observation_spaces[agent]

    def action_space(self, agent):
        return self.action_spaces[agent]

    def observe(self, agent):
        mask = np.zeros(MAX_TAKE, dtype=np.int8)
        if agent == self.agent_selection:
            mask[: min(MAX_TAKE, self.pile)] = 1
        return {"observation": np.array([self.pile]), "action_mask": mask}

    def render(self):
        return f"Sticks left: {self.pile}."

    def close(self):
        pass  # nothing to release

    def reset(self, seed=None, options=None):
        rng = np.random.default_rng(seed)
        self.pile = int(rng.integers(MAX_TAKE + 2, self.largest_pile + 1))
        self.agents = self.possible_agents[:]
        self.rewards = dict.fromkeys(self.agents, 0)
        self._cumulative_rewards = dict.fromkeys(self.agents, 0)
        self.terminations = dict.fromkeys(self.agents, False)
        self.truncations = dict.fromkeys(self.agents, False)
        self.infos = {agent: {} for agent in self.agents}
        self._selector = AgentSelector(self.agents)
        self.agent_selection = self._selector.reset()

    def step(self, action):
        agent = self.agent_selection
        if self.terminations[agent] or self.truncations[agent]:
            return self._was_dead_step(action)
        self._clear_rewards()
        self.pile -= int(action) + 1
        if self.pile <= 0:  # took the last stick: won
            other = next(a for a in self.agents if a != agent)
            self.rewards[agent], self.rewards[other] = 1, -1
            self.terminations = dict.fromkeys(self.agents, True)
        self._accumulate_rewards()
        self.agent_selection = self._selector.next()


@register_env("nim", max_steps=8)
def nim() -> PettingZooTextGame:
    """Nim against a random opponent: take 1, 2 or 3 sticks; taking the last one wins."""
    return PettingZooTextGame(
        Nim,
        render=lambda env: env.unwrapped.render(),
        action_names=["take 1", "take 2", "take 3"],
        state=lambda env: (env.unwrapped.pile, env.agent_selection if env.agents else None),
        task="Nim: take 1, 2 or 3 sticks in turn; whoever takes the last stick wins.",
    )


if __name__ == "__main__":
    env = make_env("nim", batch_size=1, seed=0)
    print(env.reset()["observation"][0])

    history = Trainer(
        TrainConfig(
            model="tiny",
            env="nim",
            iterations=2,
            num_groups=2,
            num_generations=4,
            max_turns=None,
            max_new_tokens=8,
            val_every=2,
            val_groups=2,
            run_name="nim",
            overwrite=True,  # running the example again replaces its run
        )
    ).train()
    print(history[-1])
