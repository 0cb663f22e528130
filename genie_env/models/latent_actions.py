"""Latent action model: infers which of ``action_vocab_size`` discrete actions explains a transition
(Genie §2.2, pixel-input variant, which the paper found more controllable than token input).

Axes: b batch, c channels, t time, H W pixels, k context frames.

The encoder sees the ``lam_context_frames`` frames up to x_t and the next frame x_{t+1}; its output is
quantized to one of ``action_vocab_size`` codes; the decoder predicts x_{t+1} from the same context
frames and the code alone. The context matters in a game with momentum: from x_t alone the decoder
cannot tell the velocity, so the code would have to carry it; with x_{t-1} as well, what is left for the
code is the change the action caused. Loss (seed): reconstruction + codebook + beta * commitment, minus a
small bonus on the entropy of the batch's mean code assignment, against collapse onto few codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from genie_env.config import GenieConfig
from genie_env.models.blocks import ConvEncoder, ResBlock
from genie_env.models.quantizer import VectorQuantizer


@dataclass
class LatentActionOutput:
    actions: torch.Tensor
    """(B, T-1) long latent action per transition."""
    prediction: torch.Tensor
    """(B, 3, T-1, H, W) predicted next frames."""
    loss: torch.Tensor
    recon_loss: torch.Tensor
    perplexity: torch.Tensor


def context_stack(frames: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B, T-1, 3k, H, W): for each transition t -> t+1 the k frames ending at x_t,
    the first frame repeated where the clip has fewer."""
    t = frames.shape[2]
    pad = frames[:, :, :1].expand(-1, -1, k - 1, -1, -1)
    padded = torch.cat([pad, frames], dim=2)  # frame i of the clip is at i + k - 1
    ctx = torch.stack([padded[:, :, i : i + k] for i in range(t - 1)], dim=1)  # (B, T-1, 3, k, H, W)
    return rearrange(ctx, "b t c k H W -> b t (k c) H W")


def translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift images (N, C, H, W) by (N, 2) pixels (x, y) with bilinear sampling, edges repeated."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * shift[:, 0] / w
    theta[:, 1, 2] = -2 * shift[:, 1] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ActionUNet(nn.Module):
    """Predicts the change x_{t+1} - x_t from context frames, modulated by an action code at every level.

    Skip connections at 1/2 and 1/4 resolution let the action move fine detail (a sub-pixel scroll of
    the whole scene, the agent's sprite), which a decoder working from the 8x8 bottleneck alone
    cannot express: then the code is not worth using and the model learns to ignore it.
    """

    def __init__(self, c_in: int, c_out: int, width: int, code_dim: int, levels: int) -> None:
        super().__init__()
        self.levels = levels
        chans = [width] + [width * 2] * (levels - 1)
        self.stem = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(c_in * 4, chans[0], 3, padding=1))
        self.down = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1) for i in range(levels - 1))
        self.enc_blocks = nn.ModuleList(ResBlock(c) for c in chans)
        self.films = nn.ModuleList(nn.Linear(code_dim, 2 * c) for c in chans)
        self.up = nn.ModuleList(nn.Conv2d(chans[i + 1], chans[i], 3, padding=1) for i in range(levels - 1))
        self.dec_blocks = nn.ModuleList(ResBlock(c) for c in chans[:-1])
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(chans[0], c_out * 4, 3, padding=1), nn.PixelShuffle(2))
        # a global translation of the last frame, from the bottleneck: the camera scroll that dominates
        # the change between frames in a side-scroller, which an action nudges by a fraction of a pixel
        self.shift = nn.Sequential(nn.SiLU(), nn.Linear(chans[-1], 64), nn.SiLU(), nn.Linear(64, 2))
        nn.init.zeros_(self.shift[-1].weight)
        nn.init.zeros_(self.shift[-1].bias)
        # (no zero initialisation of the FiLM layers: a decoder that starts blind to the code sends the
        # encoder no gradient, and every transition collapses onto one latent action)

    @staticmethod
    def _film(h: torch.Tensor, film: nn.Linear, code: torch.Tensor) -> torch.Tensor:
        scale, shift = film(code.to(h.dtype)).chunk(2, dim=1)
        return h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual (N, c_out, H, W) and global shift (N, 2) in pixels (x, y)."""
        h = self.stem(x)
        skips = []
        for i in range(self.levels):
            h = self._film(self.enc_blocks[i](h), self.films[i], code)
            if i < self.levels - 1:
                skips.append(h)
                h = self.down[i](h)
        shift = 4 * torch.tanh(self.shift(h.mean(dim=(2, 3))).float())
        for i in reversed(range(self.levels - 1)):
            h = self.up[i](F.interpolate(h, scale_factor=2.0, mode="nearest")) + skips[i]
            h = self.dec_blocks[i](h)
        return self.out(h), shift


class LatentActionModel(nn.Module):
    def __init__(self, config: GenieConfig) -> None:
        super().__init__()
        self.config = config
        c, k = config.in_channels, config.lam_context_frames
        levels = config.tokenizer_patch_size.bit_length() - 1
        grid = config.image_size // config.tokenizer_patch_size
        width = config.lam_channels
        # encoder input: the k context frames, x_{t+1}, and the difference x_{t+1} - x_t, which makes
        # the small changes an action causes stand out from the unchanged scene
        self.encoder = ConvEncoder(c * (k + 2), width, width, levels, 1)
        self.to_latent = nn.Linear(width * grid * grid, config.lam_latent_dim)
        self.quantizer = VectorQuantizer(config.action_vocab_size, config.lam_latent_dim, ema_decay=0.0,
                                         dead_code_threshold=0.5)
        self.decoder = ActionUNet(c * k, c, width, config.lam_latent_dim, max(levels - 1, 1))

    def _encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-quantization latents (B*(T-1), d) and context stacks (B*(T-1), 3k, H, W)."""
        c = self.config.in_channels
        x = frames * 2 - 1
        ctx = context_stack(x, self.config.lam_context_frames)
        nxt = rearrange(x[:, :, 1:], "b c t H W -> b t c H W")
        diff = nxt - ctx[:, :, -c:]
        enc_in = rearrange(torch.cat([ctx, nxt, diff], dim=2), "b t c H W -> (b t) c H W")
        z = self.to_latent(self.encoder(enc_in).flatten(1))
        return z, rearrange(ctx, "b t c H W -> (b t) c H W")

    @torch.no_grad()
    def infer(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) frames in [0, 1] -> (B, T-1) long latent actions."""
        z, _ = self._encode(frames)
        return self.quantizer.nearest(z).view(frames.shape[0], frames.shape[2] - 1)

    def decode(self, context: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Predict x_{t+1} in [-1, 1] from context stacks (N, 3k, H, W) and code vectors (N, d)."""
        return self._decode(context, code)[0]

    def _decode(self, context: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction and x_t moved by the predicted camera motion alone."""
        last = context[:, -self.config.in_channels :]
        residual, shift = self.decoder(context, code)
        # x_t moved by a predicted sub-pixel translation, plus a residual for what moved on its own
        moved = translate(last.float(), shift)
        return moved + residual.float(), moved

    def forward(self, frames: torch.Tensor) -> LatentActionOutput:
        b, _, t = frames.shape[:3]
        z, ctx = self._encode(frames)
        q = self.quantizer(z, return_probs=self.config.lam_entropy_weight > 0)
        pred, moved = self._decode(ctx, q.quantized)
        target = rearrange(frames[:, :, 1:] * 2 - 1, "b c t H W -> (b t) c H W")
        if self.config.lam_focus > 0:
            # weight each pixel by how much of its change the camera motion leaves unexplained, relative
            # to the frame's mean: the reconstruction error of a small sprite then matters as much as
            # that of the scrolling background
            unexplained = (target - moved.detach()).abs().mean(1, keepdim=True)
            weight = 1 + self.config.lam_focus * unexplained / (unexplained.mean((2, 3), keepdim=True) + 1e-3)
            recon = ((pred.float() - target) ** 2 * weight).mean() / weight.mean()
        else:
            recon = F.mse_loss(pred.float(), target)
        loss = recon + q.codebook_loss + self.config.lam_beta * q.commitment_loss
        if q.probs is not None:
            mean = q.probs.mean(0)
            entropy = -(mean * torch.log(mean + 1e-10)).sum()
            loss = loss - self.config.lam_entropy_weight * entropy / torch.log(torch.tensor(float(mean.numel())))
        return LatentActionOutput(
            actions=q.indices.view(b, t - 1),
            prediction=rearrange(((pred.detach().float() + 1) / 2).clamp(0, 1), "(b t) c H W -> b c t H W", b=b),
            loss=loss,
            recon_loss=recon,
            perplexity=q.perplexity,
        )
