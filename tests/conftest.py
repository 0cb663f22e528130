"""Shared fixtures: tiny randomly initialised Genie models and checkpoints (fast on a CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from genie_env import Genie, GenieConfig

# Tiny models run fastest on one thread (and the tests share the machine with training runs).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = dict(
    image_size=16, num_frames=4, tokenizer_vocab_size=32, tokenizer_patch_size=4, tokenizer_channels=8,
    tokenizer_latent_dim=8, action_vocab_size=8, lam_channels=8, lam_latent_dim=8, dynamics_dim=32,
    dynamics_depth=2, dynamics_num_heads=2, context_frames=4, maskgit_steps=2, temperature=1.0,
    batch_size=2, warmup_steps=2, max_steps=10, bf16=False,
)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""Every device present: tests of the device-agnostic paths run on each (CI has only a CPU)."""


def tiny_config(**overrides) -> GenieConfig:
    return GenieConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Genie:
    torch.manual_seed(seed)
    return Genie(tiny_config(**overrides)).eval()


def write_tiny_checkpoint(path: Path, seed: int = 0, n_prompts: int = 6, prompt_frames: int = 0,
                          **overrides) -> Path:
    """A tiny random checkpoint folder with a prompt bank and an action map, as shipped models have. The
    bank holds start frames (N, H, W, 3), or with ``prompt_frames`` clips (N, T, H, W, 3)."""
    model = tiny_model(seed, **overrides)
    size = model.config.image_size
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    shape = (n_prompts, prompt_frames, size, size, 3) if prompt_frames else (n_prompts, size, size, 3)
    np.savez(path / "prompts.npz", frames=rng.integers(0, 256, shape, dtype=np.uint8))
    (path / "action_map.json").write_text(json.dumps(
        {"LEFT": 1, "RIGHT": 2, "UP": 3, "LEFT+UP": 4, "RIGHT+UP": 5, "NONE": 0}))
    model.save_pretrained(path, extra_files={"prompts.npz": path / "prompts.npz",
                                             "action_map.json": path / "action_map.json"})
    return path


@pytest.fixture
def tiny(tmp_path) -> Genie:
    return tiny_model()


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return write_tiny_checkpoint(tmp_path / "tiny-ckpt")
