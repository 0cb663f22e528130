"""Building blocks shared by the models: convolutional encoder/decoder stacks, and the attention with
a learned relative-time bias used by the dynamics transformer.

Axes: b batch, t time, c channels, h w height width (pixels or tokens), n heads, d width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """SiLU -> 3x3 conv, twice, with a skip connection.

    No normalisation layers: GroupNorm's backward pass took 27% of the tokenizer's training time on
    this CPU; a zero-initialised last convolution keeps the stack stable without it.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


def level_channels(base: int, levels: int) -> list[int]:
    """Channel width per resolution level: base at 1/2 resolution, 2*base below."""
    return [base] + [base * 2] * (levels - 1)


class ConvEncoder(nn.Module):
    """(B, c_in, H, W) -> (B, c_out, H / 2**levels, W / 2**levels).

    The first halving is a lossless space-to-depth (pixel unshuffle) rather than convolutions at full
    resolution: full-resolution convolutions cost most of the FLOPs for little gain on 64x64 pixel art.
    """

    def __init__(self, c_in: int, c_out: int, base: int, levels: int, res_blocks: int) -> None:
        super().__init__()
        chans = level_channels(base, levels)
        layers: list[nn.Module] = [nn.PixelUnshuffle(2), nn.Conv2d(c_in * 4, chans[0], 3, padding=1)]
        for i in range(levels - 1):
            layers += [ResBlock(chans[i]) for _ in range(res_blocks)]
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1))
        layers += [ResBlock(chans[-1]) for _ in range(max(res_blocks, 1))]
        layers += [nn.SiLU(), nn.Conv2d(chans[-1], c_out, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, c_in, h, w) -> (B, c_out, h * 2**levels, w * 2**levels); the last doubling is a pixel shuffle."""

    def __init__(self, c_in: int, c_out: int, base: int, levels: int, res_blocks: int) -> None:
        super().__init__()
        chans = level_channels(base, levels)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(c_in, chans[0], 3, padding=1)]
        layers += [ResBlock(chans[0]) for _ in range(max(res_blocks, 1))]
        for i in range(levels - 1):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1),
            ]
            layers += [ResBlock(chans[i + 1]) for _ in range(res_blocks)]
        layers += [nn.SiLU(), nn.Conv2d(chans[-1], c_out * 4, 3, padding=1), nn.PixelShuffle(2)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PyramidEncoder(nn.Module):
    """(B, c_in, H, W) -> feature maps at 1/2, 1/4, ..., 1/2**levels resolution (finest first), with
    `level_channels(base, levels)` channels: the context a `SkipDecoder` reads at each of its levels."""

    def __init__(self, c_in: int, base: int, levels: int, res_blocks: int) -> None:
        super().__init__()
        chans = level_channels(base, levels)
        self.stem = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(c_in * 4, chans[0], 3, padding=1))
        self.levels = nn.ModuleList(
            nn.Sequential(*[ResBlock(chans[i]) for _ in range(max(res_blocks, 1))]) for i in range(levels)
        )
        self.down = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1)
                                  for i in range(levels - 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        h = self.stem(x)
        for i, level in enumerate(self.levels):
            h = level(h)
            feats.append(h)
            if i < len(self.down):
                h = self.down[i](h)
        return feats


class SkipDecoder(nn.Module):
    """`ConvDecoder` that also reads a `PyramidEncoder`'s features of another image (U-Net skips):
    (B, c_in, h, w) latents and [(B, c_l, H / 2**(l+1), W / 2**(l+1))] features, finest first ->
    (B, c_out, h * 2**levels, w * 2**levels). Each level adds a 1x1 projection of the features of its
    resolution before its residual blocks, which can then copy or shift that detail locally."""

    def __init__(self, c_in: int, c_out: int, base: int, levels: int, res_blocks: int) -> None:
        super().__init__()
        chans = level_channels(base, levels)[::-1]
        self.inp = nn.Conv2d(c_in, chans[0], 3, padding=1)
        self.fuse = nn.ModuleList(nn.Conv2d(c, c, 1) for c in chans)
        self.levels = nn.ModuleList(
            nn.Sequential(*[ResBlock(chans[i]) for _ in range(max(res_blocks, 1))]) for i in range(levels)
        )
        self.up = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chans[i], chans[i + 1], 3, padding=1))
            for i in range(levels - 1)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(chans[-1], c_out * 4, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        h = self.inp(x)
        for i, level in enumerate(self.levels):
            h = level(h + self.fuse[i](skips[-1 - i]))
            if i < len(self.up):
                h = self.up[i](h)
        return self.out(h)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * ratio)
        self.fc2 = nn.Linear(dim * ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head attention over the second-to-last axis of (B, L, d); optional additive mask."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, d) -> q, k, v each (B, n, L, d/n)."""
        b, length, d = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def split_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, d) -> k, v each (B, n, L, d/n): `split` without computing the queries."""
        b, length, d = x.shape
        kv = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:])
        kv = kv.view(b, length, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """(B, n, L, d/n) -> (B, L, d)."""
        b, n, length, dh = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, length, n * dh))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split(x)
        if mask is not None:
            mask = mask.to(q.dtype)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
