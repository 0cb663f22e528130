"""Carry a trained dynamics over to a tokenizer with another codebook.

A new tokenizer's code numbers mean nothing to a dynamics trained on an old tokenizer's tokens, but the two
tokenizers code the same patches of the same frames: where the new tokenizer writes code j, the old one
mostly wrote a few codes i. Counting those pairs over a sample of frames (`code_cooccurrence`) lets the
dynamics keep what it knows (`transplant_vocabulary`):

- the embedding of new code j is the mean of the old codes' embeddings at j's positions, weighted by how
  often each was there; the mask token's embedding is carried as it is;
- the output row of new code j is the row of its most frequent old code m(j), its bias lowered by
  log P(j | m(j)) (the share of m(j)'s positions among the new codes that chose it), so that the new
  softmax splits each old code's probability over the new codes it became;
- a new code never seen in the sample gets the old codes' mean embedding and a bias of -20 (the dynamics
  learns it when it appears).

Reward and episode-end heads that read tokens (`OutcomeModel`) carry over the same way: their token
embeddings transplanted, the rest as it was (`carry_outcomes`).

With the same codebook in another order the carried dynamics gives the same predictions, permuted (its
test); for the 4,096-code tokenizer against the shipped 1,024-code one it starts a dynamics 5 dB of rollout
PSNR ahead of the transformer alone (docs/experiments.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

UNSEEN_BIAS = -20.0


def sample_frames(data: str | Path, image_size: int, max_frames: int) -> torch.Tensor | None:
    """Up to ``max_frames`` frames (N, 3, H, W) float in [0, 1] spread evenly over a frame dataset's videos
    (a folder of videos or a frames file); None for a tokens file, which has no frames."""
    from training.data import FrameCache
    from training.pretokenized import FrameFile, file_kind

    kind = file_kind(data)
    if kind == "tokens":
        return None
    cache = FrameFile(data) if kind == "frames" else FrameCache(data, image_size, log=lambda *a: None, verify=False)
    total = sum(e.frames for e in cache.videos)
    picks = np.unique(np.linspace(0, total - 1, min(max_frames, total)).round().astype(np.int64))
    starts = np.cumsum([0] + [e.frames for e in cache.videos])
    frames = []
    for v in range(len(cache.videos)):
        inside = picks[(picks >= starts[v]) & (picks < starts[v + 1])] - starts[v]
        if len(inside):
            clip = cache.clip(v, int(inside[0]), int(inside[-1] - inside[0]) + 1)
            frames.append(clip[inside - inside[0]])
    x = torch.from_numpy(np.concatenate(frames))
    return x.permute(0, 3, 1, 2).float().div(255)


@torch.no_grad()
def code_cooccurrence(new_tokenizer, old_tokenizer, frames: torch.Tensor, new_vocab: int, old_vocab: int,
                      batch: int = 64) -> torch.Tensor:
    """counts (new_vocab, old_vocab): how often each pair of codes sits at the same token position of the
    same frame. frames: (N, 3, H, W) in [0, 1]; both tokenizers must give the same token grid."""
    counts = torch.zeros(new_vocab * old_vocab, dtype=torch.float64)
    for i in range(0, len(frames), batch):
        x = frames[i:i + batch].unsqueeze(2)  # (b, 3, 1, H, W): one-frame clips
        tn, to = new_tokenizer.encode(x).flatten(), old_tokenizer.encode(x).flatten()
        if tn.shape != to.shape:
            raise ValueError(f"the two tokenizers give different token grids ({tn.numel()} and {to.numel()} "
                             "tokens for the same frames): a dynamics carries over only between equal grids")
        counts += torch.bincount(tn * old_vocab + to, minlength=new_vocab * old_vocab).double()
    return counts.view(new_vocab, old_vocab)


@torch.no_grad()
def transplant_embedding(new: torch.Tensor, old: torch.Tensor, counts: torch.Tensor) -> None:
    """Rows 0..V_new-1 of the embedding table ``new`` from the rows 0..V_old-1 of ``old``: each new code's
    row is the mean of the old codes' rows at its positions, weighted by ``counts`` (V_new, V_old); a code
    never counted gets the old codes' mean row, weighted by their frequency."""
    vn, vo = counts.shape
    seen = counts.sum(1) > 0
    old_rows = old[:vo].double()
    share = counts / counts.sum(1, keepdim=True).clamp_min(1)  # P(old i | new j)
    old_freq = counts.sum(0) / counts.sum().clamp_min(1)
    rows = torch.where(seen[:, None], share @ old_rows, (old_freq @ old_rows)[None])
    new[:vn] = rows.to(new.dtype)


@torch.no_grad()
def carry_outcomes(new, old, counts: torch.Tensor) -> bool:
    """The reward and episode-end heads of ``old`` (an `OutcomeModel` reading tokens of the old codebook)
    into ``new`` (the same heads for the new codebook): everything as it is but the token embeddings, which
    are transplanted. False (``new`` untouched) where the two are not token-reading heads of one shape."""
    if new is None or old is None or new.input != "tokens" or old.input != "tokens":
        return False
    vocab_sized = {"token_emb.weight", "prev_emb.weight"}
    rest = {k: v for k, v in old.state_dict().items() if k not in vocab_sized}
    mine = new.state_dict()
    if (set(rest) | (vocab_sized & set(mine))) != set(mine) or any(
            mine[k].shape != v.shape for k, v in rest.items()):
        return False
    new.load_state_dict(rest, strict=False)
    for name in ("token_emb", "prev_emb"):
        if hasattr(new, name):
            transplant_embedding(getattr(new, name).weight, getattr(old, name).weight, counts)
    return True


@torch.no_grad()
def transplant_vocabulary(new, old, counts: torch.Tensor) -> dict:
    """Set ``new``'s token embedding and output layer (a `Dynamics`, new codebook) from ``old``'s (a
    `Dynamics` trained on the old codebook) through ``counts`` (`code_cooccurrence`). Returns figures on how
    well the codebooks correspond."""
    vn, vo = new.vocab, old.vocab
    if counts.shape != (vn, vo):
        raise ValueError(f"counts {tuple(counts.shape)} do not match the vocabularies ({vn}, {vo})")
    seen = counts.sum(1) > 0
    if not seen.any():
        raise ValueError("no code pairs counted: no frames were coded")
    transplant_embedding(new.token_emb.weight, old.token_emb.weight, counts)
    new.token_emb.weight[vn] = old.token_emb.weight[vo]  # the mask token
    m = counts.argmax(1)
    chose = counts[torch.arange(vn), m]  # positions of new code j on its old code m(j)
    group = torch.zeros(vo, dtype=torch.float64).index_add_(0, m, chose)
    log_split = torch.where(seen, torch.log(chose.clamp_min(1e-12) / group[m].clamp_min(1e-12)),
                            torch.full_like(chose, UNSEEN_BIAS))
    new.head.weight.copy_(old.head.weight[m])
    new.head.bias.copy_((old.head.bias[m].double() + log_split).to(new.head.bias.dtype))
    return {"new_codes_seen": int(seen.sum()), "new_vocab": vn, "old_vocab": vo,
            "positions": int(counts.sum()),
            "commonest_old_code_share": float(counts.max(1).values.sum() / counts.sum())}


def carry_dynamics(model, body_release: str | Path, data: str | Path, max_frames: int = 4096,
                   log=print) -> dict | None:
    """Carry ``body_release``'s dynamics vocabulary over to ``model``'s tokenizer (the transformer itself
    is loaded by the caller), counting codes on ``max_frames`` frames of ``data``. None (and the fresh
    vocabulary tensors kept) where ``data`` has no frames."""
    from genie_env import Genie

    frames = sample_frames(data, model.config.image_size, max_frames)
    if frames is None:
        log(f"dynamics vocabulary: {data} is a tokens file, with no frames to match the two codebooks on: the "
            "token embedding and output layer start fresh")
        return None
    t0 = time.time()
    old = Genie.from_pretrained(body_release).eval()
    was_training = model.tokenizer.training
    model.tokenizer.eval()
    counts = code_cooccurrence(model.tokenizer, old.tokenizer, frames, model.config.tokenizer_vocab_size,
                               old.config.tokenizer_vocab_size)
    model.tokenizer.train(was_training)
    stats = transplant_vocabulary(model.dynamics, old.dynamics, counts)
    stats["frames"] = len(frames)
    stats["outcomes"] = carry_outcomes(model.outcomes, old.outcomes, counts)
    if stats["outcomes"]:
        log(f"the reward and episode-end heads of {body_release} carried over too, as a start only: train them "
            "again with `--stage reward` on the new release (carried from 1,024 to 4,096 codes they kept a reward "
            "precision of 0.15; retrained, 0.92), then calibrate them (`python -m training.outcomes --calibrate-on`)")
    elif model.outcomes is not None:
        log(f"the model's reward and episode-end heads start fresh: {body_release} has no token-reading heads "
            "of the same shape")
    stats["seconds"] = round(time.time() - t0, 1)
    log(f"dynamics vocabulary carried over from {body_release}'s {stats['old_vocab']} codes to "
        f"{stats['new_vocab']} on {len(frames)} frames ({stats['seconds']} s): {stats['new_codes_seen']} new "
        f"codes seen; a new code's commonest old code holds {stats['commonest_old_code_share']:.0%} of its "
        "positions")
    return stats
