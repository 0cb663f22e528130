"""Named model sizes: the seed's small (~50M) and large (~11B) Genies, and the CPU-sized preset of the
shipped default model."""

from __future__ import annotations

from typing import Any

import torch

from genie_env.config import PRESETS, preset_config
from genie_env.models.genie import Genie

__all__ = ["PRESETS", "create_genie_cpu", "create_genie_large", "create_genie_small", "preset_config"]


def create_genie_small(num_frames: int = 16, image_size: int = 64, **overrides: Any) -> Genie:
    """The seed's ~50M-parameter Genie."""
    return Genie(preset_config("small", num_frames=num_frames, image_size=image_size, **overrides))


def create_genie_large(num_frames: int = 16, image_size: int = 64, device: str | torch.device | None = None,
                       **overrides: Any) -> Genie:
    """The seed's ~11B-parameter Genie. Pass device="meta" to build it without allocating memory."""
    cfg = preset_config("large", num_frames=num_frames, image_size=image_size, **overrides)
    if device is None:
        return Genie(cfg)
    with torch.device(device):
        return Genie(cfg)


def create_genie_cpu(num_frames: int = 16, image_size: int = 64, **overrides: Any) -> Genie:
    """The CPU-sized preset of the shipped default model."""
    return Genie(preset_config("cpu", num_frames=num_frames, image_size=image_size, **overrides))
