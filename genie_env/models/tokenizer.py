"""Video tokenizer: a VQ-VAE that turns each frame into a grid of discrete tokens (Genie §2.1).

Axes: b batch, c channels, t time, H W pixels, h w token grid, d code dimension.

The paper's tokenizer is an ST-ViViT whose tokens are causal in time. Here each frame is encoded on its
own by a convolutional VQ-VAE: causal by construction (a frame's tokens depend on that frame alone), so
during play only the new frame is decoded, and on this CPU a conv tokenizer reached higher PSNR per
minute of training than the transformer variants (see the model card for the measurements).

With ``tokenizer_context=1`` both halves also see the previous frame (context-aware tokenization, as
Delta-IRIS): the encoder reads it beside the frame, and a context encoder gives the decoder its features
at every resolution, so tokens code what changed while backgrounds and sprites persist through the
decoder. `encode` and `decode` work closed loop, as a predictive video codec: each frame is coded and
decoded against the previous *decoded* frame, so decoding gives back what encoding saw. Training on pairs
conditions on the previous real frame (teacher forcing); on clips of 3+ frames, closed loop. Frame 0
without a frame before it is coded against a mid-grey frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from genie_env.config import GenieConfig
from genie_env.models.blocks import ConvDecoder, ConvEncoder, PyramidEncoder, SkipDecoder
from genie_env.models.quantizer import VectorQuantizer, float32_encoding


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
        self.context = config.tokenizer_context
        self.encoder = ConvEncoder(c * (1 + self.context), config.tokenizer_latent_dim, config.tokenizer_channels,
                                   levels, config.tokenizer_num_res_blocks)
        if self.context:
            self.context_encoder = PyramidEncoder(c, config.tokenizer_channels, levels,
                                                  config.tokenizer_num_res_blocks)
            self.decoder = SkipDecoder(config.tokenizer_latent_dim, c, config.tokenizer_channels, levels,
                                       config.tokenizer_num_res_blocks)
        else:
            self.decoder = ConvDecoder(config.tokenizer_latent_dim, c, config.tokenizer_channels, levels,
                                       config.tokenizer_num_res_blocks)
        self.quantizer = VectorQuantizer(
            config.tokenizer_vocab_size,
            config.tokenizer_latent_dim,
            ema_decay=config.tokenizer_ema_decay,
            dead_code_threshold=config.tokenizer_dead_code_threshold,
        )

    no_context_rate = 0.1
    """Training: share of frames coded against the no-context (mid-grey) frame, so that frame 0 decodes."""
    no_context_value = 0.5
    """The no-context frame's value in [0, 1] (mid grey): what frame 0 is coded against without a frame before."""

    def _first_previous(self, context: torch.Tensor | None, b: int, size: int, device: torch.device
                        ) -> torch.Tensor:
        """(B, 3, H, W) float: the frame before frame 0, ``context`` or the no-context frame."""
        if context is not None:
            return context.float()
        return torch.full((b, self.config.in_channels, size, size), self.no_context_value, device=device)

    def _previous(self, frames: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, 3, T, H, W) the frame before each: ``context`` (B, 3, H, W) or the
        no-context frame for frame 0, then the real frames."""
        first = self._first_previous(context, frames.shape[0], frames.shape[-1], frames.device)
        return torch.cat([first.to(frames.dtype)[:, :, None], frames[:, :, :-1]], dim=2)

    def _encode_latents(self, frames: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) in [0, 1] (and with context the frames before them) -> (B, T, h, w, d) latents."""
        b = frames.shape[0]
        x = rearrange(frames, "b c t H W -> (b t) c H W") * 2 - 1
        if self.context:
            x = torch.cat([x, rearrange(previous, "b c t H W -> (b t) c H W") * 2 - 1], dim=1)
        z = self.encoder(x)
        return rearrange(z, "(b t) d h w -> b t h w d", b=b)

    def _decode_pixels(self, z: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """(N, d, h, w) codes (and (B, 3, T, H, W) previous frames, N = B T) -> (N, 3, H, W) in [-1, 1]."""
        if not self.context:
            return self.decoder(z)
        p = rearrange(previous, "b c t H W -> (b t) c H W").to(z.dtype) * 2 - 1
        return self.decoder(z, self.context_encoder(p))

    def encode(self, frames: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) frames in [0, 1] -> (B, T, h, w) long tokens: the tokens a model trains and plays
        on. With tokenizer_context, closed loop (`encode_closed_loop`): each frame coded against the previous
        decoded frame, frame 0 against ``context`` (B, 3, H, W) or the no-context frame, so that `decode`
        gives back what encoding saw. Always in float32 (`float32_encoding`)."""
        if self.context:
            return self.encode_closed_loop(frames, context)[0]
        with float32_encoding(frames.device):
            return self.quantizer.nearest(self._encode_latents(frames.float()))

    def encode_teacher_forced(self, frames: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, T, h, w) tokens, every frame at once, each coded against the *real* frame
        before it (frame 0 against ``context`` or the no-context frame): how pairs train. Decoded frame by
        frame (`decode`) errors pile up; validation reports that drift. Without context, `encode`."""
        with float32_encoding(frames.device):
            frames = frames.float()
            previous = self._previous(frames, context) if self.context else None
            return self.quantizer.nearest(self._encode_latents(frames, previous))

    def encode_closed_loop(self, frames: torch.Tensor, context: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, T, H, W) frames in [0, 1] -> (B, T, h, w) tokens and (B, 3, T, H, W) their `decode`: frame
        by frame, each coded against the previous *decoded* frame (as a predictive video codec), so its
        tokens also correct what the decoder got wrong before and errors do not pile up. Frame 0 against
        ``context`` (B, 3, H, W) or the no-context frame. Without tokenizer_context, `encode` and `decode`."""
        if not self.context:
            tokens = self.encode(frames)
            return tokens, self.decode(tokens)
        with float32_encoding(frames.device):
            return self._encode_closed_loop(frames.float(), context)

    def _encode_closed_loop(self, frames: torch.Tensor, context: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        prev = self._first_previous(context, frames.shape[0], frames.shape[-1], frames.device)
        toks, outs = [], []
        for t in range(frames.shape[2]):
            p = prev[:, :, None].to(frames.dtype)
            tok = self.quantizer.nearest(self._encode_latents(frames[:, :, t : t + 1], p))
            prev = self.decode_given(tok, p)[:, :, 0]
            toks.append(tok)
            outs.append(prev)
        return torch.cat(toks, dim=1), torch.stack(outs, dim=2)

    def decode_given(self, tokens: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, h, w) long tokens (and with context (B, 3, T, H, W) the frame before each, in [0, 1]) ->
        (B, 3, T, H, W) frames in [0, 1]: every frame decoded at once (teacher forcing)."""
        b = tokens.shape[0]
        z = self.quantizer.codes(tokens)
        z = rearrange(z, "b t h w d -> (b t) d h w").to(next(self.decoder.parameters()).dtype)
        x = self._decode_pixels(z, previous)
        x = ((x.float() + 1) / 2).clamp(0, 1)
        return rearrange(x, "(b t) c H W -> b c t H W", b=b)

    def decode(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, h, w) long tokens -> (B, 3, T, H, W) frames in [0, 1]. With tokenizer_context, frame by
        frame, each against the previous decoded frame; frame 0 against ``context`` (B, 3, H, W) if given."""
        if not self.context:
            return self.decode_given(tokens)
        size = tokens.shape[2] * self.config.tokenizer_patch_size
        prev = self._first_previous(context, tokens.shape[0], size, tokens.device)
        out = []
        for t in range(tokens.shape[1]):
            prev = self.decode_given(tokens[:, t : t + 1], prev[:, :, None])[:, :, 0]
            out.append(prev)
        return torch.stack(out, dim=2)

    def _drop_context(self, previous: torch.Tensor) -> torch.Tensor:
        """Training: replace a share (``no_context_rate``) of the frames before by the no-context frame."""
        if not (self.training and self.no_context_rate > 0):
            return previous
        drop = torch.rand(previous.shape[0], 1, previous.shape[2], 1, 1, device=previous.device) < self.no_context_rate
        return torch.where(drop, torch.full_like(previous, self.no_context_value), previous)

    def forward(self, frames: torch.Tensor) -> TokenizerOutput:
        """Reconstruct frames through the codebook; the loss is MSE + beta * commitment. With
        tokenizer_context, frames 1.. are the targets: with 2 frames frame 1 against the real frame 0 (a
        single frame against the no-context frame); with 3 or more, closed loop (`_forward_closed_loop`).
        In training a share of the frames before are replaced by the no-context frame."""
        b = frames.shape[0]
        previous = None
        if self.context:
            if frames.shape[2] > 2:
                return self._forward_closed_loop(frames)
            if frames.shape[2] > 1:
                previous, frames = frames[:, :, :-1], frames[:, :, 1:]
            else:
                previous = torch.full_like(frames, self.no_context_value)
            previous = self._drop_context(previous)
        q = self.quantizer(self._encode_latents(frames, previous))
        z = rearrange(q.quantized, "b t h w d -> (b t) d h w")
        recon = rearrange(self._decode_pixels(z, previous), "(b t) c H W -> b c t H W", b=b)
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

    def _forward_closed_loop(self, frames: torch.Tensor) -> TokenizerOutput:
        """Training as the codec is used (`encode_closed_loop`, then `decode` at play time): frame 1 coded and
        decoded against the real frame 0, each later frame against the previous frame's *decoded* output
        (detached: no gradient through time), so the decoder learns to work from its own outputs and the
        tokens learn to correct them. Losses are the mean over frames 1.. ."""
        prev = frames[:, :, 0]
        recons, tokens, mse, commit, codebook, perp = [], [], 0.0, 0.0, 0.0, 0.0
        steps = frames.shape[2] - 1
        for t in range(1, frames.shape[2]):
            p = self._drop_context(prev[:, :, None])
            q = self.quantizer(self._encode_latents(frames[:, :, t : t + 1], p))
            z = rearrange(q.quantized, "b t h w d -> (b t) d h w")
            recon = self._decode_pixels(z, p).float()  # (b, 3, H, W) in [-1, 1]
            mse = mse + F.mse_loss(recon, frames[:, :, t] * 2 - 1) / steps
            commit, codebook = commit + q.commitment_loss / steps, codebook + q.codebook_loss / steps
            perp = perp + q.perplexity.detach() / steps
            prev = ((recon.detach() + 1) / 2).clamp(0, 1)
            recons.append(prev)
            tokens.append(q.indices)
        loss = mse + self.config.tokenizer_commitment * commit + codebook
        return TokenizerOutput(reconstruction=torch.stack(recons, dim=2), tokens=torch.cat(tokens, dim=1),
                               loss=loss, recon_loss=mse,
                               commitment_loss=commit, perplexity=perp)
