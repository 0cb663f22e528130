"""GenieVectorEnv: make_vec, one batched session, NEXT_STEP autoreset, per-env seeding, bad actions."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import tiny_model, write_tiny_checkpoint
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

import genie_env  # noqa: F401  (registers Genie-v0)
from genie_env.env import GenieEnv
from genie_env.vector_env import GenieVectorEnv

N, SIZE = 3, 16

torch.set_num_threads(1)  # tiny models: threads only add hand-off costs on a busy machine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vec") / "tiny")


@pytest.fixture(scope="module")
def bank(ckpt) -> np.ndarray:
    return np.load(ckpt / "prompts.npz")["frames"]


def make(ckpt, num_envs=N, **kwargs) -> VectorEnv:
    return gym.make_vec("Genie-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                        checkpoint=str(ckpt), **kwargs)


def in_bank(frame: np.ndarray, bank: np.ndarray) -> bool:
    return bool((bank == frame).all(axis=(1, 2, 3)).any())


def test_make_vec_gives_a_batched_vector_env_with_batched_spaces(ckpt):
    envs = make(ckpt)
    assert isinstance(envs, VectorEnv) and isinstance(envs.unwrapped, GenieVectorEnv)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert envs.unwrapped.max_episode_steps == 1000  # the registration's, passed on by make_vec
    single_obs = gym.spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8)
    assert envs.single_observation_space == single_obs and envs.single_action_space == gym.spaces.Discrete(8)
    assert envs.observation_space == batch_space(single_obs, N)
    assert envs.action_space == batch_space(gym.spaces.Discrete(8), N)
    obs, info = envs.reset(seed=0)
    assert obs.shape == (N, SIZE, SIZE, 3) and obs.dtype == np.uint8 and obs in envs.observation_space
    obs, rewards, terminated, truncated, info = envs.step(envs.action_space.sample())
    assert obs in envs.observation_space
    assert rewards.shape == terminated.shape == truncated.shape == (N,)
    assert info["step"].tolist() == [1] * N and info["_step"].all()
    envs.close()
    envs.close()


def test_all_envs_step_in_one_batched_forward(ckpt):
    envs = make(ckpt, maskgit_steps=3)
    dyn = envs.unwrapped.model.dynamics
    samples, forwards = [], []
    sample_frame, step = dyn.sample_frame, dyn.step

    def counting_sample(cache, action, *args, **kwargs):
        samples.append(action.shape[0])
        return sample_frame(cache, action, *args, **kwargs)

    def counting_step(cache, tokens, *args, **kwargs):
        forwards.append(tokens.shape[0])
        return step(cache, tokens, *args, **kwargs)

    envs.reset(seed=0)
    assert envs.unwrapped.session.batch_size == N
    dyn.sample_frame, dyn.step = counting_sample, counting_step
    envs.step(np.array([1, 2, 3]))
    envs.step(np.array([0, 0, 0]))
    assert samples == [N, N]  # one MaskGIT sampling per vector step, all envs in one batch
    # per step: 3 MaskGIT passes over all envs, the first also writing the last frame to the cache
    assert forwards == [N] * 6


def test_next_step_autoreset(ckpt, bank):
    envs = make(ckpt, max_episode_steps=2)
    envs.reset(seed=3)
    acts = np.array([1, 2, 3])
    _, _, term1, trunc1, info1 = envs.step(acts)
    obs2, _, term2, trunc2, info2 = envs.step(acts)
    assert not trunc1.any() and trunc2.all() and not term1.any() and not term2.any()
    assert info2["step"].tolist() == [2] * N
    obs3, rew3, term3, trunc3, info3 = envs.step(acts)  # the autoreset step: fresh start frames
    assert not trunc3.any() and not term3.any() and (rew3 == 0).all()
    assert info3["step"].tolist() == [0] * N
    assert all(in_bank(o, bank) for o in obs3)
    assert not any(in_bank(o, bank) for o in obs2)  # (generated frames are not bank frames)
    _, _, _, trunc4, info4 = envs.step(acts)
    assert info4["step"].tolist() == [1] * N and not trunc4.any()
    assert envs.unwrapped.session.batch_size == N  # rows were reset in place, not a new session


def test_rows_reset_independently(ckpt, bank):
    envs = make(ckpt, num_envs=2, max_episode_steps=2)
    envs.reset(seed=0)
    envs.step(np.array([1, 1]))
    # set row 1's step count back so that the rows end at different times
    envs.unwrapped._steps[1] = 0
    _, _, _, trunc, _ = envs.step(np.array([1, 1]))
    assert trunc.tolist() == [True, False]
    obs, _, _, trunc, info = envs.step(np.array([1, 1]))
    assert info["step"].tolist() == [0, 2] and trunc.tolist() == [False, True]
    assert in_bank(obs[0], bank) and not in_bank(obs[1], bank)


def test_seeding_per_env(ckpt):
    envs = make(ckpt)
    single = GenieEnv(ckpt)
    obs, _ = envs.reset(seed=10)
    for i in range(N):  # env i is seeded with seed + i: it starts where a single env seeded so starts
        assert np.array_equal(obs[i], single.reset(seed=10 + i)[0])
    obs_list, _ = envs.reset(seed=[10, 11, 12])
    assert np.array_equal(obs_list, obs)
    obs_other, _ = envs.reset(seed=[5, 9, 2])
    for i, s in enumerate([5, 9, 2]):
        assert np.array_equal(obs_other[i], single.reset(seed=s)[0])
    with pytest.raises(ValueError, match="seed"):
        envs.reset(seed=[1, 2])
    with pytest.raises(TypeError, match="seed"):
        envs.reset(seed="1")


def test_same_seed_same_rollout_different_seed_different(ckpt):
    def rollout(seed):
        envs = make(ckpt, max_episode_steps=3)
        out = [envs.reset(seed=seed)[0]]
        for t in range(5):
            out.append(envs.step(np.array([t % 8, 2, 5]))[0])
        return out

    a, b, c = rollout(1), rollout(1), rollout(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("actions, error", [
    (np.array([1, 2]), ValueError),
    (np.array([1, 2, 3, 4]), ValueError),
    (np.array([[1, 2, 3]]), ValueError),
    (np.array([1, 2, 8]), ValueError),
    (np.array([-1, 2, 3]), ValueError),
    (np.array([1.0, 2.0, 3.0]), TypeError),
    (np.array([True, False, True]), TypeError),
    ([1.0, 2, 3], TypeError),
    (1, TypeError),
    (torch.tensor([1, 2, 3]), TypeError),
])
def test_bad_actions_are_named_and_envs_keep_working(ckpt, actions, error):
    envs, ref = make(ckpt), make(ckpt)
    envs.reset(seed=0)
    ref.reset(seed=0)
    with pytest.raises(error, match="actions"):
        envs.step(actions)
    assert np.array_equal(envs.step([1, 2, 3])[0], ref.step(np.array([1, 2, 3]))[0])


def test_prompt_option_and_render(ckpt):
    envs = make(ckpt, render_mode="rgb_array")
    imgs = np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    obs, info = envs.reset(seed=0, options={"prompt": imgs})
    assert np.array_equal(obs, imgs) and info["prompt_index"].tolist() == [-1] * N
    frames = envs.render()
    assert isinstance(frames, tuple) and len(frames) == N and np.array_equal(np.stack(frames), imgs)
    obs, _ = envs.reset(options={"prompt": imgs[0]})  # one image for every env
    assert all(np.array_equal(o, imgs[0]) for o in obs)
    with pytest.raises(ValueError, match="prompt"):
        envs.reset(options={"prompt": imgs[:2]})
    with pytest.raises(TypeError, match="prompt"):
        envs.reset(options={"prompt": imgs.astype(np.int32)})
    assert envs.step(np.array([0, 1, 2]))[0].shape == (N, SIZE, SIZE, 3)


def test_autoreset_without_prompt_bank_restarts_from_the_given_prompts():
    envs = GenieVectorEnv(2, model=tiny_model(), max_episode_steps=1)
    imgs = np.stack([np.full((SIZE, SIZE, 3), 40, np.uint8), np.full((SIZE, SIZE, 3), 200, np.uint8)])
    with pytest.raises(ValueError, match="prompt bank"):
        envs.reset(seed=0)
    envs.reset(seed=0, options={"prompt": imgs})
    envs.step(np.array([1, 2]))
    obs, *_ = envs.step(np.array([1, 2]))
    assert np.array_equal(obs, imgs)


def test_reward_fn_runs_per_env(ckpt):
    envs = make(ckpt, reward_fn=lambda prev, a, obs: float(a), max_episode_steps=1)
    envs.reset(seed=0)
    assert envs.step(np.array([1, 4, 7]))[1].tolist() == [1.0, 4.0, 7.0]
    assert envs.step(np.array([1, 4, 7]))[1].tolist() == [0.0, 0.0, 0.0]  # the autoreset step


def test_smaller_context_window_applies_to_every_row(ckpt):
    envs = make(ckpt, context_frames=2)
    envs.reset(seed=0)
    for _ in range(4):
        envs.step(np.array([1, 2, 3]))
    assert envs.unwrapped.session.cache.window == 2
