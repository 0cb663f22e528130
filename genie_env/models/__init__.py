"""The three Genie models and their composition."""

from genie_env.models.dynamics import DynamicsModel
from genie_env.models.genie import Genie, GenieSession
from genie_env.models.latent_actions import LatentActionModel
from genie_env.models.tokenizer import VideoTokenizer

__all__ = ["DynamicsModel", "Genie", "GenieSession", "LatentActionModel", "VideoTokenizer"]
