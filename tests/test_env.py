"""GenieEnv: Gymnasium's env checker on every registered id, seeding, prompts, actions, rendering, the
registration itself and the random-agent example, on tiny checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import tiny_model, write_tiny_checkpoint
from gymnasium.utils.env_checker import check_env

import genie_env
from genie_env.env import GenieEnv
from genie_env.hub import CheckpointError
from genie_env.precision import autocast_dtype, default_dtype
from genie_env.registration import ENV_ID, MAX_EPISODE_STEPS
from genie_env.vector_env import GenieVectorEnv

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
QUIET = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}

# Tiny models gain nothing from threads, and on a busy machine thread hand-offs cost 100x their work.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("env") / "tiny")


@pytest.fixture(scope="module")
def bank(ckpt) -> np.ndarray:
    return np.load(ckpt / "prompts.npz")["frames"]


@pytest.fixture(scope="module")
def no_bank_ckpt(tmp_path_factory) -> Path:
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("env") / "no-bank")
    (path / "prompts.npz").unlink()
    (path / "action_map.json").unlink()
    return path


@pytest.fixture
def dummy_video(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")


def genie_ids() -> list[str]:
    return sorted(k for k, spec in gym.registry.items()
                  if isinstance(spec.entry_point, str) and spec.entry_point.startswith("genie_env."))


def rollout(env: gym.Env, seed: int, actions: list[int]) -> list[np.ndarray]:
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        out.append(env.step(a)[0])
    return out


# ---------------------------------------------------------------------------------------- registration
def test_genie_v0_is_registered_with_string_entry_points():
    assert genie_ids() == [ENV_ID]
    spec = gym.spec(ENV_ID)
    assert spec.entry_point == "genie_env.env:GenieEnv"
    assert spec.vector_entry_point == "genie_env.vector_env:GenieVectorEnv"
    assert spec.max_episode_steps == MAX_EPISODE_STEPS == 1000
    genie_env.registration.register_envs()  # registering again is a no-op, not a warning
    assert genie_ids() == [ENV_ID]


@pytest.mark.parametrize("env_id", genie_ids())
def test_check_env_passes_on_every_registered_id(env_id, ckpt, dummy_video):
    env = gym.make(env_id, checkpoint=str(ckpt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)  # includes seed and step determinism, memory sharing, every render mode
    problems = [str(w.message) for w in caught if "gymnasium" in str(w.filename) or "env" in str(w.message)]
    assert problems == []
    env.close()


def test_module_prefix_form_works_without_prior_import(ckpt):
    code = ("import sys, gymnasium as gym\n"
            "assert 'genie_env' not in sys.modules\n"
            f"env = gym.make('genie_env:Genie-v0', checkpoint={str(ckpt)!r})\n"
            "obs, info = env.reset(seed=0)\n"
            "print(type(env.unwrapped).__name__, obs.shape, env.spec.max_episode_steps)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=QUIET)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["GenieEnv", "(16,", "16,", "3)", "1000"]


def test_make_truncates_at_max_episode_steps_and_never_terminates(ckpt):
    env = gym.make(ENV_ID, checkpoint=str(ckpt), max_episode_steps=3)
    env.reset(seed=0)
    ends = [env.step(1)[2:4] for _ in range(3)]
    assert ends == [(False, False), (False, False), (False, True)]


# ---------------------------------------------------------------------------------------- seeding
def test_same_seed_same_rollout_different_seed_different(ckpt):
    a = gym.make(ENV_ID, checkpoint=str(ckpt))
    b = gym.make(ENV_ID, checkpoint=str(ckpt))
    actions = [0, 2, 2, 5, 3]
    first, second = rollout(a, 7, actions), rollout(b, 7, actions)
    assert all(np.array_equal(x, y) for x, y in zip(first, second))
    other = rollout(b, 8, actions)
    assert any(not np.array_equal(x, y) for x, y in zip(first, other))


def test_reset_starts_from_a_real_prompt_bank_frame(ckpt, bank):
    env = GenieEnv(ckpt)
    seen = set()
    for seed in range(12):
        obs, info = env.reset(seed=seed)
        assert np.array_equal(obs, bank[info["prompt_index"]])
        seen.add(info["prompt_index"])
    assert len(seen) > 1  # the seed picks among the prompts


# ---------------------------------------------------------------------------------------- prompts
def test_prompt_option_uint8_and_float(ckpt):
    env = GenieEnv(ckpt)
    img = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    obs, info = env.reset(seed=0, options={"prompt": img})
    assert np.array_equal(obs, img) and info["prompt_index"] == -1
    assert obs is not img and not np.shares_memory(obs, img)
    floats = img.astype(np.float64) / 255
    obs2, _ = env.reset(seed=0, options={"prompt": floats})
    assert np.array_equal(obs2, img)
    # the same prompt and seed give the same next frame, whichever dtype it came in
    a = env.step(1)[0]
    env.reset(seed=0, options={"prompt": img})
    assert np.array_equal(env.step(1)[0], a)


@pytest.mark.parametrize("prompt, error, words", [
    ([[0] * 3] * SIZE, TypeError, "numpy array"),
    (torch.zeros(SIZE, SIZE, 3), TypeError, "numpy array"),
    (np.zeros((3, SIZE, SIZE), np.uint8), ValueError, "shape"),
    (np.zeros((SIZE, SIZE), np.uint8), ValueError, "shape"),
    (np.zeros((1, SIZE, SIZE, 3), np.uint8), ValueError, "shape"),
    (np.zeros((SIZE, SIZE, 3), np.int64), TypeError, "uint8"),
    (np.zeros((SIZE, SIZE, 3), bool), TypeError, "uint8"),
    (np.full((SIZE, SIZE, 3), 2.0), ValueError, "[0, 1]"),
    (np.full((SIZE, SIZE, 3), -0.5, np.float32), ValueError, "[0, 1]"),
    (np.full((SIZE, SIZE, 3), np.nan, np.float32), ValueError, "NaN"),
])
def test_bad_prompts_raise_clear_errors_and_env_keeps_working(ckpt, prompt, error, words):
    env = GenieEnv(ckpt)
    ref = rollout(GenieEnv(ckpt), 3, [2])
    env.reset(seed=1)
    with pytest.raises(error, match="prompt") as e:
        env.reset(options={"prompt": prompt})
    assert words in str(e.value)
    assert all(np.array_equal(x, y) for x, y in zip(rollout(env, 3, [2]), ref))


def test_unknown_option_is_refused(ckpt):
    env = GenieEnv(ckpt)
    with pytest.raises(ValueError, match="options"):
        env.reset(options={"promt": np.zeros((SIZE, SIZE, 3), np.uint8)})


def test_without_prompt_bank_reset_needs_a_prompt(no_bank_ckpt):
    env = GenieEnv(no_bank_ckpt)
    with pytest.raises(ValueError, match="prompt bank") as e:
        env.reset(seed=0)
    assert "options={'prompt'" in str(e.value)
    img = np.full((SIZE, SIZE, 3), 100, np.uint8)
    obs, _ = env.reset(seed=0, options={"prompt": img})
    assert np.array_equal(obs, img)
    assert env.step(3)[0].shape == (SIZE, SIZE, 3)


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> Path:
    """A bank of 3-frame clips (the tiny model's window holds 3 frames before the one it generates)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("clips") / "ckpt", n_prompts=5, prompt_frames=3)


def _record_starts(monkeypatch, model) -> list:
    seen, start = [], model.start

    def recording(prompt, **kwargs):
        seen.append(prompt.clone())
        return start(prompt, **kwargs)

    monkeypatch.setattr(model, "start", recording)
    return seen


def _as_tensor(clip: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(clip).permute(3, 0, 1, 2).float().div(255)[None]  # (1, 3, T, H, W)


def test_a_bank_of_clips_primes_the_model_with_the_frames_before_the_start(clip_ckpt, monkeypatch):
    clips = np.load(clip_ckpt / "prompts.npz")["frames"]
    env = GenieEnv(clip_ckpt)
    seen = _record_starts(monkeypatch, env.model)
    obs, info = env.reset(seed=3)
    clip = clips[info["prompt_index"]]
    assert np.array_equal(obs, clip[-1])  # the start frame is the clip's last
    assert torch.equal(seen[-1], _as_tensor(clip))  # the whole clip primes the model
    assert env.step(2)[0].shape == (SIZE, SIZE, 3)
    # a bank of single frames (as assigned by training.train_agent) still works
    env.prompt_bank = clips[:, -1]
    obs, info = env.reset(seed=3)
    assert np.array_equal(obs, clips[info["prompt_index"], -1])
    assert torch.equal(seen[-1], _as_tensor(clip[-1:]))  # a one-frame clip
    # a shorter context window keeps the clip's last frames, leaving room for the generated one
    short = GenieEnv(clip_ckpt, context_frames=2)
    seen = _record_starts(monkeypatch, short.model)
    short.reset(seed=3)
    assert torch.equal(seen[-1], _as_tensor(clip[-1:]))
    assert short.step(2)[0].shape == (SIZE, SIZE, 3)


def test_vector_env_starts_and_restarts_rows_from_clips(clip_ckpt, monkeypatch):
    clips = np.load(clip_ckpt / "prompts.npz")["frames"]
    envs = GenieVectorEnv(2, clip_ckpt, max_episode_steps=1)
    seen = _record_starts(monkeypatch, envs.model)
    obs, info = envs.reset(seed=0)
    assert torch.equal(seen[-1], torch.cat([_as_tensor(clips[i]) for i in info["prompt_index"]]))
    assert np.array_equal(obs, clips[info["prompt_index"], -1])
    restarts, reset_rows = [], envs.session.reset_rows
    monkeypatch.setattr(envs.session, "reset_rows",
                        lambda rows, prompt: (restarts.append(prompt.clone()), reset_rows(rows, prompt)))
    envs.step(np.array([0, 1]))  # both truncate after one step
    obs, *_ = envs.step(np.array([0, 1]))  # and restart from clips of the bank
    assert len(restarts) == 1 and restarts[0].shape == (2, 3, 3, SIZE, SIZE)
    for row in range(2):
        match = [i for i in range(len(clips)) if torch.equal(restarts[0][row], _as_tensor(clips[i])[0])]
        assert match and np.array_equal(obs[row], clips[match[0], -1])


def test_a_bank_of_clips_longer_than_the_window_is_refused(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", n_prompts=2, prompt_frames=4)  # window: 3 + 1
    with pytest.raises(CheckpointError, match=r"\(N, T, 16, 16, 3\) with 1 <= T <= 3"):
        GenieEnv(ckpt)


# ---------------------------------------------------------------------------------------- actions
@pytest.mark.parametrize("action", [1.0, np.float32(1), True, np.bool_(True), None, "1", np.array(1.5),
                                    torch.tensor(1)])
def test_non_integer_actions_raise_type_error(ckpt, action):
    env = GenieEnv(ckpt)
    env.reset(seed=0)
    with pytest.raises(TypeError, match="action"):
        env.step(action)


@pytest.mark.parametrize("action", [-1, 8, np.int64(99), np.array([1]), np.array([[1]]), np.array([], np.int64)])
def test_out_of_range_or_misshaped_actions_raise_value_error(ckpt, action):
    env = GenieEnv(ckpt)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(action)


def test_env_keeps_working_after_a_bad_action_and_draws_nothing_for_it(ckpt):
    env, ref = GenieEnv(ckpt), GenieEnv(ckpt)
    env.reset(seed=4)
    for bad in (1.5, 8, np.array([2])):
        with pytest.raises((TypeError, ValueError)):
            env.step(bad)
    good = [env.step(a)[0] for a in (3, np.int64(2), np.array(5, np.uint8))]
    expected = rollout(ref, 4, [3, 2, 5])[1:]
    assert all(np.array_equal(x, y) for x, y in zip(good, expected))


def test_step_before_reset_is_refused(ckpt):
    with pytest.raises(gym.error.ResetNeeded):
        GenieEnv(ckpt).step(0)


# ---------------------------------------------------------------------------------------- outputs
def test_info_reward_and_fresh_arrays(ckpt):
    env = GenieEnv(ckpt, maskgit_steps=3, temperature=0.5)
    obs0, info0 = env.reset(seed=0)
    obs1, reward, terminated, truncated, info1 = env.step(2)
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info0["step"] == 0 and info1 == {"step": 1, "maskgit_steps": 3, "temperature": 0.5}
    assert obs1.dtype == np.uint8 and obs1.shape == (SIZE, SIZE, 3)
    assert not np.shares_memory(obs0, obs1)
    before = obs1.copy()
    obs1[:] = 0  # the caller's array is theirs: the env's state does not change
    env.render_mode = "rgb_array"
    assert np.array_equal(env.render(), before)


def test_reward_fn_gets_previous_frame_action_and_new_frame(ckpt):
    calls = []

    def reward_fn(prev, action, obs):
        calls.append((prev.copy(), action, obs.copy()))
        return float(obs.mean()) - float(prev.mean())

    env = GenieEnv(ckpt, reward_fn=reward_fn)
    obs0, _ = env.reset(seed=0)
    obs1, reward, *_ = env.step(np.int64(4))
    assert len(calls) == 1
    prev, action, new = calls[0]
    assert np.array_equal(prev, obs0) and action == 4 and type(action) is int and np.array_equal(new, obs1)
    assert reward == pytest.approx(obs1.mean() - obs0.mean())

    bad = GenieEnv(ckpt, reward_fn=lambda *a: "lots")
    bad.reset(seed=0)
    with pytest.raises(TypeError, match="reward_fn"):
        bad.step(0)


def test_render_rgb_array_and_human(ckpt, dummy_video):
    env = GenieEnv(ckpt, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8 and np.array_equal(frame, obs)
    obs, *_ = env.step(1)
    assert np.array_equal(env.render(), obs)

    human = GenieEnv(ckpt, render_mode="human")
    human.reset(seed=0)
    assert human.render() is None
    import pygame

    shown = pygame.surfarray.array3d(pygame.display.get_surface()).transpose(1, 0, 2)
    assert shown.std() > 0  # the frame was drawn, not a blank window
    human.close()
    human.close()


# ---------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("kwargs, word", [
    (dict(maskgit_steps=0), "maskgit_steps"),
    (dict(maskgit_steps=2.0), "maskgit_steps"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=10_000), "top_k"),
    (dict(context_frames=5), "context_frames"),  # the tiny model's window is 4
    (dict(context_frames=0), "context_frames"),
    (dict(render_mode="ansi"), "render_mode"),
    (dict(dtype="fp16"), "dtype"),
    (dict(reward_fn=3), "reward_fn"),
    (dict(carry="yes"), "carry"),
    (dict(carry=1), "carry"),
])
def test_bad_constructor_arguments_are_named(ckpt, kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        GenieEnv(ckpt, **kwargs)


def test_carry_reaches_the_session_and_defaults_to_the_config(ckpt):
    assert GenieEnv(ckpt).carry is True  # config.carry_unchanged, on by default
    env = GenieEnv(ckpt, carry=False)
    env.reset(seed=0)
    assert env.carry is False and env._session.carry is False
    venv = GenieVectorEnv(2, ckpt, carry=False)
    venv.reset(seed=0)
    assert venv.session.carry is False


def test_checkpoint_and_model_are_exclusive(ckpt):
    with pytest.raises(ValueError, match="checkpoint or model"):
        GenieEnv(ckpt, model=tiny_model())
    with pytest.raises(TypeError, match="model"):
        GenieEnv(model="tiny")


def test_given_model_is_played_and_dtype_applies(ckpt):
    model = tiny_model()
    env = GenieEnv(model=model, dtype="fp32")
    assert env.model is model and model.autocast_dtype is None
    assert env.prompt_bank is None  # a bare model ships no files
    GenieEnv(model=model)
    assert model.autocast_dtype == autocast_dtype(default_dtype("cpu"))  # the rule of genie_env.precision


def test_default_checkpoint_is_the_shipped_model(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("GENIE_ENV_WEIGHTS", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="shipped default model"):
        GenieEnv()
    monkeypatch.setenv("GENIE_ENV_WEIGHTS", str(ckpt))
    env = gym.make(ENV_ID)  # no checkpoint argument: picks up whatever weights/ holds
    assert env.observation_space.shape == (SIZE, SIZE, 3)
    assert env.unwrapped.prompt_bank is not None


def test_smaller_context_window_forgets_older_frames():
    model = tiny_model()
    with torch.no_grad():  # a random model's logits are nearly flat: sharpen them so context shows
        model.dynamics.head.weight.mul_(100)
    img = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    full, short = GenieEnv(model=model), GenieEnv(model=model, context_frames=2)
    actions = [1, 2, 3, 4, 5, 2]

    def rollout(env, seed, actions):
        out = [env.reset(seed=seed, options={"prompt": img})[0]]
        return out + [env.step(a)[0] for a in actions]

    a, b = rollout(full, 0, actions), rollout(short, 0, actions)
    assert short._session.cache.window == 2 and full._session.cache.window == model.config.context_frames
    assert np.array_equal(a[1], b[1])  # the first step sees only the prompt either way
    assert any(not np.array_equal(x, y) for x, y in zip(a[2:], b[2:]))


# ---------------------------------------------------------------------------------------- keys
def test_keys_to_action_follow_the_action_map(ckpt, no_bank_ckpt):
    import pygame

    keys = GenieEnv(ckpt).get_keys_to_action()
    assert keys[(pygame.K_RIGHT,)] == keys[(pygame.K_d,)] == 2
    assert keys[(pygame.K_LEFT,)] == 1 and keys[(pygame.K_UP,)] == keys[(pygame.K_w,)] == 3
    assert keys[tuple(sorted((pygame.K_LEFT, pygame.K_UP)))] == 4
    assert keys[tuple(sorted((pygame.K_d, pygame.K_w)))] == 5
    assert keys[(pygame.K_1,)] == 0 and keys[(pygame.K_8,)] == 7 and (pygame.K_9,) not in keys
    assert GenieEnv(ckpt).get_action_meanings() == ["NONE", "LEFT", "RIGHT", "UP", "LEFT+UP", "RIGHT+UP",
                                                    "LATENT_6", "LATENT_7"]
    bare = GenieEnv(no_bank_ckpt).get_keys_to_action()
    assert bare == {(getattr(pygame, f"K_{i + 1}"),): i for i in range(8)}


@pytest.mark.filterwarnings("ignore:.*matplotlib")
def test_gymnasium_play_uses_the_keymap(ckpt, dummy_video):
    import pygame
    from gymnasium.utils.play import play

    env = gym.make(ENV_ID, checkpoint=str(ckpt), render_mode="rgb_array")
    pygame.display.init()
    pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_RIGHT))
    played = []

    def callback(prev_obs, obs, action, *rest):
        played.append(action)
        pygame.event.post(pygame.event.Event(pygame.QUIT))

    play(env, fps=1000, zoom=1, callback=callback)
    assert played == [2]
    pygame.display.quit()


# ---------------------------------------------------------------------------------------- example
def test_random_agent_example_runs(ckpt):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "random_agent.py"), "--checkpoint", str(ckpt),
                          "--steps", "5"], capture_output=True, text=True, timeout=120, env=QUIET)
    assert out.returncode == 0, out.stderr
    assert "ran 5 steps" in out.stdout and "(16, 16, 3) uint8" in out.stdout
