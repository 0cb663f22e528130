"""`Genie`: the video tokenizer, the latent action model and the dynamics model composed behind the
seed API (generate / play / infer_actions / tokenize / detokenize), plus `GenieSession`, the stateful
rollout that the environment steps.

Axes: b batch, c channels (3), t time, H W pixels, h w token grid, n tokens per frame.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genie_env.config import GenieConfig, preset_config
from genie_env.hub import HubMixin
from genie_env.models.dynamics import DynamicsModel
from genie_env.models.latent_actions import LatentActionModel
from genie_env.models.outcomes import OutcomeModel
from genie_env.models.tokenizer import VideoTokenizer
from genie_env.validation import check_actions, check_frames, check_tokens

__all__ = ["Genie", "GenieSession", "carry_unchanged", "resolve_carry"]


GENERATE_MAX_BYTES = 4 * 2**30
"""`Genie.generate` returns every frame in one tensor; longer rollouts go through a `GenieSession`."""

FUSED_COMMIT_MAX_BATCH = 4
"""Largest batch whose sessions commit a frame in the next step's first pass (`GenieSession.fuse_commit`):
the pass over both frames costs 0.85x a commit pass plus a MaskGIT pass at batch 1, 0.93x at 2, about 1x
at 4 to 16 and 1.14x at 32, where the matmuls already run near the peak (fp32, one thread, AVX2 class)."""


def resolve_carry(config: GenieConfig, carry: bool | None) -> bool:
    """Whether a session carries unchanged tokens' patches over: ``carry``, or None for the config's
    ``carry_unchanged``; never with a context-aware tokenizer, whose tokens code a frame against the one
    before (an unchanged token is not an unchanged patch there)."""
    if carry is not None and not isinstance(carry, bool):
        raise TypeError(f"carry must be True, False or None (the config's carry_unchanged), got {carry!r}")
    if carry and config.tokenizer_context:
        raise ValueError("carry=True needs a per-frame tokenizer: with tokenizer_context the tokens code a frame "
                         "against the one before, so an unchanged token does not mean an unchanged patch")
    return bool(config.carry_unchanged if carry is None else carry) and not config.tokenizer_context


def carry_unchanged(frame: torch.Tensor, previous: torch.Tensor, changed: torch.Tensor, margin: int) -> torch.Tensor:
    """Skip blocks: ``frame`` (b, 3, H, W) where a token changed, or lies within ``margin`` token positions
    of one that did, and ``previous`` (the frame shown before) elsewhere. changed: (b, h, w) bool."""
    b, h, w = changed.shape
    grid = changed.view(b, 1, h, w).float()
    if margin > 0:
        grid = F.max_pool2d(grid, 2 * margin + 1, stride=1, padding=margin)
    mask = F.interpolate(grid, size=frame.shape[-2:], mode="nearest") > 0
    return torch.where(mask, frame, previous.to(frame.dtype))


class Genie(nn.Module, HubMixin):
    """A Genie world model. Frames are float tensors in [0, 1] of shape (B, 3, H, W) or (B, 3, T, H, W).

    Example:
        >>> model = Genie.from_pretrained()           # the shipped default model
        >>> frames = model.generate(prompt, num_frames=16)
        >>> session = model.start(prompt); next_frame = session.step(torch.tensor([3]))
    """

    def __init__(self, config: GenieConfig | None = None) -> None:
        super().__init__()
        self.config = config or GenieConfig()
        self.tokenizer = VideoTokenizer(self.config)
        self.latent_actions = LatentActionModel(self.config)
        self.dynamics = DynamicsModel(self.config)
        self.outcomes: OutcomeModel | None = (
            OutcomeModel(self.config) if self.config.outcome_input != "none" else None)
        """Reward and episode-end heads (None: the checkpoint has none; the env then returns 0 / False)."""
        self.autocast_dtype: torch.dtype | None = None
        """Set to torch.bfloat16 for bf16 inference (faster on CPUs with AVX-512 bf16)."""
        self.extra_files: dict[str, Path] = {}
        """Files shipped with a loaded checkpoint (prompt bank, action map), by name."""

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        parts = {"tokenizer": count(self.tokenizer), "latent_actions": count(self.latent_actions),
                 "dynamics": count(self.dynamics)}
        if self.outcomes is not None:
            parts["outcomes"] = count(self.outcomes)
        parts["total"] = sum(parts.values())
        return parts

    # ------------------------------------------------------------------ seed API
    @torch.inference_mode()
    def tokenize(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) frames in [0, 1] -> (B, T, h, w) long tokens."""
        frames = check_frames(frames, self.config, "frames", video=True, device=self.device)
        with self._autocast():
            return self.tokenizer.encode(frames)

    @torch.inference_mode()
    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, h, w) long tokens -> (B, 3, T, H, W) frames in [0, 1]."""
        tokens = check_tokens(tokens, self.config, "tokens", device=self.device)
        with self._autocast():
            return self.tokenizer.decode(tokens).float()

    @torch.inference_mode()
    def infer_actions(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) frames, T >= 2 -> (B, T-1) long latent actions in [0, action_vocab_size)."""
        frames = check_frames(frames, self.config, "frames", video=True, min_frames=2, device=self.device)
        with self._autocast():
            return self.latent_actions.infer(frames)

    def start(
        self, prompt: torch.Tensor, generator: torch.Generator | None = None, maskgit_steps: int | None = None,
        temperature: float | None = None, top_k: int | None = None, context_frames: int | None = None,
        carry: bool | None = None,
    ) -> GenieSession:
        """Begin a rollout from prompt frames (B, 3, H, W) or (B, 3, T0, H, W); see `GenieSession`.

        context_frames: frames the model conditions on, counting the one it generates (default and maximum:
        ``config.context_frames``). carry: show unchanged tokens' patches as they were (default
        ``config.carry_unchanged``)."""
        return GenieSession(self, prompt, generator=generator, maskgit_steps=maskgit_steps,
                            temperature=temperature, top_k=top_k, context_frames=context_frames, carry=carry)

    @torch.inference_mode()
    def play(self, current_frame: torch.Tensor, action: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) frame and (B,) latent actions -> the next frame (B, 3, H, W).

        Stateless: the frame is the whole context. For multi-step play keep a `start` session instead.
        """
        frame = check_frames(current_frame, self.config, "current_frame", video=False, device=self.device)
        return self.start(frame, generator=generator).step(action)

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, num_frames: int, actions: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, maskgit_steps: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, carry: bool | None = None
                 ) -> torch.Tensor:
        """Roll out from a prompt (B, 3, H, W) or (B, 3, T0, H, W) to (B, 3, num_frames, H, W).

        The first T0 output frames are the prompt. ``actions`` (B, num_frames - T0) are the latent actions
        of the generated steps; None draws them uniformly from ``generator``.
        """
        prompt = check_frames(prompt, self.config, "prompt", video=None, device=self.device)
        if prompt.dim() == 4:
            prompt = prompt[:, :, None]
        b, t0 = prompt.shape[0], prompt.shape[2]
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < t0:
            raise ValueError(f"num_frames must be an int >= the prompt's {t0} frame(s), got {num_frames!r}")
        n_new = num_frames - t0
        size = self.config.image_size
        out_bytes = b * 3 * num_frames * size * size * 4
        if out_bytes > GENERATE_MAX_BYTES:
            raise ValueError(
                f"num_frames={num_frames} at batch {b} would return {out_bytes / 2**30:.1f} GiB of frames at once "
                f"(limit {GENERATE_MAX_BYTES / 2**30:.0f} GiB); for long rollouts step a session instead: "
                "session = model.start(prompt); frame = session.step(action)")
        if actions is None:
            actions = torch.randint(0, self.config.action_vocab_size, (b, n_new), generator=generator,
                                    device="cpu" if generator is None else generator.device).to(self.device)
        else:
            actions = check_actions(actions, self.config, "actions", shape=(b, n_new), device=self.device)
        session = self.start(prompt, generator=generator, maskgit_steps=maskgit_steps,
                             temperature=temperature, top_k=top_k, carry=carry)
        out = [prompt]
        for i in range(n_new):
            out.append(session.step(actions[:, i])[:, :, None])
        return torch.cat(out, dim=2)

    def outcome_features(self, frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """What the reward / episode-end heads read for the transition out of the last of ``frames``.

        frames: (b, 3, K, H, W) the context, frame t last (K <= context_frames - 1); actions: (b, K) long,
        actions[:, i] the latent action from frame i to i+1 (actions[:, -1] = a_t). Returns (b, n, d) hidden
        states of the dynamics' first MaskGIT pass over frame t+1 ("hidden"), computed as a session at play
        time does (to float rounding: a session may commit frame t in that pass), or tokens ("tokens"): (b, n)
        of frame t, or (b, 2, n) of frames t-1 and t with ``outcome_frames`` 2 (frame t twice when K = 1)."""
        if self.outcomes is None:
            raise ValueError("this model has no reward / episode-end heads (config.outcome_input is 'none')")
        if self.config.outcome_input == "tokens":  # the last frames alone: the tokenizer is per frame
            f = self.config.outcome_frames
            idx = torch.arange(frames.shape[2] - f, frames.shape[2], device=frames.device).clamp_min(0)
            tokens = self.tokenizer.encode(frames[:, :, idx]).flatten(2)  # (b, f, n); repeated first frame
            return tokens[:, -1] if f == 1 else tokens
        tokens = self.tokenizer.encode(frames).flatten(2)  # (b, K, n)
        dyn = self.dynamics
        b, k = tokens.shape[:2]
        cache = dyn.new_cache(b, device=tokens.device, dtype=torch.float32)
        null = torch.full((b, 1), dyn.null_action, dtype=torch.long, device=tokens.device)
        acts_in = torch.cat([null, actions[:, :-1]], dim=1)
        for t in range(k):
            dyn.step(cache, tokens[:, t], acts_in[:, t], commit=True)
        masked = torch.full_like(tokens[:, 0], dyn.mask_id)
        return dyn.step(cache, masked, actions[:, -1], return_features=True)[1]

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> Genie:
        return cls(preset_config(name, **overrides))


class GenieSession:
    """A rollout that keeps its context: each `step` samples one frame with MaskGIT against the cached
    keys and values of past frames (at most ``context_frames - 1`` of them), so a step costs the same at
    step 10 and step 10,000.

    Rows of the batch are independent: `reset_rows` restarts some rows from new prompts while the others
    go on (the vector environment's autoreset).

    The cache holds the context but its last frame (``last_tokens``, reached by ``last_action``): the next
    step writes that frame's keys and values, at small batches in its first MaskGIT pass, one forward over
    both frames' rows (`DynamicsModel.step` with ``pending``, one pass fewer a step), else in a pass of its
    own before it.
    """

    def __init__(self, model: Genie, prompt: torch.Tensor, generator: torch.Generator | None = None,
                 maskgit_steps: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, context_frames: int | None = None, carry: bool | None = None) -> None:
        cfg = model.config
        self.model = model
        self.generator = generator
        self.maskgit_steps = int(maskgit_steps if maskgit_steps is not None else cfg.maskgit_steps)
        self.temperature = float(temperature if temperature is not None else cfg.temperature)
        self.top_k = int(top_k if top_k is not None else cfg.top_k)
        if self.maskgit_steps < 1:
            raise ValueError(f"maskgit_steps must be >= 1, got {self.maskgit_steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_k <= cfg.tokenizer_vocab_size:
            raise ValueError(f"top_k must be in [0, {cfg.tokenizer_vocab_size}], got {self.top_k}")
        self.carry = resolve_carry(cfg, carry)
        """Show the patches of unchanged tokens as they were shown (`carry_unchanged`; per-frame tokenizers)."""
        prompt = check_frames(prompt, cfg, "prompt", video=None, device=model.device)
        if prompt.dim() == 4:
            prompt = prompt[:, :, None]
        self.batch_size = prompt.shape[0]
        if context_frames is not None and (isinstance(context_frames, bool) or not isinstance(context_frames, int)):
            raise TypeError(f"context_frames must be an int, got {context_frames!r}")
        # keys and values are computed in the autocast dtype: storing them in it loses nothing and spares
        # converting the whole cache at every pass
        self.cache = model.dynamics.new_cache(self.batch_size, device=model.device, window=context_frames,
                                              dtype=model.autocast_dtype or torch.float32)
        self.steps = torch.zeros(self.batch_size, dtype=torch.long)
        self.fuse_commit = self.batch_size <= FUSED_COMMIT_MAX_BATCH
        """Commit the last frame in the next step's first MaskGIT pass; False: in a pass of its own before
        it (the same computation, one pass more a step; faster at large batches on a CPU)."""
        self.last_outcomes: torch.Tensor | None = None
        """(B, 2) probabilities of a reward event and of a termination in the last step (None without
        heads or before the first step)."""
        self._prime(prompt, None)

    @torch.inference_mode()
    def _prime(self, prompt: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Encode prompt frames (b, 3, T0, H, W) into the cache rows (all rows when None); the last one
        becomes the rows' pending frame (``last_tokens``, ``last_action``), in place of any other."""
        m = self.model
        dyn = m.dynamics
        with m._autocast():
            tokens = m.tokenizer.encode(prompt).flatten(2)  # (b, T0, n)
            b, t0 = tokens.shape[:2]
            acts = torch.full((b, t0), dyn.null_action, dtype=torch.long, device=tokens.device)
            if t0 > 1:
                acts[:, 1:] = m.latent_actions.infer(prompt)
            for t in range(t0 - 1):
                dyn.step(self.cache, tokens[:, t], acts[:, t], rows=rows, commit=True)
        if rows is None:
            self.last_frame = prompt[:, :, -1].clone()
            self.prev_tokens = tokens[:, max(t0 - 2, 0)].clone()
            """(B, n) tokens of the frame before the last (the last one for a one-frame prompt)."""
            self.last_tokens = tokens[:, -1].clone()
            self.last_action = acts[:, -1].clone()
            """(B,) long latent action that led to the last frame (null_action for a one-frame prompt)."""
        else:
            # out of place: earlier steps' tokens, which callers may hold, stay as they were
            self.last_frame[rows] = prompt[:, :, -1]
            self.prev_tokens = self.prev_tokens.clone()
            self.prev_tokens[rows] = tokens[:, max(t0 - 2, 0)]
            self.last_tokens = self.last_tokens.clone()
            self.last_tokens[rows] = tokens[:, -1]
            self.last_action[rows] = acts[:, -1]

    @torch.inference_mode()
    def step(self, action: torch.Tensor) -> torch.Tensor:
        """Advance every row by one frame under latent actions (B,) long; returns frames (B, 3, H, W)."""
        m = self.model
        action = check_actions(action, m.config, "action", shape=(self.batch_size,), device=m.device)
        with m._autocast():
            pending = (self.last_tokens, self.last_action)
            if not self.fuse_commit:
                m.dynamics.step(self.cache, *pending, commit=True)
                pending = None
            tokens, hidden = m.dynamics.sample_frame(
                self.cache, action, self.maskgit_steps, self.temperature, self.top_k,
                m.config.maskgit_schedule, self.generator, return_features=True, pending=pending,
            )
            if m.outcomes is not None:
                if m.config.outcome_input == "hidden":
                    features = hidden
                elif m.config.outcome_frames == 2:
                    features = torch.stack([self.prev_tokens, self.last_tokens], 1)
                else:
                    features = self.last_tokens
                self.last_outcomes = m.outcomes.probabilities(features, action)
            grid = m.config.token_grid
            frame = m.tokenizer.decode(tokens.view(-1, 1, grid, grid), context=self.last_frame)[:, :, 0].float()
            if self.carry:
                changed = (tokens != self.last_tokens).view(-1, grid, grid)
                frame = carry_unchanged(frame, self.last_frame, changed, m.config.carry_margin)
        self.last_frame = frame
        self.prev_tokens = self.last_tokens
        self.last_tokens = tokens
        self.last_action = action.clone()  # (the caller's tensor may be a view of an array it reuses)
        self.steps += 1
        return frame

    @torch.inference_mode()
    def reset_rows(self, rows: torch.Tensor, prompt: torch.Tensor) -> None:
        """Restart the given rows (long indices or a (B,) bool mask) from prompt frames (k, 3, [T0,] H, W)."""
        if rows.dtype == torch.bool:
            rows = rows.nonzero()[:, 0]
        rows = rows.to(self.cache.age.device)
        prompt = check_frames(prompt, self.model.config, "prompt", video=None, device=self.model.device)
        if prompt.dim() == 4:
            prompt = prompt[:, :, None]
        if prompt.shape[0] != rows.numel():
            raise ValueError(f"prompt has {prompt.shape[0]} rows for {rows.numel()} rows to reset")
        if rows.numel() == 0:
            return
        self.cache.clear(rows)
        self._prime(prompt, rows)
        self.steps[rows.cpu()] = 0
