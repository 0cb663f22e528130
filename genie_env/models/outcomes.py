"""Reward and episode-end heads: what a transition t -> t+1 of the game yields, predicted from what the
dynamics sees when it generates frame t+1 (the frames up to t and the latent action a_t), as the reward
and termination heads beside the dynamics of DIAMOND, IRIS and DreamerV3.

Axes: b batch, n tokens of a frame (h*w), h w token grid, d input width, w head width.

Two inputs (``config.outcome_input``):

* ``hidden``: the dynamics' normalised hidden states of its first MaskGIT pass over frame t+1 (every
  token masked, conditioned on the context and a_t). At play time that pass runs anyway, so the heads
  cost one small convolution per step.
* ``tokens``: the tokens of frame t and a_t, embedded; with ``outcome_frames`` 2 also those of frame t-1
  (their own embedding, plus a learned vector where a token changed: how things move).

Both go through the same trunk: a per-token projection, two 3x3 convolutions over the token grid (an
event is local: the player touching the coin or a saw), then max- and mean-pooling and an MLP to two
logits: a reward event (reward > 0) and a termination (the game ended the episode; a time limit is not
one). Events are rare, so training weights them ``outcome_pos_weight`` times; ``logit_offset`` takes
that weight back out, so that the probabilities are those of the real game.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from genie_env.config import GenieConfig

__all__ = ["OutcomeModel", "EVENTS"]

EVENTS = ("reward", "terminated")
"""The heads' outputs, in order."""


class OutcomeModel(nn.Module):
    def __init__(self, config: GenieConfig) -> None:
        super().__init__()
        if config.outcome_input == "none":
            raise ValueError("OutcomeModel needs config.outcome_input 'hidden' or 'tokens', got 'none'")
        self.input = config.outcome_input
        self.grid = config.token_grid
        w = config.outcome_dim
        if self.input == "hidden":
            self.proj = nn.Linear(config.dynamics_dim, w)
        else:
            self.token_emb = nn.Embedding(config.tokenizer_vocab_size, w)
            self.pos_emb = nn.Parameter(torch.randn(config.tokens_per_frame, w) * 0.02)
            self.action_emb = nn.Embedding(config.action_vocab_size, w)
            if config.outcome_frames == 2:
                self.prev_emb = nn.Embedding(config.tokenizer_vocab_size, w)
                self.changed = nn.Parameter(torch.randn(w) * 0.02)
        self.frames = config.outcome_frames if self.input == "tokens" else 1
        self.reward_terminates = bool(config.outcome_reward_terminates)
        self.conv = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU()
        )
        self.out = nn.Sequential(nn.Linear(2 * w, w), nn.GELU(), nn.Linear(w, len(EVENTS)))
        self.register_buffer("logit_offset", torch.zeros(len(EVENTS)))
        """Added to the trained logits: -log(outcome_pos_weight), so that probabilities are the game's."""
        self.register_buffer("threshold", torch.full((len(EVENTS),), 0.5))
        """An event is predicted when its probability exceeds this."""
        self.register_buffer("event_reward", torch.ones(()))
        """The reward returned for a predicted reward event: the mean reward of the training data's events
        (CoinRun: every event is the coin's 10)."""

    def forward(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """features: (b, n, d) hidden states ("hidden"), or long tokens ("tokens"): (b, n) of frame t, or
        (b, 2, n) of frames t-1 and t (``outcome_frames`` 2); action: (b,) long a_t. Returns (b, 2) raw
        logits (without ``logit_offset``)."""
        if self.input == "hidden":
            x = self.proj(features.to(self.proj.weight.dtype))
        else:
            prev, cur = features.unbind(1) if self.frames == 2 else (None, features)
            x = self.token_emb(cur) + self.pos_emb + self.action_emb(action)[:, None]
            if prev is not None:
                x = x + self.prev_emb(prev) + (prev != cur)[..., None] * self.changed
        x = rearrange(x, "b (h w) c -> b c h w", h=self.grid)
        x = self.conv(x).flatten(2)  # (b, w, n)
        return self.out(torch.cat([x.amax(-1), x.mean(-1)], dim=1))

    def probabilities(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """(b, 2) float probabilities of a reward event and of a termination."""
        return torch.sigmoid(self(features, action).float() + self.logit_offset)

    def fire(self, probs: torch.Tensor) -> torch.Tensor:
        """(b, 2) probabilities -> (b, 2) bool predicted events: over the thresholds, and with
        ``outcome_reward_terminates`` a termination wherever a reward event is predicted."""
        fire = probs > self.threshold.to(probs.device)
        if self.reward_terminates:
            fire[:, 1] |= fire[:, 0]
        return fire

    def decide(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 2) probabilities -> rewards (b,) float and terminated (b,) bool."""
        fire = self.fire(probs)
        reward = torch.where(fire[:, 0], self.event_reward.float(), torch.zeros((), device=probs.device))
        return reward, fire[:, 1]

    def loss(self, features: torch.Tensor, action: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor, pos_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted binary cross-entropy of both heads.

        targets: (b, 2) float 0/1 events; weights: (b,) importance weights that turn the sampled batch back
        into the game's distribution of transitions; events weigh ``pos_weight`` times more on top.
        """
        logits = self(features, action).float()
        w = weights[:, None] * torch.where(targets > 0, pos_weight, 1.0)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        per_head = (w * bce).sum(0) / w.sum(0).clamp_min(1e-12)
        logs = {f"{name}_bce": per_head[i].detach() for i, name in enumerate(EVENTS)}
        with torch.no_grad():
            fire = logits > 0
            for i, name in enumerate(EVENTS):
                pos = targets[:, i] > 0
                logs[f"{name}_hit"] = fire[pos, i].float().mean() if pos.any() else torch.tensor(float("nan"))
        return per_head.sum(), logs
