"""The fused commit: a session writes each frame into the KV cache in the next step's first MaskGIT pass
(`DynamicsModel.step` with ``pending``) rather than in a pass of its own. It must compute what committing
first and then stepping computes, and what the training forward over the whole clip predicts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch.utils.flop_counter import FlopCounterMode

from genie_env import Genie

STEPS, RESET_AT = 12, 6  # each segment runs past the tiny model's window of 4 frames


def random_time_bias(model: Genie, seed: int = 0) -> Genie:
    """Time biases of a trained model's size (about +-1): at zero a fault in frame distances stays hidden."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.dynamics.blocks:
            blk.time_bias.copy_(torch.randn(blk.time_bias.shape, generator=g))
    return model


def clip(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.rand(b, 3, t, 16, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("window", [None, 2, 1])
@pytest.mark.parametrize("rows", [None, torch.tensor([0, 2])])
def test_pair_step_is_a_commit_then_a_step(window, rows):
    """Teacher-forced over 11 frames at batch 3: the fused pass's logits equal a commit pass followed by a
    step on a twin cache, and (full window) the training forward's at an all-masked frame; both caches
    end the same."""
    model = random_time_bias(tiny_model())
    dyn, cfg = model.dynamics, model.config
    t = 12
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg.tokenizer_vocab_size, (3, t, cfg.tokens_per_frame), generator=g)
    acts = torch.randint(0, cfg.action_vocab_size, (3, t - 1), generator=g)
    full = dyn(tok, acts, torch.ones(3, t - 1, cfg.tokens_per_frame, dtype=torch.bool))
    sel = slice(None) if rows is None else rows
    b = tok[sel].shape[0]
    fused, twin = dyn.new_cache(3, window=window), dyn.new_cache(3, window=window)
    masked = torch.full((b, cfg.tokens_per_frame), dyn.mask_id)
    pending = (tok[sel, 0], torch.full((b,), dyn.null_action))
    for i in range(1, t):
        got = dyn.step(fused, masked, acts[sel, i - 1], rows=rows, pending=pending)
        dyn.step(twin, *pending, rows=rows, commit=True)
        want = dyn.step(twin, masked, acts[sel, i - 1], rows=rows)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if window is None:
            torch.testing.assert_close(got, full[sel, i - 1], atol=1e-4, rtol=1e-4)
        pending = (tok[sel, i], acts[sel, i - 1])
    assert torch.equal(fused.age, twin.age) and torch.equal(fused.ptr, twin.ptr)
    torch.testing.assert_close(fused.k, twin.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.v, twin.v, atol=1e-5, rtol=1e-5)
    if rows is not None:
        assert int(fused.age[1].sum()) == 0  # a row outside ``rows`` is left alone


def play(model: Genie, fuse: bool, prompt: torch.Tensor, acts: torch.Tensor, reset: torch.Tensor,
         reset_prompt: torch.Tensor) -> tuple[list, list, list, object]:
    """Steps a session (2 MaskGIT passes at temperature 1, seeded), resetting rows at RESET_AT; returns per
    step the first pass's logits, the tokens and the heads' outcomes, and the session."""
    dyn = model.dynamics
    first, step = [], dyn.step

    def spy(cache, tokens, action, **kwargs):
        out = step(cache, tokens, action, **kwargs)
        if kwargs.get("return_features"):
            first.append(out[0])
        return out

    dyn.step = spy
    try:
        s = model.start(prompt, generator=torch.Generator().manual_seed(5), maskgit_steps=2, temperature=1.0)
        s.fuse_commit = fuse
        tokens, outcomes = [], []
        for k in range(STEPS):
            if k == RESET_AT:
                s.reset_rows(reset, reset_prompt)
            s.step(acts[:, k])
            tokens.append(s.last_tokens)
            outcomes.append(s.last_outcomes)
    finally:
        del dyn.step
    return first, tokens, outcomes, s


def reference_logits(model: Genie, prompt: torch.Tensor, gen: list, acts: torch.Tensor) -> torch.Tensor:
    """The training forward's logits for each generated frame, all masked, given the prompt (its actions
    inferred) and the frames generated before it: (b, len(gen), n, vocab)."""
    ptok = model.tokenize(prompt).flatten(2)
    b, t0, n = ptok.shape
    pact = model.infer_actions(prompt) if t0 > 1 else torch.zeros(b, 0, dtype=torch.long)
    tokens = torch.cat([ptok, torch.stack(gen, 1)], 1)
    mask = torch.ones(b, tokens.shape[1] - 1, n, dtype=torch.bool)
    return model.dynamics(tokens, torch.cat([pact, acts], 1), mask)[:, t0 - 1:]


@torch.no_grad()
@pytest.mark.parametrize("b, t0, reset, t0_reset", [(1, 1, [0], 2), (3, 2, [0, 2], 1)])
def test_fused_session_plays_what_the_unfused_one_and_the_training_forward_do(b, t0, reset, t0_reset):
    """12 steps past the window, with rows reset in the middle: the fused session samples the unfused one's
    tokens from the same generator, its heads read the same outcomes, both end with the same cache, and every
    first MaskGIT pass gives the training forward's logits for the clip played so far."""
    model = random_time_bias(tiny_model(outcome_input="hidden"))
    prompt, reset_prompt = clip(b, t0, 1), clip(len(reset), t0_reset, 2)
    acts = torch.randint(0, 8, (b, STEPS), generator=torch.Generator().manual_seed(3))
    reset = torch.tensor(reset)
    logits, tokens, outcomes, s = play(model, True, prompt, acts, reset, reset_prompt)
    logits0, tokens0, outcomes0, s0 = play(model, False, prompt, acts, reset, reset_prompt)
    assert len(logits) == len(logits0) == STEPS
    for k in range(STEPS):
        torch.testing.assert_close(logits[k], logits0[k], atol=1e-5, rtol=1e-5)
        assert torch.equal(tokens[k], tokens0[k]), k
        torch.testing.assert_close(outcomes[k], outcomes0[k], atol=1e-5, rtol=1e-5)
    assert torch.equal(s.cache.age, s0.cache.age) and torch.equal(s.cache.ptr, s0.cache.ptr)
    torch.testing.assert_close(s.cache.k, s0.cache.k, atol=1e-5, rtol=1e-5)
    assert torch.equal(s.last_tokens, s0.last_tokens) and torch.equal(s.last_action, s0.last_action)

    kept = [r for r in range(b) if r not in reset.tolist()]
    full = reference_logits(model, prompt, tokens, acts)  # rows never reset: one clip of STEPS frames
    got = torch.stack(logits, 1)
    torch.testing.assert_close(got[kept], full[kept], atol=1e-4, rtol=1e-4)
    before = reference_logits(model, prompt[reset], [t[reset] for t in tokens[:RESET_AT]], acts[reset, :RESET_AT])
    torch.testing.assert_close(got[reset, :RESET_AT], before, atol=1e-4, rtol=1e-4)
    after = reference_logits(model, reset_prompt, [t[reset] for t in tokens[RESET_AT:]], acts[reset, RESET_AT:])
    torch.testing.assert_close(got[reset, RESET_AT:], after, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_fused_step_does_the_work_of_the_unfused_one():
    """The fused pass saves a pass, not arithmetic: a step counts the same FLOPs either way (what the
    benchmark's achieved GFLOP/s divides by), but for the temporal attention, which the counter sees only
    where it runs as matmuls (the fused pass's two queries; one query runs as elementwise products)."""
    model = tiny_model()
    cfg = model.config
    dh = cfg.dynamics_dim // cfg.dynamics_num_heads
    keys = cfg.context_frames - 1 + 2  # the cache and both frames
    rows = cfg.tokens_per_frame * cfg.dynamics_num_heads
    queries = 2 * (cfg.dynamics_depth - 1) + 1  # the last block needs frame 1's output only
    attention = rows * queries * keys * dh * 2 * 2  # scores and weighted values, a multiply-add each
    flops = {}
    for fuse in (True, False):
        s = model.start(clip(1, 1, 0), generator=torch.Generator().manual_seed(0))
        s.fuse_commit = fuse
        s.step(torch.tensor([1]))
        with FlopCounterMode(display=False) as fc:
            s.step(torch.tensor([2]))
        flops[fuse] = fc.get_total_flops()
    assert flops[True] == flops[False] + attention and flops[False] > 0


def test_small_batches_fuse_the_commit():
    """Sessions fuse the commit up to FUSED_COMMIT_MAX_BATCH rows (where it is faster), not above."""
    from genie_env.models.genie import FUSED_COMMIT_MAX_BATCH

    model = tiny_model()
    assert model.start(clip(1, 1, 0)).fuse_commit and model.start(clip(FUSED_COMMIT_MAX_BATCH, 1, 0)).fuse_commit
    big = model.start(clip(FUSED_COMMIT_MAX_BATCH + 1, 1, 0))
    assert not big.fuse_commit
    big.step(torch.zeros(FUSED_COMMIT_MAX_BATCH + 1, dtype=torch.long))
    assert big.cache.frames().tolist() == [1] * (FUSED_COMMIT_MAX_BATCH + 1)
