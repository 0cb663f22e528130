"""The metrics of EVALUATION.md: capped PSNR, perplexity, normalized mutual information."""

from __future__ import annotations

import math

import numpy as np
import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR per frame of (B, 3, [T,] H, W) frames in [0, 1]: 10 log10(1 / max(MSE, 1e-6)), capped at
    60 dB. Returns (B,) or (B, T)."""
    if x.dim() == 4:
        mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3))
    else:
        mse = (x.float() - y.float()).pow(2).mean(dim=(1, 3, 4))
    return 10 * torch.log10(1 / mse.clamp_min(1e-6))


def perplexity(indices: np.ndarray | torch.Tensor, n: int) -> float:
    """exp(entropy) of the empirical distribution of integer codes in [0, n)."""
    counts = np.bincount(np.asarray(indices).reshape(-1), minlength=n).astype(np.float64)
    p = counts / max(counts.sum(), 1)
    p = p[p > 0]
    return float(math.exp(-(p * np.log(p)).sum()))


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized mutual information of two labelings, arithmetic-mean normalization (scikit-learn's
    default): I(a; b) / ((H(a) + H(b)) / 2)."""
    a = np.unique(np.asarray(a).reshape(-1), return_inverse=True)[1]
    b = np.unique(np.asarray(b).reshape(-1), return_inverse=True)[1]
    if a.size == 0:
        return 0.0
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / (pa[:, None] * pb[None, :])[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    if ha == 0 and hb == 0:
        return 1.0
    denom = (ha + hb) / 2
    return max(0.0, mi / denom) if denom > 0 else 0.0
