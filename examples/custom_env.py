"""Register your own text environment and train on it (tiny model, CPU, ~30 seconds).

The environment is a number line: walk from 0 to a target chosen by the seed. States recur
(stepping left then right comes back), which is what GIGPO's step-level credit feeds on.

    python examples/custom_env.py

The same file trains from the command line, without packaging it: ``--env FILE:NAME``
imports the file (or ``--env MODULE:NAME`` a module importable from the current folder),
whose ``register_env`` call registers NAME. Importing it does not train: the training below
runs only when the file is run as a script.

    gigpo-train --env examples/custom_env.py:number-line --model tiny --iterations 3
"""

from gigpo_torchrl.envs import InvalidAction, StepResult, TextGame, make_env, register_env
from gigpo_torchrl.train import TrainConfig, Trainer


@register_env("number-line", max_steps=8)
class NumberLine(TextGame):
    """Walk along a number line from 0 to the target; actions: left, right. Reward 1 at the
    target, -0.05 per step; at most 8 steps."""

    task = "Reach the target number by stepping left or right."

    def reset(self, seed: int) -> str:
        self.position, self.target = 0, seed % 5 + 1
        return self.describe()

    def describe(self) -> str:
        return f"You are at {self.position}. The target is {self.target}."

    def step(self, action: str) -> StepResult:
        if action not in ("left", "right"):
            raise InvalidAction("say left or right")
        self.position += 1 if action == "right" else -1
        done = self.position == self.target
        return StepResult(
            self.describe(), reward=1.0 if done else -0.05, terminated=done, success=done
        )

    def admissible_actions(self) -> list[str]:
        return ["left", "right"]

    def state(self) -> tuple[int, int]:
        # the anchor: the same position towards the same target is the same state (the
        # target is part of it, so tasks with different targets are different tasks)
        return self.position, self.target


if __name__ == "__main__":
    # The registered name works everywhere an env name does.
    env = make_env("number-line", batch_size=2, seed=0)
    print(env.reset()["observation"])

    history = Trainer(
        TrainConfig(
            model="tiny",
            env="number-line",
            iterations=3,
            num_groups=2,
            num_generations=4,
            max_turns=None,
            max_new_tokens=4,
            val_every=3,
            run_name="number-line",
            overwrite=True,  # running the example again replaces its run
        )
    ).train()
    print(history[-1])
