"""Vector quantizer (VQ-VAE, van den Oord et al. 2017) with the seed's fixes for codebook collapse.

Axes: n vectors, d code dimension, k codebook size.

Two ways to learn the codebook:
- EMA updates (the Genie default): codes move to the running mean of the vectors assigned to them,
  which is steadier than a gradient on the codebook loss and keeps more codes alive;
- a codebook loss ||sg[z_e] - e_k||^2 (used by the latent action model, as the seed writes its loss).
Either way, codes that stop being used are restarted on random encoder outputs of the current batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def float32_encoding(device: torch.device):
    """Autocast off, for coding frames into tokens: the encoder and the nearest-code search run in float32
    whatever number format the model otherwise runs in, so that a frame's tokens do not depend on the
    machine. Under bf16 the distances to 4,096 codes are too coarse to rank them: the nearest code of most
    patches changed with the format (62% of the shipped tokenizer's tokens), and so did everything that
    reads tokens of real frames (the prompt's tokens, the reward heads' inputs)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor
    """Straight-through quantized vectors, same shape as the input."""
    indices: torch.Tensor
    """Code index per vector (input shape without the last axis), long."""
    codebook_loss: torch.Tensor
    """||sg[z_e] - e_k||^2 (zero under EMA updates, which replace it)."""
    commitment_loss: torch.Tensor
    """||z_e - sg[e_k]||^2."""
    perplexity: torch.Tensor
    """exp(entropy) of the code usage in this batch."""
    probs: torch.Tensor | None = None
    """Soft assignment probabilities (n, k) when requested (for entropy regularisation)."""


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        num_codes: int,
        dim: int,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.dim = dim
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        self.restarted: torch.Tensor | None = None
        """(k,) bool: the codes the last training step restarted (an optimizer's moments for them are stale)."""
        embed = torch.randn(num_codes, dim) * (1.0 / dim**0.5)
        # Usage counts start at zero: every code counts as dead at the first training step and is
        # restarted on an encoder output, which initialises the codebook from the data.
        if self.use_ema:
            self.register_buffer("embed", embed)
            self.register_buffer("ema_count", torch.zeros(num_codes))
            self.register_buffer("ema_sum", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
            self.register_buffer("ema_count", torch.zeros(num_codes))

    @property
    def use_ema(self) -> bool:
        return self.ema_decay > 0

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for indices of any shape -> (..., d)."""
        return F.embedding(indices, self.embed)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each vector in z (..., d), computed in float32 (autocast off)."""
        with float32_encoding(z.device):
            return self._distances(z.reshape(-1, self.dim).float()).argmin(1).view(z.shape[:-1])

    def _distances(self, flat: torch.Tensor) -> torch.Tensor:
        """(n, d) float32 vectors -> (n, num_codes) squared distances to every code (call with autocast off:
        among thousands of close codes bf16 cannot rank them)."""
        embed = self.embed.float()
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed.t() + embed.pow(2).sum(1)[None]

    def forward(self, z: torch.Tensor, return_probs: bool = False) -> QuantizerOutput:
        """Quantize z (..., d). Runs in float32 (autocast off), as `nearest` does: the codes a training pass
        picks and moves are those that coding a frame picks."""
        with float32_encoding(z.device):
            return self._quantize(z, return_probs)

    def _quantize(self, z: torch.Tensor, return_probs: bool) -> QuantizerOutput:
        z = z.float()
        flat = z.reshape(-1, self.dim)
        dist = self._distances(flat)
        idx = dist.argmin(1)
        onehot = F.one_hot(idx, self.num_codes).type(flat.dtype)
        counts = onehot.sum(0)
        probs_mean = counts / counts.sum()
        perplexity = torch.exp(-(probs_mean * torch.log(probs_mean + 1e-10)).sum())

        # Read the codes before the update: idx was chosen against this codebook, and a restart may
        # replace the chosen code with an unrelated vector (which the commitment loss would then pull to).
        q = F.embedding(idx, self.embed).float()
        if self.training:
            self._update(flat, onehot, counts)

        commitment = F.mse_loss(flat, q.detach())
        codebook = flat.new_zeros(()) if self.use_ema else F.mse_loss(q, flat.detach())
        q_st = flat + (q - flat).detach()
        probs = torch.softmax(-dist, dim=1) if return_probs else None
        return QuantizerOutput(
            quantized=q_st.view(z.shape),
            indices=idx.view(z.shape[:-1]),
            codebook_loss=codebook,
            commitment_loss=commitment,
            perplexity=perplexity,
            probs=probs,
        )

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, onehot: torch.Tensor, counts: torch.Tensor) -> None:
        flat = flat.detach()
        decay = self.ema_decay if self.use_ema else 0.99
        sums = onehot.t() @ flat if self.use_ema else None
        if _distributed():
            # every process keeps the same statistics, so the same codes die and restart everywhere
            counts = counts.clone()
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        if self.use_ema:
            self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            n = self.ema_count.sum()
            count = (self.ema_count + self.eps) / (n + self.num_codes * self.eps) * n
            self.embed.copy_(self.ema_sum / count[:, None])
        self._restart_dead(flat)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor) -> None:
        """Move codes used less than the threshold onto random vectors of this batch.

        The random draw uses torch's global generator, whose state a training checkpoint saves, so a
        resumed run restarts the same codes as an uninterrupted one.
        """
        dead = self.ema_count < self.dead_code_threshold
        self.restarted = dead
        n_dead = int(dead.sum())
        if n_dead == 0 or flat.shape[0] == 0:
            return
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new = flat[pick] + 1e-3 * torch.randn(n_dead, self.dim, device=flat.device)
        if _distributed():
            # the first process's draw, so that the codebooks (a parameter, which data-parallel training
            # synchronises only at construction) stay identical
            dist.broadcast(new, src=0)
        self.embed.data[dead] = new.to(self.embed.dtype)
        self.ema_count[dead] = self.dead_code_threshold + 1.0
        if self.use_ema:
            self.ema_sum[dead] = new * self.ema_count[dead][:, None]
