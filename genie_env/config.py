"""`GenieConfig`: every hyperparameter of the Genie model and its training, validated, YAML in/out.

The field names of the seed specification (``num_frames``, ``image_size``, ``tokenizer_vocab_size``,
``action_vocab_size``, ``dynamics_dim``, ``dynamics_depth``, ``dynamics_num_heads``, ``batch_size``,
``learning_rate``, ``maskgit_steps``, ``warmup_steps``, ``max_steps``, ``epochs``) are kept as they are;
the rest are what the three models and the trainer need. One flat dataclass so that a YAML file and
``key=value`` command-line overrides address every field the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["GenieConfig", "ConfigError"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# (low, high) inclusive bounds per numeric field. Upper bounds keep an untrusted config.json from asking
# for absurd allocations (a loader checks the config before any tensor is created).
_INT_RANGES: dict[str, tuple[int, int]] = {
    "num_frames": (1, 1024),
    "image_size": (8, 1024),
    "in_channels": (1, 4),
    "tokenizer_vocab_size": (2, 65536),
    "tokenizer_patch_size": (1, 64),
    "tokenizer_channels": (4, 1024),
    "tokenizer_latent_dim": (2, 1024),
    "tokenizer_num_res_blocks": (0, 16),
    "tokenizer_context": (0, 1),
    "action_vocab_size": (2, 256),
    "lam_context_frames": (1, 16),
    "lam_channels": (4, 1024),
    "lam_latent_dim": (2, 1024),
    "dynamics_dim": (8, 8192),
    "dynamics_depth": (1, 128),
    "dynamics_num_heads": (1, 128),
    "dynamics_mlp_ratio": (1, 16),
    "context_frames": (1, 1024),
    "maskgit_steps": (1, 256),
    "top_k": (0, 65536),
    "batch_size": (1, 65536),
    "warmup_steps": (0, 10**9),
    "outcome_inside": (0, 10**8),
    "max_steps": (1, 10**9),
    "epochs": (1, 10**6),
    "seed": (0, 2**63 - 1),
    "outcome_dim": (4, 4096),
    "outcome_frames": (1, 2),
    "carry_margin": (0, 64),
}
_FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "tokenizer_commitment": (0.0, 100.0),
    "tokenizer_ema_decay": (0.0, 0.99999),
    "tokenizer_dead_code_threshold": (0.0, 1e6),
    "lam_beta": (0.0, 100.0),
    "lam_entropy_weight": (0.0, 100.0),
    "lam_focus": (0.0, 1000.0),
    "temperature": (0.0, 100.0),
    "action_gain": (0.0, 10.0),
    "mask_rate_min": (0.0, 1.0),
    "mask_rate_max": (0.0, 1.0),
    "context_noise": (0.0, 1.0),
    "learning_rate": (0.0, 10.0),
    "weight_decay": (0.0, 10.0),
    "grad_clip": (0.0, 1e6),
    "lambda_action": (0.0, 1e3),
    "lambda_dynamics": (0.0, 1e3),
    "outcome_end_fraction": (0.0, 1.0),
    "outcome_pos_weight": (1.0, 1e6),
    "outcome_inside_fraction": (0.0, 1.0),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "maskgit_schedule": ("cosine", "linear", "exp"),
    "outcome_input": ("none", "hidden", "tokens"),
}


@dataclass
class GenieConfig:
    """Hyperparameters of a Genie model (tokenizer, latent action model, dynamics) and its training.

    Frames are RGB floats in [0, 1] of size ``image_size`` x ``image_size``; the tokenizer turns each
    into an ``image_size / tokenizer_patch_size`` square grid of tokens.
    """

    # --- data ---
    num_frames: int = 16
    """Frames per training clip (and the default rollout length of the seed API)."""
    image_size: int = 64
    """Height and width of the (square) frames."""
    in_channels: int = 3
    """Colour channels (RGB)."""

    # --- video tokenizer (VQ-VAE, per frame; with tokenizer_context 1, also on the frame before) ---
    tokenizer_vocab_size: int = 1024
    """Codebook size of the video tokenizer."""
    tokenizer_patch_size: int = 8
    """Spatial downsampling factor (a power of two): one token per patch of this many pixels square."""
    tokenizer_channels: int = 64
    """Base channel width of the tokenizer's convolutions (doubled once after the first downsampling)."""
    tokenizer_latent_dim: int = 32
    """Dimension of a codebook vector."""
    tokenizer_num_res_blocks: int = 1
    """Residual blocks per resolution level."""
    tokenizer_context: int = 0
    """Previous frames the tokenizer conditions on: 0 codes each frame alone; 1 also gives its encoder and
    decoder the frame before, so tokens code what changed (context-aware tokenization, Delta-IRIS)."""
    tokenizer_commitment: float = 0.25
    """Weight of the commitment loss (encoder output pulled towards its code)."""
    tokenizer_ema_decay: float = 0.99
    """Decay of the EMA codebook updates (0 disables EMA: codebook trained by its loss)."""
    tokenizer_dead_code_threshold: float = 0.05
    """A code whose EMA usage falls below this many assignments per batch is restarted from the data."""

    # --- latent action model (pixel input, as the paper's better variant) ---
    action_vocab_size: int = 8
    """Number of discrete latent actions (the environment's Discrete(n))."""
    lam_context_frames: int = 2
    """Past frames the latent action model sees besides x_{t+1} (2 lets it read velocity)."""
    lam_channels: int = 48
    """Base channel width of the latent action model's convolutions."""
    lam_latent_dim: int = 32
    """Dimension of a latent action code vector."""
    lam_beta: float = 0.25
    """Commitment weight beta in the latent action loss."""
    lam_entropy_weight: float = 0.1
    """Weight of the batch-entropy bonus against latent-action collapse."""
    lam_focus: float = 0.0
    """Extra reconstruction weight on pixels the predicted camera motion does not explain (0 = plain MSE):
    small objects that the action changes (a sprite turning round) then count, not only the scroll."""

    # --- dynamics (ST-transformer, MaskGIT) ---
    dynamics_dim: int = 512
    """Transformer width."""
    dynamics_depth: int = 8
    """Number of ST-transformer blocks."""
    dynamics_num_heads: int = 8
    """Attention heads (must divide dynamics_dim)."""
    dynamics_mlp_ratio: int = 4
    """Hidden width of the feed-forward layers as a multiple of dynamics_dim."""
    context_frames: int = 16
    """Frames the dynamics attends to (including the one being generated); bounds the play-time cache."""
    mask_rate_min: float = 0.0
    """Training mask rate per frame: mask_rate_min + (mask_rate_max - mask_rate_min) * cos(pi/2 * u),
    u ~ U(0, 1); the defaults cover every mask rate MaskGIT sampling feeds the model, at any step count."""
    mask_rate_max: float = 1.0
    """See mask_rate_min."""
    context_noise: float = 0.0
    """Fraction of context tokens replaced by random ones in training (robustness to own samples)."""

    # --- reward and episode-end model (optional; the "reward" training stage) ---
    outcome_input: str = "none"
    """What the reward / episode-end heads read: "hidden" (the dynamics' hidden states of its first MaskGIT
    pass over the frame being generated, conditioned on the latent action: free at play time), "tokens"
    (the current frame's tokens and the latent action), or "none" (no heads: reward 0, never terminated)."""
    outcome_dim: int = 64
    """Width of the reward / episode-end heads."""
    outcome_frames: int = 1
    """With "tokens": the frames whose tokens the heads read, the current one last (2: also the one before,
    which shows how the player and enemies move)."""
    outcome_reward_terminates: bool = False
    """A reward event also ends the episode (CoinRun: taking the coin ends the level): wherever the reward
    head fires, a termination is predicted too, and the termination head's threshold is chosen with that
    rule, so it has only the other endings (deaths) left to find. The reward stage refuses it when a
    recorded reward event did not end its episode."""
    outcome_end_fraction: float = 0.25
    """Reward stage: share of each batch drawn from the transitions out of a video's last frame, where
    every event of a recording sits (the rest uniformly from all transitions)."""
    outcome_pos_weight: float = 20.0
    """Reward stage: loss weight of an event against a non-event (events are rare); the heads subtract
    its log from their logits so that their probabilities are the real game's."""
    outcome_inside: int = 16384
    """Reward stage, token heads: ordinary transitions (neither an episode's end nor one of the 8 before it)
    drawn into the pool of inputs computed once. They are nearly every transition of the game, so a head
    that fires on one in a thousand of them loses most of its precision."""
    outcome_inside_fraction: float = 0.0
    """Reward stage, token heads: share of each batch drawn from the pool's ordinary transitions, on top
    of the uniform draw over everything that is not an end (importance weights keep the loss the game's)."""

    # --- sampling ---
    maskgit_steps: int = 25
    """MaskGIT refinement steps per generated frame."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0 = all)."""
    action_gain: float = 1.0
    """Sampling: the latent actions' embeddings are moved away from their mean by this factor before the
    dynamics reads them (the "no action" of a prompt's first frame is not), so a key moves the frame
    more (> 1) or less (< 1) than the model learned; 1 is the model as trained. Training always uses the
    embeddings as they are."""
    maskgit_schedule: str = "cosine"
    """How many tokens stay masked after each step: cosine (MaskGIT), linear or exp."""
    carry_unchanged: bool = True
    """Rendering: where a generated frame keeps the frame before's token, show that patch as it was shown
    (pixels carried over, not decoded again), as a video codec's skip blocks. The decoder re-draws every
    patch blurrier than the real prompt frame, so carrying keeps what the model left unchanged (the level,
    the background) as sharp as the prompt. The tokens, and so the dynamics and the reward heads, are the
    same either way. Per-frame tokenizers only: with ``tokenizer_context`` a token codes a frame against the
    one before, so an unchanged token is not an unchanged patch, and nothing is carried."""
    carry_margin: int = 1
    """With ``carry_unchanged``: patches within this many token positions of a changed token are decoded
    too (the decoder's convolutions spread a change beyond its own patch)."""

    # --- training ---
    batch_size: int = 4
    """Clips per optimisation step."""
    learning_rate: float = 3e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 5000
    """Linear learning-rate warmup steps (cosine decay after)."""
    max_steps: int = 125000
    """Optimisation steps per stage."""
    epochs: int = 100
    """Upper bound on passes over the data (training stops at max_steps or epochs, whichever first)."""
    grad_clip: float = 1.0
    """Gradient norm clip (0 disables)."""
    lambda_action: float = 1.0
    """Weight of the latent action loss when co-trained with the dynamics."""
    lambda_dynamics: float = 1.0
    """Weight of the dynamics loss."""
    bf16: bool = True
    """bf16 autocast on CPU (about 2.5x faster matmuls on AVX-512 bf16) and on CUDA."""
    gradient_checkpointing: bool = False
    """Recompute dynamics activations in the backward pass to save memory."""
    seed: int = 0
    """Random seed of the run."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (game name, data description); not used by the models."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the first field that is of the wrong type or out of range."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _INT_RANGES:
                if isinstance(value, bool) or not isinstance(value, int):
                    if isinstance(value, float) and value.is_integer():
                        value = int(value)
                        setattr(self, f.name, value)
                    else:
                        raise ConfigError(f"{f.name} must be an integer, got {value!r}")
                lo, hi = _INT_RANGES[f.name]
                if not lo <= value <= hi:
                    raise ConfigError(f"{f.name} must be in [{lo}, {hi}], got {value}")
            elif f.name in _FLOAT_RANGES:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{f.name} must be a number, got {value!r}")
                value = float(value)
                setattr(self, f.name, value)
                lo, hi = _FLOAT_RANGES[f.name]
                if not (lo <= value <= hi) or math.isnan(value):
                    raise ConfigError(f"{f.name} must be in [{lo}, {hi}], got {value}")
            elif f.name in _CHOICES:
                if value not in _CHOICES[f.name]:
                    raise ConfigError(f"{f.name} must be one of {_CHOICES[f.name]}, got {value!r}")
            elif f.type in ("bool",) and not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, got {value!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a mapping, got {type(self.extra).__name__}")
        p = self.tokenizer_patch_size
        if p & (p - 1):
            raise ConfigError(f"tokenizer_patch_size must be a power of two, got {p}")
        if self.image_size % p:
            raise ConfigError(
                f"image_size ({self.image_size}) must be divisible by tokenizer_patch_size ({p})"
            )
        if self.dynamics_dim % self.dynamics_num_heads:
            raise ConfigError(
                f"dynamics_num_heads ({self.dynamics_num_heads}) must divide dynamics_dim "
                f"({self.dynamics_dim})"
            )
        if self.outcome_end_fraction + self.outcome_inside_fraction > 1:
            raise ConfigError(
                f"outcome_end_fraction ({self.outcome_end_fraction}) + outcome_inside_fraction "
                f"({self.outcome_inside_fraction}) must not exceed 1: they are shares of one batch"
            )
        if self.mask_rate_min > self.mask_rate_max:
            raise ConfigError(
                f"mask_rate_min ({self.mask_rate_min}) must not exceed mask_rate_max "
                f"({self.mask_rate_max})"
            )
        if self.top_k > self.tokenizer_vocab_size:
            raise ConfigError(
                f"top_k must be in [0, tokenizer_vocab_size={self.tokenizer_vocab_size}], got {self.top_k}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def token_grid(self) -> int:
        """Side of the per-frame token grid (image_size / tokenizer_patch_size)."""
        return self.image_size // self.tokenizer_patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.token_grid**2

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenieConfig:
        """Build a config from a mapping; unknown keys are an error that names them."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping of field names to values, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown config field(s): {', '.join(unknown)}; known fields are: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> GenieConfig:
        """A copy with some fields changed (validated)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> GenieConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        return cls.from_dict(data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> GenieConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


# Named model sizes (`genie_env.presets` builds models from them); here, beside the config they fill in,
# so that `Genie.from_preset` needs no import of the module that imports `Genie`.
PRESETS: dict[str, dict[str, Any]] = {
    # The seed's development model: 16x16 tokens per 64x64 frame (patch 4), d512 x 8 dynamics.
    "small": dict(tokenizer_patch_size=4, tokenizer_channels=96, tokenizer_num_res_blocks=2,
                  lam_channels=96, dynamics_dim=512, dynamics_depth=8, dynamics_num_heads=8),
    # The paper's scale: an ~11B-parameter dynamics transformer (build it on the meta device).
    "large": dict(tokenizer_patch_size=4, tokenizer_channels=256, tokenizer_num_res_blocks=2,
                  lam_channels=256, dynamics_dim=5120, dynamics_depth=24, dynamics_num_heads=40),
    # Sized to play interactively on a 2-core CPU: 8x8 tokens per frame, d256 x 6 dynamics.
    "cpu": dict(tokenizer_patch_size=8, tokenizer_channels=64, tokenizer_num_res_blocks=1,
                lam_channels=48, dynamics_dim=256, dynamics_depth=6, dynamics_num_heads=8,
                context_frames=8, maskgit_steps=8, temperature=0.5),
}


def preset_config(name: str, **overrides: Any) -> GenieConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GenieConfig(**{**PRESETS[name], **overrides})


_FLOAT = r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"


def load_yaml(text: str) -> Any:
    """YAML as configs are read: PyYAML's safe loader, but numbers such as ``1e-3`` and ``3e4`` (floats in
    YAML 1.2 and to any reader) are floats, not the strings YAML 1.1 makes of them."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT), list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
