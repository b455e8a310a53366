"""Ray workers for :class:`~gigpo_torchrl.collector.GroupCollector`: env shards and replicas.

Two kinds of workers, each optional (``pip install 'gigpo-torchrl[ray]'``):

- **Environment shards.** :class:`ShardedTextEnv` is a torchrl ``EnvBase`` with the specs,
  keys and semantics of :class:`~gigpo_torchrl.envs.TextEnv` whose B games live in
  ``num_workers`` Ray actors (:class:`EnvShard`), each holding a ``TextEnv`` over a
  contiguous share of the batch. ``reset`` and ``step`` send every shard its share at once
  and gather the outputs in element order, so the games step in parallel and the outputs
  are those of one ``TextEnv`` over the whole batch: each element is reset with its own
  seed, seeds drawn by a seedless ``reset`` come from this env's RNG exactly as
  ``TextEnv`` draws them.
- **Generation replicas.** :class:`PolicyReplicas` holds R Ray actors
  (:class:`PolicyReplica`), each with a copy of an :class:`~gigpo_torchrl.policy.LLMPolicy`
  (transformers, on CPU or on a GPU the actor was given). A replica serves a fixed share of
  the environments (a *lane*: whole episode groups); :meth:`PolicyReplicas.update_weights`
  pushes the learner's weights to all of them through Ray's object store (one copy, read
  by every replica) after each update.

Code the workers need (the env factory, the game classes, the policy) is sent pickled by
cloudpickle; the driver's ``sys.path`` goes along so that modules importable on the driver
(a test module, a ``module:name`` env) import in the workers too. On several machines those
paths must exist on every node (the same checkout or installed packages).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorStack, TensorDict, TensorDictBase
from torchrl.envs import EnvBase

from gigpo_torchrl.envs.seeding import check_batch_size, check_seed, check_seeds
from gigpo_torchrl.envs.text_env import TextEnv
from gigpo_torchrl.policy.actor import policy_inputs

#: keys of a TextEnv output that hold one Python object per element (strings, tuples)
TEXT_KEYS = ("observation", "task", "admissible_actions", "error")


def require_ray():
    """The ``ray`` module; ``ImportError`` saying how to install it when it is missing."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "Ray workers (num_env_workers, num_policy_replicas) need Ray: "
            "pip install 'gigpo-torchrl[ray]'"
        ) from error
    return ray


def init_ray(address: str | None = None):
    """Connect to the Ray cluster at ``address`` (``"auto"``: the one ``ray start`` made on
    this machine), or start a local Ray instance without a dashboard when ``address`` is
    None; nothing happens when Ray is already initialised. Returns the ``ray`` module."""
    ray = require_ray()
    if not ray.is_initialized():
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address, log_to_driver=True)
    return ray


def _ray_running() -> bool:
    """Whether Ray is initialised (a call such as ``ray.get`` would otherwise start it)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _driver_paths() -> list[str]:
    return [os.path.abspath(p) for p in sys.path]


def _extend_path(paths: Sequence[str]) -> None:
    """Make what the driver imports importable here (appended: the worker's own go first)."""
    for path in paths:
        if path not in sys.path and os.path.exists(path):
            sys.path.append(path)


def _pickled(obj: Any) -> bytes:
    """``obj`` as bytes: cloudpickle (classes and functions of ``__main__`` by value) through
    ``torch.save``, so that tensors on a GPU load on the worker's own device."""
    from ray import cloudpickle

    buffer = io.BytesIO()
    torch.save(obj, buffer, pickle_module=cloudpickle)
    return buffer.getvalue()


def _unpickled(data: bytes, device: str | torch.device = "cpu") -> Any:
    # weights_only=False: the bytes come from this run's own driver (env factory, policy)
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` contiguous sizes differing by at most one."""
    return [len(a) for a in np.array_split(np.arange(total), parts)]


# -- environment shards --------------------------------------------------------------------


def _plain(td: TensorDictBase) -> dict:
    """A TextEnv output as a dict of tensors and per-element lists (compact to send)."""
    keys = list(td.keys())  # iterating a TensorDict itself walks its batch dimension
    return {
        key: (td.get(key).tolist() if key in TEXT_KEYS else td.get(key))
        for key in keys
        if key in TEXT_KEYS or isinstance(td.get(key), torch.Tensor)
    }


def _merged(parts: Sequence[dict], batch: int) -> TensorDict:
    """The shards' outputs, in element order, as one TextEnv output of ``batch`` elements."""
    out = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if key in TEXT_KEYS:
            out[key] = NonTensorStack.from_list([v for part in values for v in part])
        else:
            out[key] = torch.cat(values)
    return TensorDict(out, batch_size=[batch])


class EnvShard:
    """A Ray actor's body: a ``TextEnv`` over one share of the collector's batch.

    It runs the ``TextEnv``'s own ``_reset``/``_step`` (the game logic); the torchrl
    ``EnvBase`` wrapping happens once, in the driver's :class:`ShardedTextEnv`.
    """

    def __init__(self, factory: bytes, batch_size: int, paths: Sequence[str]):
        _extend_path(paths)
        torch.set_num_threads(1)  # games are Python; torch only packs their outputs
        self.env = _unpickled(factory)(batch_size)
        if tuple(self.env.batch_size) != (batch_size,):
            raise ValueError(
                f"the env factory made batch size {tuple(self.env.batch_size)}, expected "
                f"{batch_size}"
            )

    def info(self) -> dict:
        env = self.env
        return {
            "name": getattr(env, "name", type(env).__name__),
            "raw_actions": list(getattr(env, "raw_actions", None) or [False] * env.batch_size[0]),
            "max_steps": getattr(env, "max_steps", None),
            "invalid_action_penalty": getattr(env, "invalid_action_penalty", None),
        }

    def reset(self, seeds: list[int], mask: list[bool] | None) -> dict:
        n = self.env.batch_size[0]
        td = TensorDict({"seed": torch.tensor(seeds, dtype=torch.long)}, [n])
        if mask is not None:
            td["_reset"] = torch.tensor(mask, dtype=torch.bool).reshape(n, 1)
        return _plain(self.env._reset(td))

    def step(self, actions: list) -> dict:
        n = self.env.batch_size[0]
        td = TensorDict({"action_text": NonTensorStack.from_list(list(actions))}, [n])
        return _plain(self.env._step(td))

    def env_errors(self) -> int:
        return int(getattr(self.env, "env_errors", 0))

    def close(self) -> None:
        self.env.close(raise_if_closed=False)


class _LocalShard:
    """An :class:`EnvShard` in this process, with the same calls (results, not futures)."""

    def __init__(self, factory: Callable[[int], TextEnv], batch_size: int):
        self._shard = EnvShard.__new__(EnvShard)
        self._shard.env = factory(batch_size)

    def __getattr__(self, name):
        return getattr(self._shard, name)


class ShardedTextEnv(EnvBase):
    """A :class:`~gigpo_torchrl.envs.TextEnv` whose games are split over shards.

    Same specs, keys and semantics as a ``TextEnv`` of the whole batch (its output is the
    shards' outputs concatenated in element order); ``reset``/``step`` dispatch every
    shard's share first and then gather, so remote shards step in parallel.

    Args:
        factory: ``(shard_batch_size) -> TextEnv``, called once per shard (in the shard's
            worker for Ray shards).
        shard_sizes: elements per shard, in element order (their sum is the batch size B).

    Keyword Args:
        ray: shards are Ray actors (:class:`EnvShard`) when true, ``TextEnv``\\ s in this
            process otherwise (what lanes of generation replicas use without env workers).
        actor_options: ``ray.remote`` options of each shard actor (default: spread them over
            the cluster's nodes).
        seed: seeds the RNG drawing the seeds of a seedless ``reset`` (as ``TextEnv``'s).
    """

    #: the same specs as a TextEnv of this batch size
    _make_specs = TextEnv._make_specs

    def __init__(
        self,
        factory: Callable[[int], TextEnv],
        shard_sizes: Sequence[int],
        *,
        ray: bool = True,
        actor_options: dict | None = None,
        seed: int | None = None,
    ):
        sizes = [check_batch_size(s) for s in shard_sizes]
        if not sizes:
            raise ValueError("shard_sizes must name at least one shard")
        batch = sum(sizes)
        super().__init__(batch_size=torch.Size([batch]))
        self.shard_sizes = sizes
        self.offsets = np.cumsum([0, *sizes]).tolist()
        self.remote = bool(ray)
        if self.remote:
            ray_module = require_ray()
            options = {"scheduling_strategy": "SPREAD", **(actor_options or {})}
            actor = ray_module.remote(EnvShard).options(**options)
            payload, paths = _pickled(factory), _driver_paths()
            self.shards = [actor.remote(payload, size, paths) for size in sizes]
        else:
            self.shards = [_LocalShard(factory, size) for size in sizes]
        infos = self._gather([self._call(shard, "info") for shard in self.shards])
        self.name = infos[0]["name"]
        self.max_steps = infos[0]["max_steps"]
        self.invalid_action_penalty = infos[0]["invalid_action_penalty"]
        self._raw_actions = [flag for info in infos for flag in info["raw_actions"]]
        self._rng = np.random.default_rng(None if seed is None else check_seed(seed))
        self._make_specs()

    def __repr__(self) -> str:
        where = "Ray actors" if self.remote else "local"
        return (
            f"ShardedTextEnv({self.name!r}, batch_size={self.batch_size[0]}, "
            f"shards={self.shard_sizes} ({where}))"
        )

    def _gather(self, results: list) -> list:
        if self.remote:
            import ray

            return ray.get(results)
        return results

    def _call(self, shard, method: str, *args):
        """Start ``method`` on a shard: a Ray future, or the result for a local shard."""
        call = getattr(shard, method)
        return call.remote(*args) if self.remote else call(*args)

    @property
    def raw_actions(self) -> list[bool]:
        return list(self._raw_actions)

    @property
    def env_errors(self) -> int:
        """Episodes ended by a game failure since the shards were made, all shards together."""
        return sum(self._gather([self._call(s, "env_errors") for s in self.shards]))

    def _set_seed(self, seed: int | None) -> None:
        self._rng = np.random.default_rng(None if seed is None else check_seed(seed))

    def _reset(self, tensordict: TensorDictBase | None, **kwargs) -> TensorDict:
        b = self.batch_size[0]
        mask = None if tensordict is None else tensordict.get("_reset", None)
        which = range(b) if mask is None else torch.nonzero(mask.reshape(b)).reshape(-1).tolist()
        given = None if tensordict is None else tensordict.get("seed", None)
        seeds = [0] * b
        if given is not None:
            seeds = check_seeds(given, b)
        else:  # drawn here, in TextEnv's order, so that shards change nothing
            for i in which:
                seeds[i] = int(self._rng.integers(2**31))
        flags = None if mask is None else mask.reshape(b).tolist()
        calls = [
            self._call(
                shard,
                "reset",
                [int(s) for s in seeds[lo:hi]],
                None if flags is None else flags[lo:hi],
            )
            for shard, lo, hi in zip(self.shards, self.offsets[:-1], self.offsets[1:], strict=True)
        ]
        return _merged(self._gather(calls), b).exclude("reward")

    def _step(self, tensordict: TensorDictBase) -> TensorDict:
        from gigpo_torchrl.envs.text_env import _as_action_list

        b = self.batch_size[0]
        actions = _as_action_list(tensordict.get("action_text"), b)
        calls = [
            self._call(shard, "step", actions[lo:hi])
            for shard, lo, hi in zip(self.shards, self.offsets[:-1], self.offsets[1:], strict=True)
        ]
        return _merged(self._gather(calls), b)

    def step_shards(self, first: int, last: int, actions: list) -> TensorDict:
        """Step shards ``first .. last - 1`` only (one lane of the collector), with one
        action per element they hold; returns their merged ``next`` outputs. Lanes own
        disjoint shards, so lanes may call this concurrently from threads."""
        lo, offsets = self.offsets[first], self.offsets
        calls = [
            self._call(self.shards[k], "step", actions[offsets[k] - lo : offsets[k + 1] - lo])
            for k in range(first, last)
        ]
        return _merged(self._gather(calls), self.offsets[last] - lo)

    def close(self, *, raise_if_closed: bool = True) -> None:
        if self.remote and self.shards and not _ray_running():
            self.shards = []  # Ray was shut down (its actors with it): nothing to close
        if self.shards:
            try:
                self._gather([self._call(s, "close") for s in self.shards])
            finally:
                if self.remote:
                    import ray

                    for shard in self.shards:
                        ray.kill(shard)
                self.shards = []
        super().close(raise_if_closed=raise_if_closed)


# -- generation replicas -------------------------------------------------------------------


class PolicyReplica:
    """A Ray actor's body: a copy of an :class:`~gigpo_torchrl.policy.LLMPolicy`.

    The model goes to ``cuda`` when Ray gave the actor a GPU (``num_gpus``), else stays on
    the CPU. ``dtype="bfloat16"`` generates under bfloat16 autocast (weights stay float32,
    as the trainer's do). Its torch RNG is seeded with ``seed``: a replica serves one lane,
    so its replies do not depend on how the lanes' calls interleave.
    """

    def __init__(
        self,
        policy: bytes,
        paths: Sequence[str],
        *,
        seed: int,
        num_threads: int | None = None,
        dtype: str = "float32",
    ):
        import ray

        _extend_path(paths)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        self.policy = _unpickled(policy, self.device)
        self.policy.model.to(self.device).eval()
        self.dtype = dtype
        self.version = 0
        torch.manual_seed(seed)

    def generate(self, prompts: list[str], actions: list | None = None) -> TensorDictBase:
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"
        ):
            return self.policy(policy_inputs(prompts, actions))

    def update_weights(self, weights: dict, version: int) -> int:
        """Load ``weights`` (a full state dict or a subset of its entries) into the model."""
        missing = self.policy.model.load_state_dict(weights, strict=False)
        if missing.unexpected_keys:
            raise KeyError(f"weights the replica's model does not have: {missing.unexpected_keys}")
        self.version = version
        return version


class PolicyReplicas:
    """R generation replicas of ``policy``, one per lane of a collector.

    Args:
        policy: an :class:`~gigpo_torchrl.policy.LLMPolicy` generating with transformers
            (a vLLM sampler cannot be copied into an actor: see the README).
        count: number of replicas R.

    Keyword Args:
        seed: replica ``k``'s torch RNG is seeded with ``seed + k``.
        num_threads: torch threads per replica (default: this machine's cores / R, at
            least 1).
        dtype: ``"bfloat16"`` generates under bfloat16 autocast.
        actor_options: ``ray.remote`` options per replica, e.g. ``{"num_gpus": 1}``.
    """

    def __init__(
        self,
        policy,
        count: int,
        *,
        seed: int = 0,
        num_threads: int | None = None,
        dtype: str = "float32",
        actor_options: dict | None = None,
    ):
        ray = require_ray()
        if getattr(policy, "sampler", None) is not None:
            raise ValueError(
                "generation replicas copy a transformers policy; a vLLM sampler cannot be "
                "sent to a Ray actor (see the README on vLLM replicas)"
            )
        self.policy = policy
        self.version = 0
        threads = num_threads or max(1, (os.cpu_count() or 1) // count)
        payload, paths = _pickled(policy), _driver_paths()
        actor = ray.remote(PolicyReplica).options(**(actor_options or {}))
        self.actors = [
            actor.remote(payload, paths, seed=seed + k, num_threads=threads, dtype=dtype)
            for k in range(count)
        ]

    def __len__(self) -> int:
        return len(self.actors)

    @property
    def tokenizer(self):
        return self.policy.tokenizer

    def generate(self, lane: int, prompts: list[str], actions: list | None = None):
        """Replies of replica ``lane`` to ``prompts`` (with each prompt's admissible
        ``actions`` for a policy that chooses among them); blocks this thread only."""
        import ray

        return ray.get(self.actors[lane].generate.remote(prompts, actions))

    def update_weights(self, weights: dict | None = None) -> int:
        """Push ``weights`` (default: the policy model's trainable parameters, or all its
        weights when none is trainable) to every replica and wait until all hold them.
        Returns the new weight version."""
        import ray

        if weights is None:
            model = self.policy.model
            weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
            weights = weights or model.state_dict()
        ref = ray.put({k: v.detach().to("cpu") for k, v in weights.items()})
        self.version += 1
        ray.get([a.update_weights.remote(ref, self.version) for a in self.actors])
        return self.version

    def shutdown(self) -> None:
        if _ray_running():
            import ray

            for actor in self.actors:
                ray.kill(actor)
        self.actors = []
