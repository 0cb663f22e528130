"""Dynamics model: an ST-transformer predicting the next frame's tokens from past frames' tokens and a
latent action, sampled with MaskGIT (Genie §2.3; MaskGIT, Chang et al. 2022).

Axes: b batch, t time, n tokens of a frame (h*w), d width, H heads, c cached frames.

Each block attends spatially within a frame (bidirectional), then temporally across frames at the same
token position (causal), then applies a feed-forward layer. Time enters only through a learned bias
per head and frame distance, so a sliding window of cached frames behaves the same at step 10 and
step 10,000.

Action alignment: frame t+1 is conditioned on the latent action a_t of the transition t -> t+1 (and the
first frame on a "no action" embedding); the action embedding is added to the frame's tokens at the
input and at every block.

Training is two-stream so that it sees what play sees. At play time the past frames are complete
(their tokens are all known) and only the frame being generated is partly masked. Masking every frame
as the paper does would train on masked contexts that never occur in play. Here a clean stream runs
causally over the unmasked clip and provides the keys and values of the past, and a masked stream holds
each frame t >= 1 with its tokens masked at a rate r = min + (max - min) * cos(pi/2 * u), u ~ U(0, 1)
(min, max = mask_rate_min, mask_rate_max); a masked frame attends to the clean frames before it and to
itself. With the defaults (0, 1) this is MaskGIT's training distribution: the input of every step of
the cosine sampling schedule, at any step count, is as likely as any other, down to one masked token
(the paper's U(0.5, 1) never shows the rates below 0.5 that a third of the sampling steps run at).
The clean stream of a frame computes exactly what its masked stream would with nothing masked, so the
cache filled at play time from finished frames holds what training used. The first frame is never
masked: it is the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from genie_env.config import GenieConfig
from genie_env.models.blocks import MLP, SelfAttention

NEG_INF = float("-inf")


class STBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.action = nn.Linear(dim, dim)
        self.norm_s = nn.LayerNorm(dim)
        self.spatial = SelfAttention(dim, heads)
        self.norm_t = nn.LayerNorm(dim)
        self.temporal = SelfAttention(dim, heads)
        self.norm_m = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)
        # learned bias per head and frame distance 0 .. window-1
        self.time_bias = nn.Parameter(torch.zeros(heads, window))

    def _spatial_mlp_in(self, x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """x (B, T, n, d), act (B, T, d): action conditioning + spatial attention within each frame."""
        b, t = x.shape[:2]
        x = x + self.action(act)[:, :, None]
        h = rearrange(self.norm_s(x), "b t n d -> (b t) n d")
        return x + rearrange(self.spatial(h), "(b t) n d -> b t n d", b=b)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm_m(x))

    def forward_train(
        self, xc: torch.Tensor, xm: torch.Tensor, ac: torch.Tensor, am: torch.Tensor,
        bias_cc: torch.Tensor, bias_m: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean stream xc (B, T, n, d) and masked stream xm (B, T-1, n, d) (frames 1..T-1)."""
        b, t, n, d = xc.shape
        xc = self._spatial_mlp_in(xc, ac)
        xm = self._spatial_mlp_in(xm, am)
        qc, kc, vc = self.temporal.split(rearrange(self.norm_t(xc), "b t n d -> (b n) t d"))
        qm, km, vm = self.temporal.split(rearrange(self.norm_t(xm), "b t n d -> (b n) t d"))
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias_cc.to(qc.dtype))
        om = F.scaled_dot_product_attention(
            qm, torch.cat([kc, km], dim=2), torch.cat([vc, vm], dim=2), attn_mask=bias_m.to(qm.dtype)
        )
        xc = xc + rearrange(self.temporal.merge(oc), "(b n) t d -> b t n d", b=b)
        xm = xm + rearrange(self.temporal.merge(om), "(b n) t d -> b t n d", b=b)
        return self._mlp(xc), self._mlp(xm)

    def forward_step(
        self, x: torch.Tensor, act: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
        bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new frame x (B, 1, n, d) against cached keys/values (B, n, H, c, d/H) of past frames.

        bias: (B, H, c+1) additive mask (distance bias, -inf for empty cache slots), the same for every
        token of a frame.
        Returns the output and this frame's own key and value (B, n, H, d/H) for the cache.
        """
        b, _, n, d = x.shape
        x = self._spatial_mlp_in(x, act)
        q, k, v = self.temporal.split(rearrange(self.norm_t(x), "b t n d -> (b n) t d"))  # (bn, H, 1, dh)
        ck = cache_k.reshape(b * n, self.heads, -1, d // self.heads).to(k.dtype)
        cv = cache_v.reshape(b * n, self.heads, -1, d // self.heads).to(v.dtype)
        # one query against a few keys, for every token: elementwise products beat a batched attention
        # kernel here (7.5 vs 4.3 ms a call at 32 envs, bf16)
        scale = (d // self.heads) ** -0.5
        scores = torch.cat([(q * ck).sum(-1), (q * k).sum(-1)], dim=-1) * scale  # (bn, H, c+1)
        scores = scores.float().view(b, n, self.heads, -1) + bias[:, None].float()
        p = torch.softmax(scores, dim=-1).view(b * n, self.heads, -1).to(v.dtype)
        o = (p[..., :-1, None] * cv).sum(-2, keepdim=True) + p[..., -1:, None] * v  # (bn, H, 1, dh)
        x = x + rearrange(self.temporal.merge(o), "(b n) t d -> b t n d", b=b)
        new_k = k.view(b, n, self.heads, d // self.heads)
        new_v = v.view(b, n, self.heads, d // self.heads)
        return self._mlp(x), new_k, new_v

    def step_kv(self, x: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only a complete frame's own key and value (B, n, H, d/H) for the cache: what `forward_step`
        returns besides its output, without the temporal attention, its projection and the MLP that
        only the output needs (the last block's commit pass has no use for its output)."""
        b, _, n, d = x.shape
        x = self._spatial_mlp_in(x, act)
        k, v = self.temporal.split_kv(rearrange(self.norm_t(x), "b t n d -> (b n) t d"))
        return k.view(b, n, self.heads, d // self.heads), v.view(b, n, self.heads, d // self.heads)

    def forward_pair(
        self, x: torch.Tensor, act: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
        bias: torch.Tensor, last: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A complete frame and the frame after it, x (B, 2, n, d), against cached keys/values
        (B, n, H, c, d/H) of the frames before them, in one pass: what `forward_step` (or, with last,
        `step_kv`) computes for the first and `forward_step` for the second once the first is cached, with
        every matmul over the rows of both.

        bias: (B, H, 2, c+2) additive mask of each frame's queries over the keys [cache, frame 0, frame 1]
        (-inf from frame 0 to frame 1: causal). last: frame 0's output is not needed (the last block),
        only frame 1's is computed.
        Returns the output (B, 2, n, d), or (B, 1, n, d) of frame 1 with last, and frame 0's key and value
        (B, n, H, d/H) for the cache.
        """
        b, _, n, d = x.shape
        heads, dh = self.heads, d // self.heads
        x = self._spatial_mlp_in(x, act)
        # projections on the rows as they lie (b, t, n): "(b n) t" rows of two frames are strided
        h = self.norm_t(x)
        w, w_b = self.temporal.qkv.weight, self.temporal.qkv.bias
        if last:
            k, v = rearrange(F.linear(h, w[d:], w_b[d:]), "b t n (s H e) -> s (b n) H t e", s=2, H=heads)
            q = rearrange(F.linear(h[:, 1:], w[:d], w_b[:d]), "b t n (H e) -> (b n) H t e", H=heads)
            x, bias = x[:, 1:], bias[:, :, 1:]
        else:
            q, k, v = rearrange(self.temporal.qkv(h), "b t n (s H e) -> s (b n) H t e", s=3, H=heads)
        tq = q.shape[2]
        # two queries: batched matmuls over the joined keys beat `forward_step`'s elementwise products
        # (0.23 vs 0.38 ms a block at batch 1, fp32)
        keys = torch.cat([cache_k.reshape(b * n, heads, -1, dh).to(k.dtype), k], dim=2)  # (bn, H, c+2, dh)
        values = torch.cat([cache_v.reshape(b * n, heads, -1, dh).to(v.dtype), v], dim=2)
        scores = (q @ keys.transpose(-1, -2)) * dh**-0.5  # (bn, H, tq, c+2)
        scores = scores.float().view(b, n, heads, tq, -1) + bias[:, None].float()
        p = torch.softmax(scores, dim=-1).view(b * n, heads, tq, -1).to(v.dtype)
        o = rearrange(p @ values, "(b n) H t e -> b t n (H e)", b=b)
        x = x + self.temporal.proj(o)
        return self._mlp(x), k[:, :, 0].reshape(b, n, heads, dh), v[:, :, 0].reshape(b, n, heads, dh)


@dataclass
class KVCache:
    """Keys and values of the last ``capacity`` complete frames, per layer, as a per-row ring buffer.

    k, v: (layers, B, n, H, c, d/H); age: (B, c) frames between a slot and the frame being generated
    (0 = empty); ptr: (B,) the slot the next complete frame is written to.
    """

    k: torch.Tensor
    v: torch.Tensor
    age: torch.Tensor
    ptr: torch.Tensor
    window: int
    """Frames attended to, counting the one being generated (at most the model's context_frames)."""

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def clear(self, rows: torch.Tensor | None = None) -> None:
        if rows is None:
            self.age.zero_()
            self.ptr.zero_()
        else:
            self.age[rows] = 0
            self.ptr[rows] = 0

    def frames(self) -> torch.Tensor:
        """(B,) number of cached frames per row."""
        return (self.age > 0).sum(1)


class DynamicsModel(nn.Module):
    def __init__(self, config: GenieConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dynamics_dim
        self.vocab = config.tokenizer_vocab_size
        self.mask_id = self.vocab
        self.null_action = config.action_vocab_size
        self.num_tokens = config.tokens_per_frame
        self.window = config.context_frames
        self.token_emb = nn.Embedding(self.vocab + 1, d)
        self.pos_emb = nn.Parameter(torch.randn(self.num_tokens, d) * 0.02)
        self.action_emb = nn.Embedding(config.action_vocab_size + 1, d)
        self.blocks = nn.ModuleList(
            STBlock(d, config.dynamics_num_heads, config.dynamics_mlp_ratio, self.window)
            for _ in range(config.dynamics_depth)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.vocab)
        self.gradient_checkpointing = config.gradient_checkpointing
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ------------------------------------------------------------------ embeddings
    def _embed(self, tokens: torch.Tensor, actions_in: torch.Tensor, gain: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T, n) (mask_id = masked), actions_in (B, T) (null_action for the first frame).

        gain: the latent actions' embeddings are moved away from their mean by this factor (the null
        action's is not); 1 is the embedding as trained. Sampling uses ``config.action_gain``."""
        a = self.action_emb(actions_in)
        if gain != 1.0:
            mean = self.action_emb.weight[: self.null_action].mean(0)
            a = torch.where((actions_in != self.null_action)[..., None], mean + gain * (a - mean), a)
        return self.token_emb(tokens) + self.pos_emb + a[:, :, None], a

    def _train_biases(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block additive masks (H, T, T) clean->clean and (H, T-1, 2T-1) masked->[clean, masked]."""
        qi = torch.arange(t, device=device)[:, None]
        kj = torch.arange(t, device=device)[None, :]
        dist = qi - kj
        cc_ok = (dist >= 0) & (dist < self.window)
        mq = torch.arange(1, t, device=device)[:, None]
        m_dist = mq - kj  # masked frame t attends clean frames j < t within the window
        mc_ok = (m_dist > 0) & (m_dist < self.window)
        self_ok = torch.eye(t - 1, dtype=torch.bool, device=device)
        out = []
        for blk in self.blocks:
            tb = blk.time_bias
            cc = torch.where(cc_ok, tb[:, dist.clamp(0, self.window - 1)], NEG_INF)
            mc = torch.where(mc_ok, tb[:, m_dist.clamp(0, self.window - 1)], NEG_INF)
            ms = torch.where(self_ok, tb[:, :1, None].expand(-1, t - 1, t - 1), NEG_INF)
            out.append((cc, torch.cat([mc, ms], dim=2)))
        return out

    # ------------------------------------------------------------------ training
    def forward(
        self, tokens: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor,
        context_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for frames 1..T-1.

        tokens: (B, T, n) long, the clip's tokens; actions: (B, T-1) long latent actions, a_t for the
        transition t -> t+1; mask: (B, T-1, n) bool, which tokens of frames 1..T-1 are hidden from the
        masked stream; context_tokens: tokens for the clean stream if not ``tokens`` (noised context).
        Returns (B, T-1, n, vocab) logits.
        """
        b, t, n = tokens.shape
        null = torch.full((b, 1), self.null_action, dtype=torch.long, device=tokens.device)
        acts_in = torch.cat([null, actions], dim=1)  # frame t+1 gets a_t
        clean = tokens if context_tokens is None else context_tokens
        masked = torch.where(mask, self.mask_id, tokens[:, 1:])
        xc, ac = self._embed(clean, acts_in)
        xm, am = self._embed(masked, acts_in[:, 1:])
        for blk, (bcc, bm) in zip(self.blocks, self._train_biases(t, tokens.device)):
            if self.gradient_checkpointing and self.training:
                xc, xm = checkpoint(blk.forward_train, xc, xm, ac, am, bcc, bm, use_reentrant=False)
            else:
                xc, xm = blk.forward_train(xc, xm, ac, am, bcc, bm)
        return self.head(self.norm(xm))

    def training_mask(self, b: int, t: int, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """(b, t, n) bool: which tokens of t frames the masked stream hides, at a per-frame rate drawn as
        in the module docstring, and at least one per frame so that every frame contributes."""
        cfg = self.config
        n = self.num_tokens
        u = torch.rand(b, t, 1, device=device, generator=generator)
        rate = cfg.mask_rate_min + (cfg.mask_rate_max - cfg.mask_rate_min) * torch.cos(math.pi / 2 * u)
        mask = torch.rand(b, t, n, device=device, generator=generator) < rate
        force = torch.randint(0, n, (b, t, 1), device=device, generator=generator)
        return mask.scatter_(2, force, True)

    def loss(self, tokens: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Masked-token cross-entropy on frames 1..T-1, mask rate per frame drawn as in the module doc."""
        cfg = self.config
        b, t, n = tokens.shape
        dev = tokens.device
        mask = self.training_mask(b, t - 1, dev, generator)
        context = None
        if cfg.context_noise > 0:
            noise = torch.rand(b, t, n, device=dev, generator=generator) < cfg.context_noise
            rand_tok = torch.randint(0, self.vocab, (b, t, n), device=dev, generator=generator)
            context = torch.where(noise, rand_tok, tokens)
        logits = self(tokens, actions, mask, context)
        target = tokens[:, 1:]
        ce = F.cross_entropy(logits[mask].float(), target[mask])
        with torch.no_grad():
            acc = (logits[mask].argmax(-1) == target[mask]).float().mean()
        return ce, {"dyn_ce": ce.detach(), "dyn_acc": acc}

    # ------------------------------------------------------------------ play (cached)
    def new_cache(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  window: int | None = None) -> KVCache:
        cfg = self.config
        window = self.window if window is None else window
        if not 1 <= window <= self.window:
            raise ValueError(f"context_frames must be in [1, {self.window}] (the model's context window), got {window}")
        cap = max(self.window - 1, 1)
        heads = cfg.dynamics_num_heads
        dh = cfg.dynamics_dim // heads
        shape = (cfg.dynamics_depth, batch, self.num_tokens, heads, cap, dh)
        return KVCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            age=torch.zeros(batch, cap, dtype=torch.long, device=device),
            ptr=torch.zeros(batch, dtype=torch.long, device=device),
            window=window,
        )

    def _step_bias(self, cache: KVCache, rows: torch.Tensor | None, blk: STBlock) -> torch.Tensor:
        age = cache.age if rows is None else cache.age[rows]
        b = age.shape[0]
        tb = blk.time_bias  # (H, window)
        ok = (age > 0) & (age < cache.window)
        past = torch.where(ok[:, None, :], tb[:, age.clamp(0, self.window - 1)].transpose(0, 1), NEG_INF)
        own = tb[:, :1].expand(b, -1, -1)  # distance 0
        return torch.cat([past, own], dim=2)  # (b, H, c+1)

    def _pair_biases(self, cache: KVCache, rows: torch.Tensor | None) -> torch.Tensor:
        """(layers, b, H, 2, c+2) masks for `STBlock.forward_pair`: frame 0 (the next frame the cache gets)
        over [cache, itself, -], as `_step_bias`; frame 1 over [cache, frame 0, itself], one frame further
        from each cached frame (the slot frame 0 will overwrite is empty or out of frame 1's window)."""
        age = cache.age if rows is None else cache.age[rows]  # (b, c)
        b = age.shape[0]
        tb = torch.stack([blk.time_bias for blk in self.blocks])  # (L, H, window)
        dist = torch.stack([age, age + 1], dim=1)  # (b, 2, c) from frames 0 and 1
        ok = (age[:, None] > 0) & (dist < cache.window)
        past = tb[:, :, dist.clamp(0, self.window - 1)].permute(0, 2, 1, 3, 4)  # (L, b, H, 2, c)
        past = past.masked_fill(~ok[None, :, None], NEG_INF)
        own = torch.full((*tb.shape[:2], 2, 2), NEG_INF, dtype=tb.dtype, device=tb.device)  # (L, H, 2, 2)
        own[:, :, 0, 0] = own[:, :, 1, 1] = tb[:, :, 0]
        if cache.window > 1:
            own[:, :, 1, 0] = tb[:, :, 1]
        return torch.cat([past, own[:, None].expand(-1, b, -1, -1, -1)], dim=-1)

    def _advance(self, cache: KVCache, idx: torch.Tensor) -> None:
        """Book a frame just written at the rows' ``ptr`` slots: ages grow by one, the oldest beyond the
        capacity is dropped, ptr moves on (no host sync: a CUDA graph can hold the step)."""
        age = cache.age[idx]
        age = torch.where(age > 0, age + 1, age)
        age[torch.arange(idx.numel(), device=age.device), cache.ptr[idx]] = 1
        age.masked_fill_(age > cache.age.shape[1], 0)
        cache.age[idx] = age
        cache.ptr[idx] = (cache.ptr[idx] + 1) % cache.age.shape[1]

    def step(self, cache: KVCache, tokens: torch.Tensor, action: torch.Tensor,
             rows: torch.Tensor | None = None, commit: bool = False, return_features: bool = False,
             pending: tuple[torch.Tensor, torch.Tensor] | None = None,
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Run one frame against the cache.

        tokens: (b, n) long (mask_id where masked); action: (b,) long, the latent action leading to this
        frame (null_action for a prompt's first frame); rows: which cache rows these are (None = all).
        With commit=False returns (b, n, vocab) logits, and with return_features also the normalised
        hidden states (b, n, d) they are read from; with commit=True writes the frame's keys and values
        to the cache (the frame must be complete) and returns None.
        pending: a complete frame (tokens (b, n), action (b,)) between the cache and this frame, committed
        in the same pass (`STBlock.forward_pair`): the cache and the result are those of a commit of it
        followed by this step, for one pass over both frames' rows instead of two (commit=False only).
        """
        if pending is not None:
            if commit:
                raise ValueError("pending is committed by a pass over another frame: use commit=False")
            return self._step_pair(cache, pending, tokens, action, rows, return_features)
        x, a = self._embed(tokens[:, None], action[:, None], self.config.action_gain)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if commit and i == last:  # nothing reads this block's output when committing
                k, v = blk.step_kv(x, a)
            else:
                ck = cache.k[i] if rows is None else cache.k[i][rows]
                cv = cache.v[i] if rows is None else cache.v[i][rows]
                x, k, v = blk.forward_step(x, a, ck, cv, self._step_bias(cache, rows, blk))
            if commit:
                idx = torch.arange(cache.batch_size, device=x.device) if rows is None else rows
                ptr = cache.ptr[idx]
                cache.k[i][idx, :, :, ptr] = k.to(cache.k.dtype)
                cache.v[i][idx, :, :, ptr] = v.to(cache.v.dtype)
        if commit:
            self._advance(cache, torch.arange(cache.batch_size, device=x.device) if rows is None else rows)
            return None
        h = self.norm(x[:, 0])
        return (self.head(h), h) if return_features else self.head(h)

    def _step_pair(self, cache: KVCache, pending: tuple[torch.Tensor, torch.Tensor], tokens: torch.Tensor,
                   action: torch.Tensor, rows: torch.Tensor | None, return_features: bool
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`step` with a pending frame: commit it and run ``tokens`` after it, in one pass."""
        x, a = self._embed(torch.stack([pending[0], tokens], 1), torch.stack([pending[1], action], 1),
                           self.config.action_gain)
        biases = self._pair_biases(cache, rows)
        last = len(self.blocks) - 1
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            ck = cache.k[i] if rows is None else cache.k[i][rows]
            cv = cache.v[i] if rows is None else cache.v[i][rows]
            x, k, v = blk.forward_pair(x, a, ck, cv, biases[i], last=i == last)
            ks.append(k)
            vs.append(v)
        idx = torch.arange(cache.batch_size, device=x.device) if rows is None else rows
        ptr = cache.ptr[idx]
        cache.k[:, idx, :, :, ptr] = torch.stack(ks, 1).to(cache.k.dtype)  # (b, L, n, H, dh)
        cache.v[:, idx, :, :, ptr] = torch.stack(vs, 1).to(cache.v.dtype)
        self._advance(cache, idx)
        h = self.norm(x[:, -1])
        return (self.head(h), h) if return_features else self.head(h)

    # ------------------------------------------------------------------ MaskGIT
    def sample_frame(
        self, cache: KVCache, action: torch.Tensor, steps: int, temperature: float = 1.0, top_k: int = 0,
        schedule: str = "cosine", generator: torch.Generator | None = None,
        rows: torch.Tensor | None = None, return_features: bool = False,
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """MaskGIT: start fully masked, sample every masked token, keep the most confident, re-mask the
        rest, for ``steps`` steps. Confidence gets Gumbel noise scaled by the temperature (annealed to
        zero), so tokens are revealed in a partly random order: greedy order tends to copy the previous
        frame. Every step reveals at least one token (the cosine schedule's first steps round to none
        at many steps, which would spend a dynamics pass on nothing); with more steps than tokens the
        frame is finished early. Returns (b, n) long tokens. With return_features also the hidden states
        (b, n, d) of the first pass (every token masked: they depend on the context and the action only,
        not on the sampling), which the reward / episode-end heads read.
        pending: a complete frame (tokens (b, n), action (b,)), the one before the sampled frame, not yet in
        the cache: the first pass commits it (see `step`). The cache is changed by that commit only."""
        b = action.shape[0]
        n = self.num_tokens
        dev = action.device
        tokens = torch.full((b, n), self.mask_id, dtype=torch.long, device=dev)
        masked = torch.ones(b, n, dtype=torch.bool, device=dev)
        n_masked = n
        features = None
        for s in range(steps):
            logits = self.step(cache, torch.where(masked, self.mask_id, tokens), action, rows=rows,
                               return_features=s == 0, pending=pending if s == 0 else None)
            if s == 0:
                logits, features = logits
            logits = logits.float()
            sampled, logp = sample_logits(logits, temperature, top_k, generator)
            tokens = torch.where(masked, sampled, tokens)
            # every row holds the same number of masked tokens
            remain = min(int(math.floor(n * mask_schedule((s + 1) / steps, schedule))), n_masked - 1)
            if remain <= 0:
                break
            conf = logp
            if temperature > 0:
                anneal = temperature * (1 - (s + 1) / steps)
                u = torch.rand(b, n, device=dev, generator=generator).clamp_(1e-9, 1 - 1e-9)
                conf = conf + anneal * -torch.log(-torch.log(u))
            conf = torch.where(masked, conf, torch.inf)  # already revealed tokens stay revealed
            lowest = conf.topk(remain, dim=1, largest=False).indices
            masked = torch.zeros_like(masked).scatter_(1, lowest, True)
            n_masked = remain
        return (tokens, features) if return_features else tokens


def mask_schedule(r: float, kind: str) -> float:
    """Fraction of tokens still masked after a fraction r of the steps (1 at r=0, 0 at r=1)."""
    if kind == "cosine":
        return math.cos(math.pi / 2 * r)
    if kind == "linear":
        return 1 - r
    if kind == "exp":
        return (math.exp(-5 * r) - math.exp(-5)) / (1 - math.exp(-5))
    raise ValueError(f"unknown maskgit schedule {kind!r}: use cosine, linear or exp")


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per position from (..., V) logits at ``temperature`` (0: argmax), among the ``top_k``
    likeliest where top_k > 0 (batched, seeded). Returns the tokens and their log-probabilities under the
    unscaled distribution.

    One exp pass serves both: w = exp(logits - max) gives the log-normaliser, and w ** (1 / temperature) the
    tempered weights, drawn from by inverse CDF (`_draw`): two uniforms a position instead of one a logit
    (a Gumbel-max draw over 4,096 codes at 32 envs spent 120 ms a MaskGIT step on its random numbers and
    logarithms; this takes 25 ms)."""
    m = logits.amax(-1, keepdim=True)
    w = (logits - m).exp_()
    lse = m[..., 0] + w.sum(-1).log()
    if temperature <= 0:
        tok = logits.argmax(-1)
    else:
        if temperature != 1:
            w.pow_(1.0 / temperature)
        if 0 < top_k < logits.shape[-1]:
            kth = w.topk(top_k, dim=-1).values[..., -1:]
            w.masked_fill_(w < kth, 0.0)
        tok = _draw(w, generator)
    return tok, logits.gather(-1, tok[..., None])[..., 0] - lse


def _draw(w: torch.Tensor, generator: torch.Generator | None, block: int = 64) -> torch.Tensor:
    """One index per row of non-negative weights (..., V), with probability proportional to its weight: a
    block of ``block`` entries by the blocks' sums, then an entry within it (two short cumulative sums
    instead of one over V). A zero-weight entry is never drawn: each draw lands strictly below its
    cumulative sum's top, on a step where the sum rises."""
    v = w.shape[-1]
    size = block if v % block == 0 and v > block else v
    lead = w.shape[:-1]
    u = torch.rand(*lead, 2, device=w.device, generator=generator)

    def pick(cum: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        top = cum[..., -1:]
        x = torch.minimum(r * top, torch.nextafter(top, torch.zeros_like(top)))
        return torch.searchsorted(cum, x, right=True)[..., 0]

    if size == v:
        return pick(w.cumsum(-1), u[..., :1])
    blocks = w.view(*lead, v // size, size)
    b = pick(blocks.sum(-1).cumsum(-1), u[..., :1])
    inner = blocks.gather(-2, b[..., None, None].expand(*lead, 1, size))[..., 0, :]
    return b * size + pick(inner.cumsum(-1), u[..., 1:])
