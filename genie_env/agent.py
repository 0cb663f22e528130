"""A small actor-critic policy that plays Genie-v0 from pixels: the agent trained inside the dream.

The policy picks among a fixed list of the checkpoint's latent actions (by default the ones its action map
names: LEFT, RIGHT, UP, ...), so that every action it learns to take in the dream has a real key to go to
on the real game. The network is the IMPALA CNN (Espeholt et al. 2018) that procgen baselines use, at
channels 16-32-32.

Axes: b batch, h w pixels, c channels, k the policy's actions.

    from genie_env.agent import load_agent
    agent = load_agent()                            # the shipped agent (weights/agent.*)
    latent = agent.act(obs)                         # obs: (b, h, w, 3) uint8 -> (b,) latent actions
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AgentConfig", "DreamAgent", "load_agent", "AGENT_WEIGHTS", "AGENT_CONFIG"]

AGENT_WEIGHTS = "agent.safetensors"
AGENT_CONFIG = "agent.json"


@dataclass
class AgentConfig:
    """What a saved agent needs to be rebuilt."""

    actions: list[int]
    """The latent actions the policy chooses among (its output k is an index into this list)."""
    action_names: list[str] = field(default_factory=list)
    """A name per entry of ``actions`` (the action map's key groups), for people and for the real game."""
    image_size: int = 64
    """Observation height and width."""
    channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    """Channels of the IMPALA CNN's three stages."""
    hidden: int = 256
    """Width of the layer between the CNN and the policy and value heads."""

    def __post_init__(self) -> None:
        if not self.actions or any(not isinstance(a, int) or a < 0 for a in self.actions):
            raise ValueError(f"actions must be a non-empty list of latent action ids (ints >= 0), got {self.actions!r}")
        if len(set(self.actions)) != len(self.actions):
            raise ValueError(f"actions must not repeat a latent action, got {self.actions!r}")
        if self.action_names and len(self.action_names) != len(self.actions):
            raise ValueError(f"action_names must name each of the {len(self.actions)} actions, "
                             f"got {self.action_names!r}")
        if self.image_size < 8 or self.hidden < 1 or len(self.channels) != 3:
            raise ValueError("image_size must be >= 8, hidden >= 1 and channels a list of 3 ints")


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(c, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class _Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.res0 = _Residual(c_out)
        self.res1 = _Residual(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv(x), 3, stride=2, padding=1)
        return self.res1(self.res0(x))


class DreamAgent(nn.Module):
    """IMPALA-CNN actor-critic: (b, h, w, 3) uint8 frames -> logits over the k actions and a value."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__()
        self.config = config
        chans = [3, *config.channels]
        self.stages = nn.Sequential(*[_Stage(chans[i], chans[i + 1]) for i in range(3)])
        side = config.image_size
        for _ in range(3):
            side = (side + 1) // 2
        self.fc = nn.Linear(chans[-1] * side * side, config.hidden)
        self.policy = nn.Linear(config.hidden, len(config.actions))
        self.value = nn.Linear(config.hidden, 1)
        # small initial logits: the untrained policy is close to uniform over its actions
        nn.init.orthogonal_(self.policy.weight, 0.01)
        nn.init.zeros_(self.policy.bias)
        self.register_buffer("latent_ids", torch.tensor(config.actions, dtype=torch.long), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs: (b, h, w, 3) uint8 or float in [0, 255] -> logits (b, k), value (b,)."""
        x = obs.permute(0, 3, 1, 2).float().div(255.0)
        x = self.stages(x)
        x = F.relu(self.fc(F.relu(x).flatten(1)))
        return self.policy(x), self.value(x).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray | torch.Tensor, deterministic: bool = False,
            generator: torch.Generator | None = None) -> np.ndarray:
        """Latent actions for a batch of frames: (b, h, w, 3) uint8 -> (b,) int64 latent action ids."""
        obs_t = _obs_tensor(obs, self.config.image_size, self.device)
        logits, _ = self(obs_t)
        if deterministic:
            k = logits.argmax(-1)
        else:
            k = torch.multinomial(F.softmax(logits.float(), -1), 1, generator=generator).squeeze(-1)
        return self.latent_ids[k].cpu().numpy()

    def index_of(self, latent: np.ndarray) -> np.ndarray:
        """The policy's action index k of each latent action id (the inverse of ``config.actions``)."""
        lookup = {a: i for i, a in enumerate(self.config.actions)}
        return np.array([lookup[int(a)] for a in np.asarray(latent).reshape(-1)], dtype=np.int64)

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> None:
        """Write ``agent.json`` and ``agent.safetensors`` into ``folder`` (each atomically)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (AGENT_WEIGHTS + ".part")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.chmod(0o644)  # written private; a shipped agent is an ordinary file
        tmp.replace(folder / AGENT_WEIGHTS)
        tmp = folder / (AGENT_CONFIG + ".part")
        tmp.write_text(json.dumps(asdict(self.config), indent=1))
        tmp.replace(folder / AGENT_CONFIG)


def load_agent(folder: str | Path | None = None, device: str | torch.device = "cpu") -> DreamAgent:
    """Load an agent saved by `DreamAgent.save`; None = the shipped agent beside the shipped model."""
    from safetensors.torch import load_file

    if folder is None:
        from genie_env.hub import default_weights_dir

        folder = default_weights_dir()
    folder = Path(folder)
    cfg_path, w_path = folder / AGENT_CONFIG, folder / AGENT_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"no agent in {folder}: expected {AGENT_CONFIG} and {AGENT_WEIGHTS} "
                                "(train one with `python -m training.train_agent`)")
    try:
        config = AgentConfig(**json.loads(cfg_path.read_text()))
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path} is not an agent config: {e}") from e
    agent = DreamAgent(config)
    state = load_file(str(w_path))
    missing, unexpected = agent.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{w_path} does not match {cfg_path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return agent.to(device).eval()


def _obs_tensor(obs: np.ndarray | torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    if isinstance(obs, np.ndarray):
        if obs.dtype != np.uint8:
            raise TypeError(f"obs must be uint8 frames, got dtype {obs.dtype}")
        obs = torch.from_numpy(obs)
    if not isinstance(obs, torch.Tensor) or obs.ndim != 4 or tuple(obs.shape[1:]) != (size, size, 3):
        shape = tuple(obs.shape) if hasattr(obs, "shape") else type(obs).__name__
        raise ValueError(f"obs must be (batch, {size}, {size}, 3) frames, got {shape}")
    return obs.to(device)
