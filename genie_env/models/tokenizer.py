"""Video tokenizer: a VQ-VAE that turns each frame into a grid of discrete tokens (Genie §2.1).

Axes: b batch, c channels, t time, H W pixels, h w token grid, d code dimension.

The paper's tokenizer is an ST-ViViT whose tokens are causal in time. Here each frame is encoded on its
own by a convolutional VQ-VAE: causal by construction (a frame's tokens depend on that frame alone), so
during play only the new frame is decoded, and on this CPU a conv tokenizer reached higher PSNR per
minute of training than the transformer variants (see the model card for the measurements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from genie_env.config import GenieConfig
from genie_env.models.blocks import ConvDecoder, ConvEncoder
from genie_env.models.quantizer import VectorQuantizer


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor
    """(B, 3, T, H, W) decoded frames."""
    tokens: torch.Tensor
    """(B, T, h, w) long."""
    loss: torch.Tensor
    recon_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor


class VideoTokenizer(nn.Module):
    def __init__(self, config: GenieConfig) -> None:
        super().__init__()
        self.config = config
        levels = config.tokenizer_patch_size.bit_length() - 1
        c = config.in_channels
        self.encoder = ConvEncoder(c, config.tokenizer_latent_dim, config.tokenizer_channels, levels,
                                   config.tokenizer_num_res_blocks)
        self.decoder = ConvDecoder(config.tokenizer_latent_dim, c, config.tokenizer_channels, levels,
                                   config.tokenizer_num_res_blocks)
        self.quantizer = VectorQuantizer(
            config.tokenizer_vocab_size,
            config.tokenizer_latent_dim,
            ema_decay=config.tokenizer_ema_decay,
            dead_code_threshold=config.tokenizer_dead_code_threshold,
        )

    def _encode_latents(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [0, 1] -> (B, T, h, w, d) continuous latents."""
        b = frames.shape[0]
        x = rearrange(frames, "b c t H W -> (b t) c H W") * 2 - 1
        z = self.encoder(x)
        return rearrange(z, "(b t) d h w -> b t h w d", b=b)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) frames in [0, 1] -> (B, T, h, w) long tokens."""
        return self.quantizer.nearest(self._encode_latents(frames))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, h, w) long tokens -> (B, 3, T, H, W) frames in [0, 1]."""
        b = tokens.shape[0]
        z = self.quantizer.codes(tokens)
        z = rearrange(z, "b t h w d -> (b t) d h w").to(next(self.decoder.parameters()).dtype)
        x = self.decoder(z)
        x = ((x.float() + 1) / 2).clamp(0, 1)
        return rearrange(x, "(b t) c H W -> b c t H W", b=b)

    def forward(self, frames: torch.Tensor) -> TokenizerOutput:
        """Reconstruct frames through the codebook; the loss is MSE + beta * commitment."""
        b = frames.shape[0]
        q = self.quantizer(self._encode_latents(frames))
        z = rearrange(q.quantized, "b t h w d -> (b t) d h w")
        recon = rearrange(self.decoder(z), "(b t) c H W -> b c t H W", b=b)
        target = frames * 2 - 1
        recon_loss = F.mse_loss(recon.float(), target)
        loss = recon_loss + self.config.tokenizer_commitment * q.commitment_loss + q.codebook_loss
        return TokenizerOutput(
            reconstruction=((recon.float().detach() + 1) / 2).clamp(0, 1),
            tokens=q.indices,
            loss=loss,
            recon_loss=recon_loss,
            commitment_loss=q.commitment_loss,
            perplexity=q.perplexity,
        )
