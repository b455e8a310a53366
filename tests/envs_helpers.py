"""Small TextGames written for the tests, as a user would write them."""

from gigpo_torchrl.envs import InvalidAction, StepResult, TextGame


class Counter(TextGame):
    """Count from ``seed % 3`` up to ``target``: "inc" adds one, "dec" takes one away."""

    task = "Reach the target number."

    def __init__(self, target: int = 3, fail_at: int | None = None):
        self.target = target
        self.fail_at = fail_at

    def reset(self, seed: int) -> str:
        self.n = seed % 3
        return f"n = {self.n}"

    def step(self, action: str) -> StepResult:
        if action == "wait":
            raise InvalidAction("waiting is not allowed")
        self.n += 1 if action == "inc" else -1
        if self.n == self.fail_at:
            raise RuntimeError(f"the counter broke at {self.n}")
        done = self.n == self.target
        return StepResult(f"n = {self.n}", reward=float(done), terminated=done, success=done)

    def admissible_actions(self) -> list[str]:
        return ["inc", "dec", "wait"]

    def state(self) -> int:
        return self.n


class FreeText(TextGame):
    """A game without an action list whose state is only visible in its observation."""

    def reset(self, seed: int) -> str:
        self.words = []
        return "Say something."

    def step(self, action: str) -> StepResult:
        self.words.append(action)
        return StepResult(f"You said:   {' '.join(self.words)}  ", terminated=len(self.words) == 2)


class BadReward(Counter):
    """A Counter whose step at ``fail_at`` returns ``reward`` (None, NaN, inf, ...)."""

    def __init__(self, reward: object, fail_at: int = 2):
        super().__init__()
        self.bad_reward, self.bad_at = reward, fail_at

    def step(self, action: str) -> StepResult:
        result = super().step(action)
        if self.n == self.bad_at:
            result.reward = self.bad_reward
        return result


class Tasks(TextGame):
    """``seed % tasks`` is the task, seen in the initial state; one step ends the episode,
    with a NaN reward when ``nan_reward`` (a faulty game)."""

    task = "Say anything."

    def __init__(self, tasks: int = 10, nan_reward: bool = False):
        self.tasks, self.nan_reward = tasks, nan_reward

    def reset(self, seed: int) -> str:
        self.n = seed % self.tasks
        return f"task {self.n}"

    def step(self, action: str) -> StepResult:
        reward = float("nan") if self.nan_reward else 1.0
        return StepResult("done", reward=reward, terminated=True, success=True)

    def state(self) -> int:
        return self.n
