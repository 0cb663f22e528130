"""Gymnasium registration of the Genie environments.

String entry points: registering imports neither torch nor the model code; `gym.make` imports them.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

ENV_ID = "Genie-v0"

MAX_EPISODE_STEPS = 1000
"""Truncation of `Genie-v0` episodes: the model never ends an episode itself. 1000 steps is about a
minute at 15 frames per second, a level's worth of play, while agents still see fresh prompts often
(an autoregressive model drifts the longer it dreams)."""


def register_envs() -> None:
    """Register Genie-v0 (single and batched vector env); a no-op when already registered."""
    if ENV_ID in registry:
        return
    register(
        id=ENV_ID,
        entry_point="genie_env.env:GenieEnv",
        vector_entry_point="genie_env.vector_env:GenieVectorEnv",
        max_episode_steps=MAX_EPISODE_STEPS,
    )
