"""training.transplant: a dynamics carried over to a tokenizer with another codebook."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import tiny_model
from training.transplant import carry_outcomes, code_cooccurrence, sample_frames, transplant_vocabulary


def _permuted(old, seed: int = 1):
    """``old`` with its tokenizer's codebook in another order (new code perm[i] is old code i) and a fresh
    token embedding and output layer; returns (new, perm)."""
    new = copy.deepcopy(old)
    g = torch.Generator().manual_seed(seed)
    v = old.config.tokenizer_vocab_size
    perm = torch.randperm(v, generator=g)
    inv = torch.argsort(perm)
    q = new.tokenizer.quantizer
    with torch.no_grad():
        for name in ("embed", "ema_sum", "ema_count"):
            if hasattr(q, name):
                getattr(q, name).copy_(getattr(old.tokenizer.quantizer, name)[inv])
        torch.manual_seed(seed)
        new.dynamics.token_emb.reset_parameters()
        new.dynamics.head.reset_parameters()
    return new, perm


def test_a_permuted_codebook_carries_the_dynamics_over_exactly():
    old = tiny_model(0)
    new, perm = _permuted(old)
    v = old.config.tokenizer_vocab_size
    g = torch.Generator().manual_seed(0)
    clips = torch.rand(2, 3, 4, 16, 16, generator=g)  # (B, 3, T, H, W)
    frames = torch.cat([clips.permute(0, 2, 1, 3, 4).flatten(0, 1), torch.rand(56, 3, 16, 16, generator=g)])
    with torch.no_grad():
        tok_old = old.tokenizer.encode(clips).flatten(2)
        tok_new = new.tokenizer.encode(clips).flatten(2)
    assert torch.equal(tok_new, perm[tok_old])  # the same coding, numbered otherwise

    counts = code_cooccurrence(new.tokenizer, old.tokenizer, frames, v, v)
    stats = transplant_vocabulary(new.dynamics, old.dynamics, counts)
    assert stats["commonest_old_code_share"] == 1.0 and stats["positions"] == 64 * 16

    actions = torch.randint(0, old.config.action_vocab_size, (2, 3), generator=g)
    mask = old.dynamics.training_mask(2, 3, generator=g)
    with torch.no_grad():
        lo = old.dynamics(tok_old, actions, mask)
        ln = new.dynamics(tok_new, actions, mask)
    seen_old = torch.unique(tok_old)
    assert len(seen_old) > 1
    # each code the frames use: the carried dynamics predicts it exactly as the old one predicted its old number
    torch.testing.assert_close(ln[..., perm[seen_old]], lo[..., seen_old], atol=1e-5, rtol=1e-5)
    # and the fresh tensors would not (the property is the transplant's, not the deep copy's)
    fresh, _ = _permuted(old)
    with torch.no_grad():
        lf = fresh.dynamics(tok_new, actions, mask)
    assert not torch.allclose(lf[..., perm[seen_old]], lo[..., seen_old], atol=1e-3)


def test_token_reading_heads_carry_over_with_the_codebook():
    heads = dict(outcome_input="tokens", outcome_frames=2, outcome_dim=16)
    old = tiny_model(0, **heads)
    new, perm = _permuted(old)
    v = old.config.tokenizer_vocab_size
    with torch.no_grad():  # the new model's heads start elsewhere
        for p in new.outcomes.parameters():
            p.normal_()
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(64, 3, 16, 16, generator=g)
    counts = code_cooccurrence(new.tokenizer, old.tokenizer, frames, v, v)
    assert carry_outcomes(new.outcomes, old.outcomes, counts)
    with torch.no_grad():
        tok_old = old.tokenizer.encode(frames[:32].unsqueeze(2)).flatten(1).view(16, 2, -1)  # (b, 2 frames, n)
    action = torch.randint(0, old.config.action_vocab_size, (16,), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(new.outcomes.probabilities(perm[tok_old], action),
                                   old.outcomes.probabilities(tok_old, action), atol=1e-5, rtol=1e-5)
    # heads of another shape, or none, are not carried
    assert not carry_outcomes(tiny_model(0, **{**heads, "outcome_frames": 1}).outcomes, old.outcomes, counts)
    assert not carry_outcomes(new.outcomes, None, counts)


def test_a_finer_codebook_splits_each_old_code_probability():
    """Two new codes for every old one: the new softmax gives each old code's probability to its new codes
    in the proportions counted, and codes never counted get (almost) none."""
    old = tiny_model(0)
    new = tiny_model(1, tokenizer_vocab_size=2 * old.config.tokenizer_vocab_size)
    vo, vn = old.config.tokenizer_vocab_size, new.config.tokenizer_vocab_size
    body = {k: v for k, v in old.dynamics.state_dict().items() if not k.startswith(("token_emb", "head"))}
    new.dynamics.load_state_dict(body, strict=False)  # the same transformer, as load_dynamics_body gives
    counts = torch.zeros(vn, vo, dtype=torch.float64)
    for i in range(vo):
        counts[2 * i, i], counts[2 * i + 1, i] = 3.0, 1.0  # new 2i and 2i+1 split old i 3:1
    counts[1, 0] = 0.0  # new code 1 never seen: old code 0 goes wholly to new code 0
    transplant_vocabulary(new.dynamics, old.dynamics, counts)
    g = torch.Generator().manual_seed(0)
    tok_old = torch.randint(0, vo, (1, 3, 16), generator=g)
    tok_new = 2 * tok_old  # the commonest new code of each old one
    actions = torch.zeros(1, 2, dtype=torch.long)
    mask = torch.ones(1, 2, 16, dtype=torch.bool)
    with torch.no_grad():
        po = old.dynamics(tok_old, actions, mask).softmax(-1)
        pn = new.dynamics(tok_new, actions, mask).softmax(-1)
    pairs = pn[..., 2:].reshape(*pn.shape[:-1], vo - 1, 2).sum(-1)  # new codes 2i, 2i+1 against old code i
    torch.testing.assert_close(pairs, po[..., 1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pn[..., 4] / pn[..., 5], torch.full_like(pn[..., 4], 3.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(pn[..., 0], po[..., 0], atol=1e-5, rtol=1e-4)
    assert float(pn[..., 1].max()) < 1e-6


def test_sample_frames_spreads_over_the_videos_and_a_tokens_file_has_none(tmp_path):
    from tests.test_training import moving_square_videos

    data = moving_square_videos(tmp_path / "d", n=3, frames=10)
    x = sample_frames(data, 16, 12)
    assert x.shape == (12, 3, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert sample_frames(data, 16, 1000).shape[0] == 30  # no more than there are

    from training.pretokenized import ArraySource, write_tokens_file

    model = tiny_model(0)
    rng = np.random.default_rng(0)
    src = ArraySource([rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)], tmp_path)
    tokens = write_tokens_file(model, src, tmp_path / "t.tokens.safetensors", source="test")
    assert sample_frames(tokens, 16, 10) is None


def test_mismatched_counts_are_refused():
    old, new = tiny_model(0), tiny_model(1, tokenizer_vocab_size=64)
    with pytest.raises(ValueError, match="do not match the vocabularies"):
        transplant_vocabulary(new.dynamics, old.dynamics, torch.ones(32, 32))
    with pytest.raises(ValueError, match="no code pairs"):
        transplant_vocabulary(new.dynamics, old.dynamics, torch.zeros(64, 32, dtype=torch.float64))
