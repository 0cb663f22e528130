"""Checks of what users pass in: each failure is a ValueError or TypeError that names the argument and
says what it expects, instead of an error from deep inside torch."""

from __future__ import annotations

import numbers

import numpy as np
import torch

from genie_env.config import GenieConfig


def _shape(x) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def _check_holds_data(x: torch.Tensor, name: str) -> None:
    """Sparse and meta tensors pass shape and dtype checks, then fail deep inside torch: refuse them here."""
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {x.layout} (call .to_dense() first)")
    if x.is_meta:
        raise ValueError(f"{name} must be a tensor that holds data (on the cpu or a gpu), got one on the meta device")


def check_frames(
    frames, config: GenieConfig, name: str, video: bool | None, min_frames: int = 1,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Frames as a float tensor in [0, 1]: (B, 3, H, W) when video is False, (B, 3, T, H, W) when True,
    either when None. Returns the tensor on ``device`` as float32."""
    size, c = config.image_size, config.in_channels
    what = {False: f"(B, {c}, {size}, {size})", True: f"(B, {c}, T, {size}, {size})",
            None: f"(B, {c}, {size}, {size}) or (B, {c}, T, {size}, {size})"}[video]
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what} with values in [0, 1], "
                        f"got {type(frames).__name__}")
    _check_holds_data(frames, name)
    dims = {False: (4,), True: (5,), None: (4, 5)}[video]
    if frames.dim() not in dims or frames.shape[1] != c or tuple(frames.shape[-2:]) != (size, size):
        raise ValueError(f"{name} must have shape {what}, got {_shape(frames)}")
    if frames.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one frame, got batch size 0")
    if frames.dim() == 5 and frames.shape[2] < min_frames:
        raise ValueError(f"{name} must have at least {min_frames} frames (axis 2), got {frames.shape[2]}")
    if not frames.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [0, 1], got {frames.dtype} "
                        "(divide uint8 images by 255)")
    frames = frames.detach().to(device=device, dtype=torch.float32)
    if not torch.isfinite(frames).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(frames.min()), float(frames.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{name} values must be in [0, 1], got range [{lo:.3g}, {hi:.3g}] "
                         "(divide uint8 images by 255)")
    return frames


def check_tokens(tokens, config: GenieConfig, name: str, device: torch.device | None = None) -> torch.Tensor:
    """(B, T, h, w) integer tokens in [0, tokenizer_vocab_size)."""
    g, v = config.token_grid, config.tokenizer_vocab_size
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, T, {g}, {g}), got {type(tokens).__name__}")
    _check_holds_data(tokens, name)
    if tokens.dim() != 4 or tuple(tokens.shape[-2:]) != (g, g) or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, T, {g}, {g}) with B, T >= 1, got {_shape(tokens)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {tokens.dtype}")
    tokens = tokens.to(device=device, dtype=torch.long)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= v:
        raise ValueError(f"{name} values must be in [0, {v}), got range [{lo}, {hi}]")
    return tokens


def check_actions(actions, config: GenieConfig, name: str, shape: tuple[int, ...],
                  device: torch.device | None = None) -> torch.Tensor:
    """Integer latent actions in [0, action_vocab_size) of the given shape, as a long tensor."""
    n = config.action_vocab_size
    want = "(" + ", ".join(str(s) for s in shape) + ")"
    if isinstance(actions, np.ndarray) or isinstance(actions, (list, tuple)):
        try:
            arr = np.asarray(actions)
        except ValueError:  # a ragged nested list
            raise ValueError(f"{name} must have shape {want}, got a ragged nested sequence") from None
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers in [0, {n}), got dtype {arr.dtype}")
        actions = torch.from_numpy(arr.astype(np.int64))
    elif (isinstance(actions, numbers.Integral) and not isinstance(actions, (bool, np.timedelta64))
          and shape == (1,)):
        actions = torch.tensor([int(actions)])
    if not isinstance(actions, torch.Tensor):
        raise TypeError(f"{name} must be a long tensor of shape {want} with values in [0, {n}), "
                        f"got {type(actions).__name__}")
    _check_holds_data(actions, name)
    if actions.is_floating_point() or actions.is_complex() or actions.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor with values in [0, {n}), got {actions.dtype}")
    if tuple(actions.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {want}, got {_shape(actions)}")
    actions = actions.to(device=device, dtype=torch.long)
    if actions.numel():
        lo, hi = int(actions.min()), int(actions.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} values must be latent actions in [0, {n}), got range [{lo}, {hi}]")
    return actions
