"""Long runs stay flat: a few thousand steps of Genie-v0 and of the vector env with autoreset, on the tiny
model, hold resident memory, the KV cache and the session's Python state constant. (The long version,
with per-step times, is scripts/soak.py; nothing here asserts on time.)"""

from __future__ import annotations

import gc
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoint

import genie_env  # noqa: F401  (registers Genie-v0)
from genie_env.benchmark import rss_mb

torch.set_num_threads(1)

WARMUP, STEPS = 200, 2000
# A leaked Python object or tensor per step shows in the object counts; the RSS bound catches leaks below
# Python (one KV cache entry per step would be 12 MB here).
RSS_SLACK_MB = 3.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("soak") / "tiny")


def cache_state(session) -> list[tuple]:
    c = session.cache
    return [(tuple(t.shape), t.dtype, t.data_ptr()) for t in (c.k, c.v, c.age, c.ptr)]


def containers(session) -> dict[str, int]:
    return {k: len(v) for k, v in vars(session).items() if isinstance(v, (list, dict, tuple, set))}


def live_tensors() -> int:
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def test_one_long_episode_stays_flat(ckpt):
    env = gym.make("Genie-v0", checkpoint=str(ckpt), dtype="fp32", max_episode_steps=WARMUP + STEPS)
    env.reset(seed=0)
    actions = np.random.default_rng(0).integers(0, env.action_space.n, WARMUP + STEPS)
    for a in actions[:WARMUP]:
        env.step(int(a))
    session = env.unwrapped._session
    gc.collect()
    rss0, tensors0, objects0 = rss_mb(), live_tensors(), len(gc.get_objects())
    cache0, containers0 = cache_state(session), containers(session)
    for i, a in enumerate(actions[WARMUP:]):
        _, _, terminated, truncated, info = env.step(int(a))
        assert not terminated and truncated == (i == STEPS - 1)
    gc.collect()
    assert info["step"] == WARMUP + STEPS
    assert env.unwrapped._session is session
    assert cache_state(session) == cache0  # same shapes, same storage: updated in place, never grown
    assert containers(session) == containers0
    assert int(session.cache.frames().max()) == session.cache.k.shape[4]  # the window is full, not growing
    assert live_tensors() - tensors0 <= 5
    assert len(gc.get_objects()) - objects0 < 200
    assert rss_mb() - rss0 < RSS_SLACK_MB, (rss0, rss_mb())


def test_vector_env_with_autoreset_stays_flat(ckpt):
    n, episode = 4, 50
    envs = gym.make_vec("Genie-v0", num_envs=n, vectorization_mode="vector_entry_point", checkpoint=str(ckpt),
                        dtype="fp32", max_episode_steps=episode)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(WARMUP):
        envs.step(rng.integers(0, 8, n))
    session = envs.unwrapped.session
    gc.collect()
    rss0, tensors0, objects0 = rss_mb(), live_tensors(), len(gc.get_objects())
    cache0, containers0 = cache_state(session), containers(session)
    ended = 0
    steps = STEPS // 2  # 20 episodes per env
    for _ in range(steps):
        _, _, terminated, truncated, _ = envs.step(rng.integers(0, 8, n))
        ended += int(np.sum(terminated | truncated))
    gc.collect()
    assert ended == n * (steps // episode)  # every env truncated every 50 steps and was reset
    assert envs.unwrapped.session is session  # autoreset restarts rows in place, not a new session
    assert cache_state(session) == cache0
    assert containers(session) == containers0
    assert live_tensors() - tensors0 <= 5
    assert len(gc.get_objects()) - objects0 < 200
    assert rss_mb() - rss0 < RSS_SLACK_MB, (rss0, rss_mb())
