"""`GenieVectorEnv`: N Genie environments stepped as one batch, one forward pass per MaskGIT step for all
of them (`gym.make_vec("Genie-v0", num_envs=N)`), instead of N copies of the model stepping in turn.

Axes: N envs, H W pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from genie_env.env import (
    RewardFn,
    action_names,
    call_reward_fn,
    check_carry,
    check_prompt_images,
    check_render_mode,
    check_reward_fn,
    check_settings,
    draw_prompt_index,
    frames_to_images,
    images_to_tensor,
    load_action_map,
    load_model,
    load_prompt_bank,
    predicted_outcomes,
    prompt_clips,
    seeded_generator,
)
from genie_env.models.genie import Genie, GenieSession

__all__ = ["GenieVectorEnv"]


class GenieVectorEnv(VectorEnv):
    """N Genie environments in one batched `GenieSession` (see `GenieEnv` for the game itself).

    Autoreset is Gymnasium's NEXT_STEP mode: the step after an env ends returns its new start frame (a
    new prompt from the bank), reward 0 and ``terminated = truncated = False``, and ignores its action.
    An env ends when the checkpoint's episode-end head predicts a termination (see `GenieEnv`: rewards
    and terminations come from the heads when the checkpoint has them) or after ``max_episode_steps``
    (``gym.make_vec`` passes the registration's 1000).

    Seeding: ``reset(seed=s)`` seeds env i's prompt choice with ``s + i`` (a list gives each env its own
    seed), so row i starts from the frame a single ``GenieEnv`` reset with ``seed=s + i`` starts from.
    MaskGIT samples all rows in one batch from one generator seeded from ``s``: a seeded vector env is
    deterministic as a whole, but row i's frames differ from that single env's after the first step.

    Arguments: ``num_envs``, ``max_episode_steps`` (None = never truncate), and the arguments of
    `GenieEnv` (checkpoint, model, device, dtype, maskgit_steps, temperature, top_k, context_frames,
    carry, reward_fn, render_mode: "rgb_array" gives a tuple of the N frames).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        checkpoint: str | Path | None = None,
        *,
        max_episode_steps: int | None = None,
        model: Genie | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        maskgit_steps: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        context_frames: int | None = None,
        carry: bool | None = None,
        reward_fn: RewardFn | None = None,
        render_mode: str | None = None,
    ) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        if max_episode_steps is not None and (
                isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, (int, np.integer))
                or max_episode_steps < 1):
            raise ValueError(f"max_episode_steps must be an int >= 1 or None, got {max_episode_steps!r}")
        check_render_mode(render_mode, self.metadata["render_modes"])
        check_reward_fn(reward_fn)
        self.num_envs = int(num_envs)
        self.max_episode_steps = None if max_episode_steps is None else int(max_episode_steps)
        self.render_mode = render_mode
        self.reward_fn = reward_fn
        self.model = load_model(checkpoint, model, device, dtype)
        self.maskgit_steps, self.temperature, self.top_k, self.context_frames = check_settings(
            self.model, maskgit_steps, temperature, top_k, context_frames)
        self.carry = check_carry(self.model, carry)
        self.prompt_bank = load_prompt_bank(self.model)
        self.action_map = load_action_map(self.model)

        cfg = self.model.config
        self.single_observation_space = spaces.Box(0, 255, (cfg.image_size, cfg.image_size, 3), np.uint8)
        self.single_action_space = spaces.Discrete(cfg.action_vocab_size)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self.session: GenieSession | None = None
        """The one batched session all envs step in (None before the first reset)."""
        self._row_rngs: list[np.random.Generator] | None = None
        self._obs: np.ndarray | None = None
        self._start_images: np.ndarray | None = None
        self._steps = np.zeros(self.num_envs, dtype=np.int64)
        self._prev_done = np.zeros(self.num_envs, dtype=np.bool_)
        self._probs = np.zeros((self.num_envs, 2))  # predicted P(reward event), P(termination), last step

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        options = {} if options is None else options
        if not isinstance(options, dict) or set(options) - {"prompt"}:
            raise ValueError(f"options may only hold 'prompt' (start images for the envs), got {options!r}")
        row_seeds = self._row_seeds(seed)
        size = self.model.config.image_size
        prompt = options.get("prompt")
        if prompt is not None:
            tensor, images = check_prompt_images(prompt, size, batch=self.num_envs)
            if images.shape[0] == 1:
                tensor, images = tensor.expand(self.num_envs, -1, -1, -1), np.repeat(images, self.num_envs, 0)
        elif self.prompt_bank is None:
            raise ValueError("this checkpoint ships no prompt bank (prompts.npz): pass start frames as "
                             f"envs.reset(options={{'prompt': images}}) with images ({self.num_envs}, {size}, "
                             f"{size}, 3) or ({size}, {size}, 3) uint8")

        # every check passed: now change state
        if seed is not None:
            ints = [s for s in row_seeds if s is not None]
            super().reset(seed=int(np.random.SeedSequence(ints).generate_state(1)[0]) if ints else None)
        if seed is not None or self._row_rngs is None:
            self._row_rngs = [seeding.np_random(s)[0] for s in row_seeds]
        if prompt is None:
            index = np.array([draw_prompt_index(rng, len(self.prompt_bank)) for rng in self._row_rngs])
            clips = prompt_clips(self.prompt_bank, index, self.context_frames)
            tensor = images_to_tensor(clips, self.model.device)
            images = clips[:, -1]
        else:
            index = np.full(self.num_envs, -1)
        self.session = self.model.start(tensor.to(self.model.device), maskgit_steps=self.maskgit_steps,
                                        temperature=self.temperature, top_k=self.top_k,
                                        context_frames=self.context_frames, carry=self.carry)
        self._obs = images.copy()
        self._start_images = images.copy()
        self._steps[:] = 0
        self._probs[:] = 0.0
        self._prev_done[:] = False
        return self._obs.copy(), {**self._info(), "prompt_index": index, "_prompt_index": self._all()}

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        acts = self._check_actions(actions)
        if self.session is None:
            raise gym.error.ResetNeeded("call envs.reset() before envs.step()")
        dev = self.model.device
        # All rows step in one batch, even those about to be reset below: one forward for every env.
        self.session.generator = seeded_generator(self.np_random, dev)
        frames = self.session.step(torch.from_numpy(acts).to(dev))
        prev, obs = self._obs, frames_to_images(frames)
        self._steps += 1
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=np.bool_)
        outcomes = predicted_outcomes(self.model, self.session)
        if outcomes is not None:
            rewards[:], terminated[:], self._probs = outcomes
        if self.reward_fn is not None:
            for i in np.flatnonzero(~self._prev_done):
                rewards[i] = call_reward_fn(self.reward_fn, prev[i].copy(), int(acts[i]), obs[i].copy())

        done_rows = np.flatnonzero(self._prev_done)
        if len(done_rows):
            assert self._row_rngs is not None
            if self.prompt_bank is None:  # no bank: restart from the frames given to the last reset
                clips = self._start_images[done_rows][:, None]
            else:
                index = [draw_prompt_index(self._row_rngs[i], len(self.prompt_bank)) for i in done_rows]
                clips = prompt_clips(self.prompt_bank, index, self.context_frames)
            self.session.reset_rows(torch.from_numpy(done_rows), images_to_tensor(clips, dev))
            images = clips[:, -1]
            obs[done_rows] = images
            self._steps[done_rows] = 0
            rewards[done_rows] = 0.0
            terminated[done_rows] = False
            self._probs[done_rows] = 0.0

        if self.max_episode_steps is None:
            truncated = np.zeros(self.num_envs, dtype=np.bool_)
        else:
            truncated = self._steps >= self.max_episode_steps
        self._prev_done = terminated | truncated
        self._obs = obs
        return obs.copy(), rewards, terminated, truncated, self._info()

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode is None:
            gym.logger.warn("render() without a render_mode: pass render_mode='rgb_array' to make_vec")
            return None
        if self._obs is None:
            raise gym.error.ResetNeeded("call envs.reset() before envs.render()")
        return tuple(o.copy() for o in self._obs)

    def close_extras(self, **kwargs: Any) -> None:
        self.session = None

    def get_action_meanings(self) -> list[str]:
        return action_names(self.action_map, self.single_action_space.n)

    # ------------------------------------------------------------------ internals
    def _row_seeds(self, seed: int | Sequence[int | None] | None) -> list[int | None]:
        n = self.num_envs
        if seed is None:
            return [None] * n
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            if seed < 0:
                raise ValueError(f"seed must be a non-negative int, got {seed}")
            return [int(seed) + i for i in range(n)]
        if isinstance(seed, (list, tuple)):
            ok = lambda s: s is None or (isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0)
            if len(seed) != n or not all(ok(s) for s in seed):
                raise ValueError(f"seed must be an int, None, or a list of {n} non-negative ints (or None), "
                                 f"got {seed!r}")
            return [None if s is None else int(s) for s in seed]
        raise TypeError(f"seed must be an int, None, or a list of {n} ints, got {type(seed).__name__}")

    def _check_actions(self, actions: Any) -> np.ndarray:
        n, k = self.num_envs, self.single_action_space.n
        what = f"an integer array of shape ({n},) with latent actions in [0, {k})"
        if isinstance(actions, (list, tuple)):
            if not all(isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_, np.timedelta64))
                       for a in actions):
                raise TypeError(f"actions must be {what}, got a {type(actions).__name__} holding non-integers")
            try:
                actions = np.asarray(actions, dtype=np.int64)
            except OverflowError:
                raise ValueError(f"actions must be {what}, got {actions!r}") from None
        if not isinstance(actions, np.ndarray):
            raise TypeError(f"actions must be {what}, got {type(actions).__name__}")
        if actions.dtype.kind not in "iu":
            raise TypeError(f"actions must be {what}, got dtype {actions.dtype}")
        if actions.shape != (n,):
            raise ValueError(f"actions must be {what}, got shape {actions.shape}")
        if actions.min() < 0 or actions.max() >= k:
            raise ValueError(f"actions must be {what}, got range [{actions.min()}, {actions.max()}]")
        return actions.astype(np.int64)

    def _all(self) -> np.ndarray:
        return np.ones(self.num_envs, dtype=np.bool_)

    def _info(self) -> dict[str, Any]:
        """Gymnasium's vector info layout: an array per key and a boolean "_key" array saying which envs
        have it (all of them here)."""
        info: dict[str, Any] = {
            "step": self._steps.copy(),
            "maskgit_steps": np.full(self.num_envs, self.maskgit_steps),
            "temperature": np.full(self.num_envs, self.temperature),
        }
        if self.model.outcomes is not None:
            info["reward_probability"] = self._probs[:, 0].copy()
            info["termination_probability"] = self._probs[:, 1].copy()
        for key in list(info):
            info["_" + key] = self._all()
        return info
