"""genie-env: a trained Genie world model (Bruce et al. 2024) as a Gymnasium environment.

    import gymnasium as gym, genie_env
    env = gym.make("Genie-v0")

or, without the import, ``gym.make("genie_env:Genie-v0")``.
"""

from __future__ import annotations

from genie_env.config import ConfigError, GenieConfig
from genie_env.hub import CheckpointError
from genie_env.models import DynamicsModel, Genie, GenieSession, LatentActionModel, VideoTokenizer
from genie_env.presets import create_genie_cpu, create_genie_large, create_genie_small

__version__ = "0.1.0"

__all__ = [
    "GenieEnv",
    "GenieVectorEnv",
    "CheckpointError",
    "ConfigError",
    "DynamicsModel",
    "Genie",
    "GenieConfig",
    "GenieSession",
    "LatentActionModel",
    "VideoTokenizer",
    "create_genie_cpu",
    "create_genie_large",
    "create_genie_small",
]

# Gymnasium registration: gym.make("Genie-v0") after `import genie_env`.
from genie_env.registration import register_envs  # noqa: E402

register_envs()


def __getattr__(name: str):
    # the environments import gymnasium's env machinery: load them when first asked for
    if name == "GenieEnv":
        from genie_env.env import GenieEnv

        return GenieEnv
    if name == "GenieVectorEnv":
        from genie_env.vector_env import GenieVectorEnv

        return GenieVectorEnv
    raise AttributeError(f"module 'genie_env' has no attribute {name!r}")
