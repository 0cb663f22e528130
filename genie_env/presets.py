"""Named model sizes: the seed's small (~50M) and large (~11B) Genies, and the CPU-sized preset of the
shipped default model."""

from __future__ import annotations

from typing import Any

import torch

from genie_env.config import GenieConfig

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


def create_genie_small(num_frames: int = 16, image_size: int = 64, **overrides: Any):
    """The seed's ~50M-parameter Genie."""
    from genie_env.models.genie import Genie

    return Genie(preset_config("small", num_frames=num_frames, image_size=image_size, **overrides))


def create_genie_large(num_frames: int = 16, image_size: int = 64, device: str | torch.device | None = None,
                       **overrides: Any):
    """The seed's ~11B-parameter Genie. Pass device="meta" to build it without allocating memory."""
    from genie_env.models.genie import Genie

    cfg = preset_config("large", num_frames=num_frames, image_size=image_size, **overrides)
    if device is None:
        return Genie(cfg)
    with torch.device(device):
        return Genie(cfg)


def create_genie_cpu(num_frames: int = 16, image_size: int = 64, **overrides: Any):
    """The CPU-sized preset of the shipped default model."""
    from genie_env.models.genie import Genie

    return Genie(preset_config("cpu", num_frames=num_frames, image_size=image_size, **overrides))
