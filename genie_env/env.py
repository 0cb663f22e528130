"""`GenieEnv`: a trained Genie world model played as a Gymnasium environment: the paper's inference
loop (Bruce et al. 2024, "Inference: Action-Controllable Video Generation"), a prompt frame and then one
latent action per step, each step sampling the next frame with MaskGIT.

Also the pieces `GenieVectorEnv` shares with it: loading the model and the files its checkpoint ships
(prompt bank, action map), checking prompts and actions that users pass in, frames to uint8 images.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from genie_env.hub import CheckpointError
from genie_env.models.genie import Genie, GenieSession, resolve_carry
from genie_env.precision import autocast_dtype, resolve_dtype

__all__ = ["GenieEnv", "RewardFn"]

RewardFn = Callable[[np.ndarray, int, np.ndarray], float]
"""reward_fn(prev_obs, action, obs) -> float, called once per step."""


# ---------------------------------------------------------------------------------------- shared helpers
def load_model(checkpoint: str | Path | None, model: Genie | None, device: str | torch.device | None,
               dtype: str | None) -> Genie:
    """The model an environment plays: ``model`` as given, else loaded from ``checkpoint`` (None = the
    shipped default). Sets ``model.autocast_dtype`` from ``dtype`` ("bf16", "fp32"; None = the rule of
    `genie_env.precision`: bf16 where the device runs it natively, else fp32)."""
    if dtype is not None:
        resolve_dtype(dtype)  # a bad name fails before a model is loaded
    if model is not None:
        if checkpoint is not None:
            raise ValueError("pass either checkpoint or model, not both")
        if not isinstance(model, Genie):
            raise TypeError(f"model must be a genie_env.Genie, got {type(model).__name__}")
        wanted = None if device is None else torch.device(device)
        # torch.device("cuda") and a model on cuda:0 are the same place
        if wanted is not None and (wanted.type != model.device.type or wanted.index not in (None, model.device.index)):
            raise ValueError(f"device={device!r} but the given model is on {model.device}: move the model "
                             "first or leave device unset")
    else:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = Genie.from_pretrained(checkpoint, device=device)
    model.eval()
    model.autocast_dtype = autocast_dtype(resolve_dtype(dtype, model.device))
    return model


def load_prompt_bank(model: Genie) -> np.ndarray | None:
    """The checkpoint's prompts, or None when it ships none: N start frames (N, H, W, 3) uint8, or N short
    real clips (N, T, H, W, 3) whose last frame is the start frame and whose earlier frames prime the model
    with the motion before it (`prompt_clips`)."""
    path = model.extra_files.get("prompts.npz")
    if path is None:
        return None
    size = model.config.image_size
    try:
        with np.load(path, allow_pickle=False) as data:
            frames = data["frames"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read the prompt bank (expected an npz with a 'frames' array): "
                              f"{e}") from e
    max_t = max_prompt_frames(model.config.context_frames)
    if (frames.dtype != np.uint8 or frames.ndim not in (4, 5) or frames.shape[-3:] != (size, size, 3)
            or not len(frames) or (frames.ndim == 5 and not 1 <= frames.shape[1] <= max_t)):
        raise CheckpointError(f"{path}: 'frames' must be uint8 of shape (N, {size}, {size}, 3) (start frames) or "
                              f"(N, T, {size}, {size}, 3) with 1 <= T <= {max_t} (clips ending at the "
                              f"start frame), N >= 1; got {frames.dtype} {frames.shape}")
    return frames


def max_prompt_frames(context_frames: int) -> int:
    """The most prompt frames a context window of ``context_frames`` primes with: it keeps room for the
    frame generated next (at least one, the start frame)."""
    return max(context_frames - 1, 1)


def prompt_clips(bank: np.ndarray, index: Any, context_frames: int) -> np.ndarray:
    """Bank entries ``index`` (a list or array of ints) as clips (B, T, H, W, 3), the start frame last. A
    bank of single frames gives T = 1; a clip keeps at most its last ``context_frames - 1`` frames, so that
    the context window has room for the frame generated next."""
    clips = bank[index]
    if clips.ndim == 4:
        clips = clips[:, None]
    return clips[:, -max_prompt_frames(context_frames):]


def load_action_map(model: Genie) -> dict[str, int]:
    """The checkpoint's action map: group name ("LEFT", "RIGHT+UP", "NONE", ...) -> latent action.
    Empty when it ships none."""
    path = model.extra_files.get("action_map.json")
    if path is None:
        return {}
    n = model.config.action_vocab_size
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the action map: {e}") from e
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n for k, v in data.items()
    ):
        raise CheckpointError(f"{path}: the action map must be a JSON object of names to latent actions in "
                              f"[0, {n}), got {data!r}")
    return {k.upper(): v for k, v in data.items()}


def action_names(action_map: dict[str, int], n: int) -> list[str]:
    """A name per latent action: the first group mapped to it (NONE last), else "LATENT_<i>"."""
    names = [f"LATENT_{i}" for i in range(n)]
    for name, a in sorted(action_map.items(), key=lambda kv: kv[0] == "NONE", reverse=True):
        names[a] = name
    return names


def check_settings(model: Genie, maskgit_steps: int | None, temperature: float | None, top_k: int | None,
                   context_frames: int | None) -> tuple[int, float, int, int]:
    """Sampling settings with the model's defaults filled in, each checked with a message naming it."""
    cfg = model.config
    if maskgit_steps is None:
        maskgit_steps = cfg.maskgit_steps
    if isinstance(maskgit_steps, bool) or not isinstance(maskgit_steps, numbers.Integral) or maskgit_steps < 1:
        raise ValueError(f"maskgit_steps must be an int >= 1, got {maskgit_steps!r}")
    if temperature is None:
        temperature = cfg.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite float >= 0 (0 = greedy), got {temperature!r}")
    if top_k is None:
        top_k = cfg.top_k
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 <= top_k <= cfg.tokenizer_vocab_size:
        raise ValueError(f"top_k must be an int in [0, {cfg.tokenizer_vocab_size}] (0 = all), got {top_k!r}")
    if context_frames is None:
        context_frames = cfg.context_frames
    if (isinstance(context_frames, bool) or not isinstance(context_frames, numbers.Integral)
            or not 1 <= context_frames <= cfg.context_frames):
        raise ValueError(f"context_frames must be an int in [1, {cfg.context_frames}] (the model's context "
                         f"window), got {context_frames!r}")
    return int(maskgit_steps), float(temperature), int(top_k), int(context_frames)


def check_carry(model: Genie, carry: bool | None) -> bool:
    """Whether frames carry unchanged tokens' patches over (`resolve_carry`), checked before any reset."""
    try:
        return resolve_carry(model.config, bool(carry) if isinstance(carry, np.bool_) else carry)
    except TypeError as e:  # as the env's other settings: a bad value is a ValueError
        raise ValueError(str(e)) from None


def check_render_mode(render_mode: str | None, modes: list[str]) -> None:
    if render_mode is not None and render_mode not in modes:
        raise ValueError(f"render_mode must be one of {modes} or None, got {render_mode!r}")


def check_reward_fn(reward_fn: Any) -> None:
    if reward_fn is not None and not callable(reward_fn):
        raise TypeError("reward_fn must be callable as reward_fn(prev_obs, action, obs) -> float, "
                        f"got {type(reward_fn).__name__}")


def check_prompt_images(image: Any, size: int, name: str = "prompt", batch: int | None = None
                        ) -> tuple[torch.Tensor, np.ndarray]:
    """A user's prompt image(s) -> (float tensor (B, 3, H, W) in [0, 1], uint8 images (B, H, W, 3)).

    Accepts (H, W, 3) (and, when ``batch`` is given, (batch, H, W, 3)) numpy arrays, uint8 in [0, 255]
    or floating point in [0, 1].
    """
    one = f"({size}, {size}, 3)"
    want = one if batch is None else f"{one} or ({batch}, {size}, {size}, 3)"
    what = f"a numpy array of shape {want}, uint8 in [0, 255] or float in [0, 1]"
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be {what}, got {type(image).__name__}")
    shapes = [(size, size, 3)] + ([] if batch is None else [(batch, size, size, 3)])
    if image.shape not in shapes:
        raise ValueError(f"{name} must have shape {want} (height, width, RGB), got {tuple(image.shape)}")
    if image.dtype == np.uint8:
        images = image.copy()
        floats = image.astype(np.float32) / 255
    elif image.dtype.kind == "f":
        floats = image.astype(np.float32)
        if not np.isfinite(floats).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        lo, hi = float(floats.min()), float(floats.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} float values must be in [0, 1], got range [{lo:.3g}, {hi:.3g}] "
                             "(pass uint8 images as uint8)")
        images = np.round(floats * 255).astype(np.uint8)
    else:
        raise TypeError(f"{name} must be uint8 in [0, 255] or floating point in [0, 1], got dtype {image.dtype}")
    if images.ndim == 3:
        images, floats = images[None], floats[None]
    tensor = torch.from_numpy(np.ascontiguousarray(floats.transpose(0, 3, 1, 2)))
    return tensor, images


def images_to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1] on ``device``; clips (B, T, H, W, 3) ->
    (B, 3, T, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.permute(0, 4, 1, 2, 3)
    return x.float().div(255)


def frames_to_images(frames: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, a new array (never a view of the tensor)."""
    x = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy().copy()


def predicted_outcomes(model: Genie, session: GenieSession) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """What the model's reward / episode-end heads said of the session's last step: rewards (B,) float64,
    terminated (B,) bool and the probabilities (B, 2), copied to the host in one transfer; None without
    heads."""
    probs = session.last_outcomes
    if probs is None:
        return None
    assert model.outcomes is not None
    rewards, ends = model.outcomes.decide(probs)
    host = torch.cat([rewards[:, None], ends[:, None].float(), probs.float()], dim=1).cpu().numpy()
    return host[:, 0].astype(np.float64), host[:, 1] > 0, host[:, 2:].astype(np.float64)


def seeded_generator(rng: np.random.Generator, device: torch.device) -> torch.Generator:
    """A torch generator seeded from ``rng``: MaskGIT's draws then follow the env's seed (check_env)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(rng.integers(0, 2**63 - 1)))
    return gen


# ---------------------------------------------------------------------------------------- the env
class GenieEnv(gym.Env[np.ndarray, np.int64]):
    """
    ## Description

    A game that a Genie world model dreams up frame by frame (Bruce et al. 2024, "Genie: Generative
    Interactive Environments"). The model learned from videos alone which few discrete *latent actions*
    explain the changes between frames; playing it means choosing one of those latent actions per step,
    and the model samples the next frame with MaskGIT given the frames so far.

    ## Action Space

    `Discrete(action_vocab_size)` (8 for the shipped model): a latent action. The checkpoint's action map
    (`env.action_map`, e.g. `{"LEFT": 1, "RIGHT": 2, "UP": 3, "LEFT+UP": 4, "RIGHT+UP": 5, "NONE": 0}`,
    UP = jump) says which latent action does what; `env.get_action_meanings()` names each one.
    Actions are ints, numpy integer scalars or 0-d integer arrays.

    ## Observation Space

    `Box(0, 255, (H, W, 3), uint8)`: the current RGB frame (64 x 64 for the shipped model).

    ## Rewards

    When the checkpoint has reward / episode-end heads (`model.outcomes`; the shipped model's model card
    says whether it does), the predicted reward of each transition: the mean event reward of the training
    data (CoinRun: 10, the coin) when the predicted probability of a reward event exceeds the head's
    threshold, else 0.0. Without heads, 0.0 per step. `info["reward_probability"]` and
    `info["termination_probability"]` hold the predicted probabilities. A `reward_fn(prev_obs, action,
    obs) -> float` replaces the reward (e.g. a detector of coins on screen).

    ## Starting State

    A real frame drawn (with the env's seed) from the prompt bank shipped with the checkpoint, or the
    image given as `env.reset(options={"prompt": image})`: an (H, W, 3) numpy array, uint8 or float in
    [0, 1]. A bank of short real clips (the shipped one: 4 frames) primes the model with the frames before
    the start frame, so that it sees how the player moves (whether it is in the air, how fast it falls);
    the first observation is the clip's last frame.

    ## Episode End

    Terminated when the checkpoint's episode-end head predicts that the game ends the episode (CoinRun:
    the coin or a death); never without heads. `gym.make("Genie-v0")` truncates after
    1000 steps (about a minute at 15 frames per second): long enough for a level's worth of play, short
    enough that agents see fresh prompts often, since an autoregressive model drifts away from the data
    the longer it dreams.

    ## Arguments

    ```python
    import gymnasium as gym
    import genie_env

    env = gym.make("Genie-v0", checkpoint=None, device=None, maskgit_steps=None, temperature=None,
                   context_frames=None, carry=None, reward_fn=None, render_mode=None)
    ```

    * `checkpoint`: a local checkpoint folder or a hub repo id; None = the shipped default model.
    * `model`: an already loaded `Genie` to play instead of loading one (shared, not copied).
    * `device`: where the model runs; None = CUDA when available, else the CPU.
    * `dtype`: "bf16" or "fp32" inference; None = bf16 where the hardware runs it natively (a CPU with
      AVX512_BF16 or AMX, a CUDA GPU with bf16), else fp32 (`genie_env.precision`).
    * `maskgit_steps`, `temperature`, `top_k`: MaskGIT sampling; None = the model's config. Fewer steps
      are faster and blurrier, temperature 0 is greedy.
    * `context_frames`: how many frames the model conditions on (including the one it generates), at most
      the model's `config.context_frames` (the default); fewer makes it forget sooner.
    * `carry`: show the patches whose tokens a step left unchanged as they were shown, sharp as the start
      frame, instead of decoding them again (skip blocks); None = the model's `config.carry_unchanged`
      (on for the shipped model). Only what is drawn changes: the tokens, rewards and endings do not.
    * `reward_fn`: see Rewards.
    * `render_mode`: "rgb_array" (the frame) or "human" (a pygame window).
    """

    metadata = {"render_modes": ["human", "rgb_array"], "render_fps": 15}

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
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
        check_render_mode(render_mode, self.metadata["render_modes"])
        check_reward_fn(reward_fn)
        self.model = load_model(checkpoint, model, device, dtype)
        self.maskgit_steps, self.temperature, self.top_k, self.context_frames = check_settings(
            self.model, maskgit_steps, temperature, top_k, context_frames)
        self.carry = check_carry(self.model, carry)
        self.reward_fn = reward_fn
        self.render_mode = render_mode
        self.prompt_bank = load_prompt_bank(self.model)
        self.action_map = load_action_map(self.model)

        cfg = self.model.config
        self.observation_space = spaces.Box(0, 255, (cfg.image_size, cfg.image_size, 3), np.uint8)
        self.action_space = spaces.Discrete(cfg.action_vocab_size)

        self._session: GenieSession | None = None
        self._obs: np.ndarray | None = None
        self._steps = 0
        self._probs = [0.0, 0.0]  # predicted probabilities of a reward event and a termination, last step
        self._window = None  # pygame display surface, "human" mode only
        self._clock = None

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        options = {} if options is None else options
        if not isinstance(options, dict) or set(options) - {"prompt"}:
            raise ValueError(f"options may only hold 'prompt' (an image to start from), got {options!r}")
        super().reset(seed=seed)
        size = self.model.config.image_size
        if options.get("prompt") is not None:
            prompt, images = check_prompt_images(options["prompt"], size)
            prompt = prompt.to(self.model.device)
            index = -1
        else:
            if self.prompt_bank is None:
                raise ValueError("this checkpoint ships no prompt bank (prompts.npz): pass a start frame as "
                                 f"env.reset(options={{'prompt': image}}) with image a ({size}, {size}, 3) uint8 array")
            index = draw_prompt_index(self.np_random, len(self.prompt_bank))
            clips = prompt_clips(self.prompt_bank, [index], self.context_frames)
            prompt = images_to_tensor(clips, self.model.device)
            images = clips[:, -1]
        # Sampling draws happen in `step`, each seeded from np_random; priming the cache draws nothing.
        self._session = self.model.start(prompt, maskgit_steps=self.maskgit_steps, temperature=self.temperature,
                                         top_k=self.top_k, context_frames=self.context_frames, carry=self.carry)
        self._obs = images[0].copy()
        self._steps = 0
        self._probs = [0.0, 0.0]
        if self.render_mode == "human":
            self.render()
        return self._obs.copy(), {**self._info(), "prompt_index": index}

    def step(self, action: int | np.integer | np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = check_action(action, self.action_space.n)
        if self._session is None:
            raise gym.error.ResetNeeded("call env.reset() before env.step()")
        self._session.generator = seeded_generator(self.np_random, self.model.device)
        frame = self._session.step(torch.tensor([a], device=self.model.device))
        prev, self._obs = self._obs, frames_to_images(frame)[0]
        self._steps += 1
        reward, terminated = 0.0, False
        outcomes = predicted_outcomes(self.model, self._session)
        if outcomes is not None:
            reward, terminated = float(outcomes[0][0]), bool(outcomes[1][0])
            self._probs = outcomes[2][0].tolist()
        if self.reward_fn is not None:
            reward = call_reward_fn(self.reward_fn, prev.copy(), a, self._obs.copy())
        if self.render_mode == "human":
            self.render()
        return self._obs.copy(), reward, terminated, False, self._info()

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            gym.logger.warn("render() without a render_mode: pass render_mode='rgb_array' or 'human' to the env")
            return None
        if self._obs is None:
            raise gym.error.ResetNeeded("call env.reset() before env.render()")
        if self.render_mode == "rgb_array":
            return self._obs.copy()
        self._render_human()
        return None

    def close(self) -> None:
        self._session = None
        if self._window is not None:
            import pygame

            pygame.display.quit()
            self._window = None
            self._clock = None

    # ------------------------------------------------------------------ extras
    def get_action_meanings(self) -> list[str]:
        """A name per latent action, from the checkpoint's action map ("LATENT_<i>" when unmapped)."""
        return action_names(self.action_map, self.action_space.n)

    def get_keys_to_action(self) -> dict[tuple[int, ...], int]:
        """Key combinations -> latent actions for `gymnasium.utils.play.play`: arrows / WASD through the
        action map (two keys for LEFT+UP and RIGHT+UP), and number keys 1-9 picking latent actions 0-8
        directly (the only keys when the checkpoint ships no action map)."""
        from genie_env.keys import keys_to_action

        return keys_to_action(self.action_map, self.action_space.n)

    # ------------------------------------------------------------------ internals
    def _info(self) -> dict[str, Any]:
        info = {"step": self._steps, "maskgit_steps": self.maskgit_steps, "temperature": self.temperature}
        if self.model.outcomes is not None:
            info["reward_probability"], info["termination_probability"] = self._probs
        return info

    def _render_human(self) -> None:
        try:
            import pygame
        except ImportError as e:
            raise gym.error.DependencyNotInstalled(
                "render_mode='human' needs pygame: pip install 'genie-env[viewer]'") from e
        assert self._obs is not None
        h, w = self._obs.shape[:2]
        scale = max(1, 512 // max(h, w))
        if self._window is None:
            pygame.display.init()
            pygame.display.set_caption("Genie-v0")
            self._window = pygame.display.set_mode((w * scale, h * scale))
            self._clock = pygame.time.Clock()
        surface = pygame.surfarray.make_surface(self._obs.transpose(1, 0, 2))
        self._window.blit(pygame.transform.scale(surface, (w * scale, h * scale)), (0, 0))
        pygame.event.pump()
        pygame.display.flip()
        self._clock.tick(self.metadata["render_fps"])


def draw_prompt_index(rng: np.random.Generator, n: int) -> int:
    """Which of the n bank prompts to start from (one definition, so that the vector env's row i and a
    single env seeded alike start from the same frame)."""
    return int(rng.integers(n))


def check_action(action: Any, n: int, name: str = "action") -> int:
    """A single latent action: a python int, numpy integer scalar or 0-d integer array in [0, n)."""
    what = f"an int in [0, {n}) (a latent action)"
    if isinstance(action, (bool, np.bool_)):
        raise TypeError(f"{name} must be {what}, got bool {action!r}")
    if isinstance(action, np.timedelta64):  # numpy counts timedelta64 as an integer type
        raise TypeError(f"{name} must be {what}, got numpy.timedelta64 {action!r}")
    if isinstance(action, np.ndarray):
        if action.shape != ():
            raise ValueError(f"{name} must be a scalar, {what}, got an array of shape {action.shape}")
        if action.dtype.kind not in "iu":
            raise TypeError(f"{name} must be {what}, got an array of dtype {action.dtype}")
        action = action.item()
    elif not isinstance(action, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {type(action).__name__} {action!r}")
    action = int(action)
    if not 0 <= action < n:
        raise ValueError(f"{name} must be {what}, got {action}")
    return action


def call_reward_fn(reward_fn: RewardFn, prev_obs: np.ndarray, action: int, obs: np.ndarray) -> float:
    reward = reward_fn(prev_obs, action, obs)
    if isinstance(reward, bool) or not isinstance(reward, (numbers.Real, np.ndarray)) or np.ndim(reward) != 0:
        raise TypeError(f"reward_fn must return a float, got {type(reward).__name__} {reward!r}")
    return float(reward)
