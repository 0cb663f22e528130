"""The model library: shapes, round trips, caching, action alignment, determinism, bad inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model

from genie_env import ConfigError, Genie, GenieConfig, create_genie_large, create_genie_small
from genie_env.models.dynamics import mask_schedule, sample_logits


def frames(b=2, t=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, size, size, generator=g)


def blocky(b=2, t=4, size=16, seed=0):
    """Frames of flat 4x4 blocks of a few colours, like pixel art."""
    g = torch.Generator().manual_seed(seed)
    low = (torch.rand(b, 3, t, size // 4, size // 4, generator=g) > 0.5).float() * 0.8 + 0.1
    return low.repeat_interleave(4, -1).repeat_interleave(4, -2)


# ---------------------------------------------------------------------------------------------- API shapes
def test_seed_api_shapes(tiny):
    x = frames()
    tok = tiny.tokenize(x)
    assert tok.shape == (2, 4, 4, 4) and tok.dtype == torch.long
    assert int(tok.max()) < tiny.config.tokenizer_vocab_size
    rec = tiny.detokenize(tok)
    assert rec.shape == x.shape and float(rec.min()) >= 0 and float(rec.max()) <= 1
    acts = tiny.infer_actions(x)
    assert acts.shape == (2, 3) and acts.dtype == torch.long
    assert int(acts.min()) >= 0 and int(acts.max()) < 8
    out = tiny.generate(x[:, :, 0], num_frames=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 5, 16, 16)
    assert torch.equal(out[:, :, 0], x[:, :, 0])  # the prompt comes back unchanged
    out = tiny.generate(x[:, :, :2], num_frames=5, actions=torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert out.shape == (2, 3, 5, 16, 16) and torch.equal(out[:, :, :2], x[:, :, :2])
    nxt = tiny.play(x[:, :, 0], torch.tensor([3, 4]))
    assert nxt.shape == (2, 3, 16, 16)


def test_session_steps_and_row_reset(tiny):
    x = frames(b=3)
    s = tiny.start(x[:, :, 0], generator=torch.Generator().manual_seed(1))
    for _ in range(6):  # more steps than context_frames: the window slides
        f = s.step(torch.tensor([0, 1, 2]))
    assert f.shape == (3, 3, 16, 16)
    assert s.cache.frames().tolist() == [3, 3, 3]  # capped at context_frames - 1
    s.reset_rows(torch.tensor([1]), x[1:2, :, 1])
    # the prompt frame is the row's pending frame: the next step's first pass caches it
    assert s.cache.frames().tolist() == [3, 0, 3]
    assert torch.equal(s.last_tokens[1], tiny.tokenize(x[1:2, :, 1:2]).flatten()) and s.last_action[1] == 8
    assert s.steps.tolist() == [6, 0, 6]
    s.step(torch.tensor([0, 1, 2]))
    assert s.cache.frames().tolist() == [3, 1, 3]


def test_presets_sizes():
    small = create_genie_small(num_frames=16, image_size=64)
    n = small.num_parameters()["total"]
    assert 40e6 < n < 60e6, n
    large = create_genie_large(device="meta")
    assert all(p.device.type == "meta" for p in large.parameters())
    n = large.num_parameters()["total"]
    assert 10e9 < n < 12e9, n


# ---------------------------------------------------------------------------------------------- config
def test_config_validation_names_field(tmp_path):
    with pytest.raises(ConfigError, match="dynamics_dim"):
        GenieConfig(dynamics_dim=10_000_000)
    with pytest.raises(ConfigError, match="dynamics_depth"):
        GenieConfig(dynamics_depth=-1)
    with pytest.raises(ConfigError, match="tokenizer_patch_size"):
        GenieConfig(tokenizer_patch_size=3)
    with pytest.raises(ConfigError, match="dynamics_num_heads"):
        GenieConfig(dynamics_dim=100, dynamics_num_heads=3)
    with pytest.raises(ConfigError, match="learning_rate"):
        GenieConfig(learning_rate="fast")
    with pytest.raises(ConfigError, match="outcome_inside_fraction.*shares of one batch"):
        GenieConfig(outcome_end_fraction=0.5, outcome_inside_fraction=0.6)
    with pytest.raises(ConfigError, match="outcome_inside must be an integer"):
        GenieConfig(outcome_inside=0.5)
    with pytest.raises(ConfigError, match="unknown config field.*dynamcis_dim"):
        GenieConfig.from_dict({"dynamcis_dim": 3})
    cfg = tiny_config(maskgit_steps=7)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert GenieConfig.from_yaml(tmp_path / "c.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        GenieConfig.from_yaml(tmp_path / "bad.yaml")


# ---------------------------------------------------------------------------------------------- dynamics
def _tokens_actions(model, b=2, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    tok = torch.randint(0, cfg.tokenizer_vocab_size, (b, t, cfg.tokens_per_frame), generator=g)
    acts = torch.randint(0, cfg.action_vocab_size, (b, t - 1), generator=g)
    return tok, acts


def _random_time_bias(model: Genie, seed: int = 0) -> Genie:
    """Time biases as a trained model has them (about +-1): at zero, temporal attention treats the cached
    frames as an unordered set and a fault in their order or distances stays invisible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.dynamics.blocks:
            blk.time_bias.copy_(torch.randn(blk.time_bias.shape, generator=g))
    return model


@torch.no_grad()
def test_cached_step_equals_full_recompute(tiny):
    dyn = _random_time_bias(tiny).dynamics
    t = 2 * tiny.config.context_frames + 1  # the ring buffer wraps around twice and evicts frames
    tok, acts = _tokens_actions(tiny, t=t)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, t - 1, tok.shape[2], generator=g) < 0.6
    full = dyn(tok, acts, mask)  # (B, T-1, n, V): frames 1..T-1, past frames clean
    cache = dyn.new_cache(2)
    null = torch.full((2,), dyn.null_action, dtype=torch.long)
    dyn.step(cache, tok[:, 0], null, commit=True)
    for i in range(1, t):
        inp = torch.where(mask[:, i - 1], dyn.mask_id, tok[:, i])
        cached = dyn.step(cache, inp, acts[:, i - 1])
        torch.testing.assert_close(cached, full[:, i - 1], atol=2e-5, rtol=1e-4)
        dyn.step(cache, tok[:, i], acts[:, i - 1], commit=True)


@torch.no_grad()
@pytest.mark.parametrize("rows", [None, torch.tensor([1])])
def test_commit_writes_the_keys_and_values_of_the_full_pass(tiny, rows):
    """The commit pass skips what the last block computes after its keys and values; the cache it leaves
    must equal what the full pass (`forward_step` in every block) would have written."""
    dyn = tiny.dynamics
    tok, acts = _tokens_actions(tiny, t=3)
    cache = dyn.new_cache(2)
    dyn.step(cache, tok[:, 0], torch.full((2,), dyn.null_action, dtype=torch.long), commit=True)
    dyn.step(cache, tok[:, 1], acts[:, 0], commit=True)
    sel = slice(None) if rows is None else rows
    # the reference: every block's full step against the cache as it is before the commit
    x, a = dyn._embed(tok[sel, 2][:, None], acts[sel, 1][:, None])
    want = []
    for i, blk in enumerate(dyn.blocks):
        x, k, v = blk.forward_step(x, a, cache.k[i][sel], cache.v[i][sel], dyn._step_bias(cache, rows, blk))
        want.append((k, v))
    slot = cache.ptr[sel].clone()
    dyn.step(cache, tok[sel, 2], acts[sel, 1], rows=rows, commit=True)
    idx = torch.arange(2)[sel]
    for i, (k, v) in enumerate(want):
        torch.testing.assert_close(cache.k[i][idx, :, :, slot], k, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cache.v[i][idx, :, :, slot], v, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_action_t_conditions_frame_t_plus_1_only(tiny):
    """a_t (transition t -> t+1) must change the prediction of frame t+1 and later, never frame t."""
    dyn = tiny.dynamics
    tok, acts = _tokens_actions(tiny, t=4)
    mask = torch.ones(2, 3, tok.shape[2], dtype=torch.bool)
    base = dyn(tok, acts, mask)
    changed = acts.clone()
    changed[:, 1] = (changed[:, 1] + 1) % tiny.config.action_vocab_size  # a_1: frame 1 -> frame 2
    out = dyn(tok, changed, mask)
    # logits index i is frame i+1
    torch.testing.assert_close(out[:, 0], base[:, 0])  # frame 1 does not see a_1
    assert not torch.allclose(out[:, 1], base[:, 1])  # frame 2 does


@torch.no_grad()
def test_temporal_attention_is_causal(tiny):
    """A frame's prediction sees neither later frames nor its own hidden tokens (through the clean
    stream, which holds them: a target leak)."""
    dyn = tiny.dynamics
    tok, acts = _tokens_actions(tiny, t=4)
    mask = torch.ones(2, 3, tok.shape[2], dtype=torch.bool)
    base = dyn(tok, acts, mask)
    future = tok.clone()
    future[:, 3] = (future[:, 3] + 1) % tiny.config.tokenizer_vocab_size
    out = dyn(future, acts, mask)
    torch.testing.assert_close(out[:, :2], base[:, :2])  # frames 1, 2 never see frame 3
    torch.testing.assert_close(out[:, 2], base[:, 2])  # frame 3 never sees its own (masked) tokens
    # partly masked: changing frame 2's hidden tokens leaves its prediction alone
    part = torch.rand(2, 3, tok.shape[2], generator=torch.Generator().manual_seed(1)) < 0.5
    base = dyn(tok, acts, part)
    hidden = tok.clone()
    hidden[:, 2] = torch.where(part[:, 1], (tok[:, 2] + 1) % tiny.config.tokenizer_vocab_size, tok[:, 2])
    torch.testing.assert_close(dyn(hidden, acts, part)[:, 1], base[:, 1])


def _reference_tokens(model: Genie, clip_tokens: torch.Tensor, actions: torch.Tensor, t0: int) -> torch.Tensor:
    """Greedy one-pass tokens of frames t0.. from the training forward (which aligns a_t with frame t+1)
    over the whole clip, every generated frame fully masked."""
    b, t, n = clip_tokens.shape
    mask = torch.zeros(b, t - 1, n, dtype=torch.bool)
    mask[:, t0 - 1:] = True
    return model.dynamics(clip_tokens, actions, mask)[:, t0 - 1:].argmax(-1)


@torch.no_grad()
@pytest.mark.parametrize("t0", [1, 2, 3])
def test_session_step_conditions_frame_t_plus_1_on_action_t(t0):
    """Play (prompt priming with inferred actions, cached steps, a row reset) generates what the training
    forward predicts for the same clip: the action passed to step k conditions the frame it returns."""
    model = _random_time_bias(tiny_model())
    cfg, steps = model.config, 6  # past the window of 4: frames are evicted
    prompt = frames(t=t0, seed=1)
    acts = torch.randint(0, cfg.action_vocab_size, (2, 2 * steps), generator=torch.Generator().manual_seed(2))
    s = model.start(prompt, maskgit_steps=1, temperature=0.0)
    gen = torch.stack([(s.step(acts[:, k]), s.last_tokens)[1] for k in range(steps)], 1)

    def check(p, gen, user_acts, rows):
        ptok = model.tokenize(p).flatten(2)
        pact = model.infer_actions(p) if t0 > 1 else torch.zeros(len(rows), 0, dtype=torch.long)
        clip = torch.cat([ptok, gen[rows]], 1)
        ref = _reference_tokens(model, clip, torch.cat([pact, user_acts[rows]], 1), t0)
        assert torch.equal(gen[rows], ref)

    check(prompt, gen, acts[:, :steps], [0, 1])
    new_prompt = frames(b=1, t=t0, seed=3)
    s.reset_rows(torch.tensor([1]), new_prompt)
    gen2 = torch.stack([(s.step(acts[:, steps + k]), s.last_tokens)[1] for k in range(steps)], 1)
    check(new_prompt, gen2, acts[:, steps:], [1])


@torch.no_grad()
@pytest.mark.parametrize("t0", [1, 3])
def test_generate_action_i_changes_frames_from_t0_plus_i(t0):
    model = _random_time_bias(tiny_model())
    prompt = frames(t=t0, seed=1)
    acts = torch.randint(0, model.config.action_vocab_size, (2, 4), generator=torch.Generator().manual_seed(2))
    base = model.generate(prompt, t0 + 4, acts, maskgit_steps=1, temperature=0.0)
    changed = acts.clone()
    changed[:, 1] = (changed[:, 1] + 1) % model.config.action_vocab_size
    out = model.generate(prompt, t0 + 4, changed, maskgit_steps=1, temperature=0.0)
    torch.testing.assert_close(out[:, :, : t0 + 1], base[:, :, : t0 + 1])  # up to the frame before
    assert not torch.allclose(out[:, :, t0 + 1], base[:, :, t0 + 1])  # actions[:, 1] makes frame t0+1


def test_generate_is_seeded(tiny):
    x = frames()[:, :, 0]
    a = tiny.generate(x, 4, generator=torch.Generator().manual_seed(5))
    b = tiny.generate(x, 4, generator=torch.Generator().manual_seed(5))
    c = tiny.generate(x, 4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_maskgit_schedules_reach_zero():
    for kind in ("cosine", "linear", "exp"):
        assert mask_schedule(0.0, kind) == pytest.approx(1.0)
        assert mask_schedule(1.0, kind) == pytest.approx(0.0, abs=1e-9)


@torch.no_grad()
def test_bf16_inference_close_to_fp32(tiny):
    x = frames()
    tok = tiny.tokenize(x)
    dyn = tiny.dynamics
    acts = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3, 16, dtype=torch.bool)
    ref = dyn(tok.flatten(2), acts, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dyn(tok.flatten(2), acts, mask).float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()
    tiny.autocast_dtype = torch.bfloat16
    rec_low = tiny.detokenize(tok)
    tiny.autocast_dtype = None
    assert (rec_low - tiny.detokenize(tok)).abs().max() < 0.05


@pytest.mark.parametrize("context", [0, 1])
def test_tokens_do_not_depend_on_the_number_format(context):
    """Frames code into the same tokens under bf16 autocast as in float32: with many codes close together,
    a bf16 distance search would pick another code for many patches, and the dynamics' prompt and the
    reward heads' inputs would change with the machine."""
    model = tiny_model(tokenizer_vocab_size=4096, tokenizer_context=context)
    x = frames(t=3)
    with torch.no_grad():  # a book of codes packed as closely around the frames' latents as a trained one
        tok = model.tokenizer
        prev = tok._previous(x, None) if context else None
        z = tok._encode_latents(x, prev).reshape(-1, tok.quantizer.dim)
        g = torch.Generator().manual_seed(0)
        pick = torch.randint(0, z.shape[0], (4096,), generator=g)
        tok.quantizer.embed.copy_(z[pick] + 0.02 * z.std() * torch.randn(4096, z.shape[1], generator=g))
    ref, ref_forced = model.tokenize(x), model.tokenizer.encode_teacher_forced(x)
    model.autocast_dtype = torch.bfloat16
    assert torch.equal(model.tokenize(x), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.tokenizer.encode_teacher_forced(x), ref_forced)
        assert torch.equal(model.tokenizer.encode(x), ref)
        # the search alone, and the quantizer's own pass (the tokenizer stage trains through it), under autocast
        assert torch.equal(tok.quantizer.nearest(z), ref_forced.reshape(-1))
        tok.quantizer.eval()  # no codebook update: the same book for the comparison
        assert torch.equal(tok.quantizer(z).indices, ref_forced.reshape(-1))


# ---------------------------------------------------------------------------------------------- learning
def _overfit(module_loss, params, steps=60, lr=3e-3):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = module_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_each_model_learns_a_tiny_batch():
    torch.manual_seed(0)
    model = Genie(tiny_config())
    x = blocky(b=2, t=4, seed=1)
    tk = _overfit(lambda: model.tokenizer(x).loss, model.tokenizer.parameters())
    assert tk[-1] < 0.5 * tk[0], tk
    la = _overfit(lambda: model.latent_actions(x).recon_loss, model.latent_actions.parameters())
    assert la[-1] < 0.5 * la[0], la
    tok, acts = _tokens_actions(model, t=4)
    dy = _overfit(lambda: model.dynamics.loss(tok, acts)[0], model.dynamics.parameters())
    assert dy[-1] < 0.5 * dy[0], dy


def test_tokenizer_round_trip_after_training():
    """decode(encode(x)) approaches x once trained (PSNR rises well above the untrained model's)."""
    from training.metrics import psnr

    torch.manual_seed(0)
    model = Genie(tiny_config(tokenizer_vocab_size=64))
    x = blocky(b=2, t=2, seed=2)
    before = float(psnr(model.detokenize(model.tokenize(x)), x).mean())
    model.train()
    _overfit(lambda: model.tokenizer(x).loss, model.tokenizer.parameters(), steps=150)
    model.eval()
    after = float(psnr(model.detokenize(model.tokenize(x)), x).mean())
    assert after > before + 3, (before, after)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.tokenize(torch.rand(2, 3, 16, 16)), "frames must have shape"),
        (lambda m: m.tokenize(torch.rand(1, 3, 2, 32, 32)), "frames must have shape"),
        (lambda m: m.tokenize(torch.rand(1, 3, 2, 16, 16) * 255), r"frames values must be in \[0, 1\]"),
        (lambda m: m.tokenize((torch.rand(1, 3, 2, 16, 16) * 255).byte()), "divide uint8"),
        (lambda m: m.tokenize(torch.full((1, 3, 2, 16, 16), float("nan"))), "NaN"),
        (lambda m: m.tokenize([1, 2]), "frames must be a torch.Tensor"),
        (lambda m: m.detokenize(torch.full((1, 1, 4, 4), 999)), r"tokens values must be in \[0, 32\)"),
        (lambda m: m.detokenize(torch.zeros(1, 1, 5, 5, dtype=torch.long)), "tokens must have shape"),
        (lambda m: m.detokenize(torch.zeros(1, 1, 4, 4)), "tokens must be an integer tensor"),
        (lambda m: m.infer_actions(torch.rand(1, 3, 1, 16, 16)), "at least 2 frames"),
        (lambda m: m.play(torch.rand(1, 3, 16, 16), torch.tensor([8])),
         r"action values must be latent actions in \[0, 8\)"),
        (lambda m: m.play(torch.rand(1, 3, 16, 16), torch.tensor([-1])), "latent actions"),
        (lambda m: m.play(torch.rand(1, 3, 16, 16), torch.tensor([0.5])), "integer"),
        (lambda m: m.play(torch.rand(2, 3, 16, 16), torch.tensor([1])), r"action must have shape \(2\)"),
        (lambda m: m.generate(torch.rand(1, 3, 16, 16), 4, actions=torch.zeros(1, 2, dtype=torch.long)),
         r"actions must have shape \(1, 3\)"),
        (lambda m: m.generate(torch.rand(1, 3, 2, 16, 16), 1), "num_frames must be an int >="),
        # the output alone would need terabytes: refused before any work, pointing to sessions
        (lambda m: m.generate(torch.rand(1, 3, 16, 16), 10**9), r"would return .* GiB .*model.start\(prompt\)"),
        (lambda m: m.start(torch.rand(1, 3, 16, 16), maskgit_steps=0), "maskgit_steps"),
    ],
)
def test_bad_inputs_name_the_argument(tiny, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(tiny)


def test_tiny_model_helper_is_seeded():
    a, b = tiny_model(seed=1), tiny_model(seed=1)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@torch.no_grad()
def test_shorter_context_window_attends_to_fewer_frames(tiny):
    """context_frames=1 attends to nothing but the frame itself: a step then ignores the cached past, and
    context_frames=2 gives other logits than the full window."""
    dyn = tiny.dynamics
    tok, acts = _tokens_actions(tiny, t=4)
    null = torch.full((2,), dyn.null_action, dtype=torch.long)
    masked = torch.full_like(tok[:, 3], dyn.mask_id)
    logits = {}
    for window in (1, 2, None):
        cache = dyn.new_cache(2, window=window)
        for i in range(3):
            dyn.step(cache, tok[:, i], null if i == 0 else acts[:, i - 1], commit=True)
        logits[window] = dyn.step(cache, masked, acts[:, 2])
    torch.testing.assert_close(logits[1], dyn.step(dyn.new_cache(2, window=1), masked, acts[:, 2]))
    assert not torch.allclose(logits[2], logits[None])
    with pytest.raises(ValueError, match="context_frames must be in"):
        tiny.start(torch.rand(1, 3, 16, 16), context_frames=5)


def test_lam_focus_weights_what_camera_motion_leaves_unexplained():
    import dataclasses

    torch.manual_seed(0)
    x = blocky(b=2, t=3, seed=2)
    plain = Genie(tiny_config()).latent_actions
    focused = Genie(dataclasses.replace(tiny_config(), lam_focus=3.0)).latent_actions
    focused.load_state_dict(plain.state_dict())
    plain.eval(), focused.eval()  # no codebook updates between the two calls
    a, b = plain(x), focused(x)
    assert torch.equal(a.prediction, b.prediction)  # same model: only the loss differs
    focused.train()
    assert not torch.isclose(a.recon_loss, b.recon_loss)  # the errors are weighted differently
    lf = _overfit(lambda: focused(x).recon_loss, focused.parameters())
    assert lf[-1] < 0.5 * lf[0], lf


# ---------------------------------------------------------------------------------------------- masking
def test_training_masks_cover_every_rate_maskgit_samples_at():
    """The masked share of a training frame reaches down to one token and up to all of them, with as
    many frames below half masked as cosine sampling has steps there (a third)."""
    dyn = tiny_model().dynamics
    n = dyn.num_tokens
    share = dyn.training_mask(400, 8, generator=torch.Generator().manual_seed(0)).float().mean(-1).flatten()
    assert share.min() <= 2 / n
    assert share.max() == 1.0
    assert 0.25 < (share < 0.5).float().mean() < 0.42


@torch.no_grad()
@pytest.mark.parametrize("steps", [2, 8, 25])
def test_every_maskgit_step_reveals_a_token(tiny, steps):
    dyn = tiny.dynamics
    n = dyn.num_tokens
    cache = dyn.new_cache(2)
    dyn.step(cache, torch.zeros(2, n, dtype=torch.long), torch.full((2,), dyn.null_action), commit=True)
    seen = []
    step = dyn.step

    def counting(cache, tokens, action, **kwargs):
        seen.append(int((tokens == dyn.mask_id).sum(1).max()))
        return step(cache, tokens, action, **kwargs)

    dyn.step = counting
    out = dyn.sample_frame(cache, torch.zeros(2, dtype=torch.long), steps,
                           generator=torch.Generator().manual_seed(0))
    assert (out != dyn.mask_id).all()
    assert seen[0] == n and all(a > b for a, b in zip(seen, seen[1:]))  # each pass reveals something
    assert len(seen) == min(steps, n)


@pytest.mark.parametrize("vocab", [40, 256])  # one cumulative sum; blocks of 64
@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.5, 0), (2.0, 10)])
def test_sampled_tokens_follow_the_tempered_distribution(vocab, temperature, top_k):
    """MaskGIT's draws: each token as often as softmax(logits / temperature) says (among the top_k where
    set, never outside them), with the unscaled log-probability beside it, the same under the same seed."""
    torch.manual_seed(vocab)
    logits = torch.randn(3, vocab) * 2
    n = 200_000
    many = logits[None].expand(n, 3, vocab).contiguous()
    tok, logp = sample_logits(many, temperature, top_k, torch.Generator().manual_seed(1))
    scores = logits / temperature
    if top_k:
        scores = scores.masked_fill(scores < scores.topk(top_k, -1).values[..., -1:], float("-inf"))
    p = torch.softmax(scores, -1)
    freq = torch.stack([torch.bincount(tok[:, i], minlength=vocab).double() / n for i in range(3)])
    assert float(freq[p == 0].sum()) == 0.0
    assert float((freq - p).abs().max()) < 4 * float((p * (1 - p) / n).sqrt().max()) + 1e-4
    want = torch.log_softmax(logits, -1).expand(n, 3, vocab).gather(-1, tok[..., None])[..., 0]
    assert torch.allclose(logp, want, atol=1e-5)
    again, _ = sample_logits(many, temperature, top_k, torch.Generator().manual_seed(1))
    assert torch.equal(tok, again)
    assert torch.equal(sample_logits(many[:5], 0.0, 0, None)[0], logits.argmax(-1).expand(5, 3))


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_quantizer_returns_the_code_its_index_names(ema_decay):
    """In training the quantized vector is the code the index was chosen against, even when this step
    restarts that code (all codes start dead, so the first step restarts every one)."""
    from genie_env.models.quantizer import VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, ema_decay=ema_decay).train()
    before = vq.embed.detach().clone()
    z = torch.randn(32, 4)
    out = vq(z)
    assert not torch.equal(vq.embed.detach(), before)  # the step did update/restart codes
    torch.testing.assert_close(out.quantized, before[out.indices])
    torch.testing.assert_close(out.commitment_loss, ((z - before[out.indices]) ** 2).mean())


# ---------------------------------------------------------------------------------------------- context tokenizer
def test_tokenizer_without_context_is_unchanged():
    """tokenizer_context=0 keeps the per-frame tokenizer: same parameters, same outputs for the same weights."""
    from einops import rearrange

    from genie_env.models.blocks import ConvDecoder

    tok = tiny_model().tokenizer
    assert isinstance(tok.decoder, ConvDecoder) and not hasattr(tok, "context_encoder")
    assert tok.encoder.net[1].in_channels == 3 * 4
    x = frames(t=3)
    z = rearrange(tok.encoder(rearrange(x, "b c t H W -> (b t) c H W") * 2 - 1), "(b t) d h w -> b t h w d", b=2)
    want_tokens = tok.quantizer.nearest(z)
    assert torch.equal(tok.encode(x), want_tokens)
    codes = rearrange(tok.quantizer.codes(want_tokens), "b t h w d -> (b t) d h w")
    want = rearrange(((tok.decoder(codes) + 1) / 2).clamp(0, 1), "(b t) c H W -> b c t H W", b=2)
    assert torch.equal(tok.decode(want_tokens), want)
    assert torch.equal(tok.decode(want_tokens, context=torch.rand(2, 3, 16, 16)), want)  # no context to read
    # a state dict of the per-frame tokenizer loads strictly
    tiny_model(seed=1).tokenizer.load_state_dict(tok.state_dict(), strict=True)


def test_shipped_weights_load_with_context_default():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "weights"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("no shipped weights")
    model = Genie.from_pretrained(folder)
    assert model.config.tokenizer_context == 0


def test_context_tokenizer_shapes_and_gradients():
    torch.manual_seed(0)
    model = Genie(tiny_config(tokenizer_context=1))
    tok = model.tokenizer
    x = frames(t=4)
    out = tok(x)
    assert out.reconstruction.shape == (2, 3, 3, 16, 16) and out.tokens.shape == (2, 3, 4, 4)
    out.loss.backward()
    grads = [p.grad for p in tok.context_encoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    tok.eval()
    tokens = model.tokenize(x)
    assert tokens.shape == (2, 4, 4, 4)
    rec = model.detokenize(tokens)
    assert rec.shape == x.shape and float(rec.min()) >= 0 and float(rec.max()) <= 1
    with torch.no_grad():
        assert tok(x[:, :, :1]).reconstruction.shape == (2, 3, 1, 16, 16)  # a lone frame: no context
        # teacher forcing decodes every frame against the frame given before it
        prev = tok._previous(x, x[:, :, 0])
        assert tok.decode_given(tokens, prev).shape == x.shape


def test_context_tokenizer_decode_reads_the_context():
    """decode's frame 0 is the given context frame's continuation, later frames the previous decoded frame's;
    a decoder that ignored the frame before would decode the same frames whatever the context."""
    torch.manual_seed(0)
    tok = Genie(tiny_config(tokenizer_context=1)).tokenizer.eval()
    x = frames(t=3)
    tokens = tok.encode(x)
    c1, c2 = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        a, b = tok.decode(tokens, context=c1), tok.decode(tokens, context=c2)
        assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-3
        assert torch.allclose(a[:, :, :1], tok.decode_given(tokens[:, :1], c1[:, :, None]), atol=1e-6)
        assert torch.allclose(a[:, :, 1:2], tok.decode_given(tokens[:, 1:2], a[:, :, :1]), atol=1e-6)
        grey = tok.decode(tokens)
        assert torch.allclose(grey[:, :, :1], tok.decode_given(tokens[:, :1], torch.full_like(c1, 0.5)[:, :, None]),
                              atol=1e-6)
        # the encoder codes the change: same frame, different frame before, different latents
        assert not torch.equal(tok._encode_latents(x[:, :, 1:2], c1[:, :, None]),
                               tok._encode_latents(x[:, :, 1:2], c2[:, :, None]))


def test_context_tokenizer_config_is_validated():
    with pytest.raises(ConfigError, match="tokenizer_context"):
        GenieConfig(tokenizer_context=2)


def test_context_tokenizer_validation_metrics():
    """Frame 1 decodes against the real frame 0 both ways, so its autoregressive and teacher-forced PSNR agree."""
    from training.evaluate import context_tokenizer_metrics, tokenizer_metrics
    from training.metrics import psnr

    torch.manual_seed(0)
    model = Genie(tiny_config(tokenizer_context=1, bf16=False)).eval()
    x = frames(b=3, t=6)
    res = tokenizer_metrics(model, x, bs=2)
    assert {"tokenizer_psnr_tf", "tokenizer_psnr_ar@1", "tokenizer_psnr_ar@4", "tokens_changed"} <= set(res)
    assert "tokenizer_psnr_ar@8" not in res
    assert res["_decoded"].shape == x.shape and res["_tokens"].shape == (3, 6, 4, 4)
    tok = model.tokenizer
    with torch.no_grad():
        tf1 = psnr(tok.decode_given(tok.encode_teacher_forced(x)[:, 1:2], x[:, :, :1]), x[:, :, 1:2]).mean()
    assert abs(res["tokenizer_psnr_ar@1"] - float(tf1)) < 1e-4
    # the headline is what play decodes: closed loop; "_tokens" are Genie.tokenize's
    assert res["tokenizer_psnr"] == res["tokenizer_psnr_cl"] and torch.equal(res["_tokens"], model.tokenize(x))
    assert 0 <= res["tokens_changed"] <= 1
    assert context_tokenizer_metrics(model, x)["tokenizer_psnr"] == pytest.approx(res["tokenizer_psnr_cl"], abs=1e-4)


def test_context_tokenizer_closed_loop_decodes_its_own_tokens():
    """Closed-loop codes decode, frame by frame against the previous decoded frame, to what encoding saw."""
    torch.manual_seed(0)
    tok = Genie(tiny_config(tokenizer_context=1)).tokenizer.eval()
    x, c = frames(t=4), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        tokens, decoded = tok.encode_closed_loop(x, context=c)
        assert tokens.shape == (2, 4, 4, 4) and decoded.shape == x.shape
        assert torch.allclose(tok.decode(tokens, context=c), decoded, atol=1e-6)
        assert torch.equal(tokens[:, :1], tok.encode(x[:, :, :1], context=c))  # frame 0: the real context
    plain = tiny_model().tokenizer
    tokens, decoded = plain.encode_closed_loop(x)
    assert torch.equal(tokens, plain.encode(x)) and torch.equal(decoded, plain.decode(tokens))


def test_context_tokenizer_trains_closed_loop_on_longer_clips():
    """With 3+ frames the training forward codes and decodes as `encode_closed_loop` does (frame 1 against
    the real frame 0, later frames against the previous decoded frame), so the decoder trains on its own
    outputs; with 2 frames it stays teacher-forced."""
    torch.manual_seed(0)
    tok = Genie(tiny_config(tokenizer_context=1, bf16=False)).tokenizer.eval()
    x = frames(t=4)
    with torch.no_grad():
        out = tok(x)
        tokens, decoded = tok.encode_closed_loop(x[:, :, 1:], context=x[:, :, 0])
        assert torch.equal(out.tokens, tokens)
        assert torch.allclose(out.reconstruction, decoded, atol=1e-5)
        pair = tok(x[:, :, :2])
        assert torch.equal(pair.tokens, tok.encode(x[:, :, 1:2], context=x[:, :, 0]))
    tok.train()
    loss = tok(x).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in tok.decoder.parameters())


def test_context_tokenize_round_trip_is_closed_loop():
    """Genie.tokenize codes a context model's frames closed loop, so detokenize decodes exactly what encoding
    saw; teacher-forced tokens (each frame against the real frame before) decoded that way would drift."""
    torch.manual_seed(0)
    model = Genie(tiny_config(tokenizer_context=1, bf16=False)).eval()
    x = frames(t=5)
    tokens = model.tokenize(x)
    _, decoded = model.tokenizer.encode_closed_loop(x)
    assert torch.allclose(model.detokenize(tokens), decoded, atol=1e-5)
    assert not torch.equal(tokens[:, 1:], model.tokenizer.encode_teacher_forced(x)[:, 1:])


# ---------------------------------------------------------------------------------------------- carrying
@pytest.mark.parametrize("margin", [0, 1])
def test_carry_shows_unchanged_tokens_patches_as_they_were_shown(monkeypatch, margin):
    """With carry, a step that changes one token decodes only the patches within ``carry_margin`` of it;
    every other patch is the frame shown before, pixel for pixel, step after step. Without carry the step
    shows the decode of all its tokens."""
    model = tiny_model(carry_margin=margin)
    g, size, vocab = model.config.token_grid, model.config.image_size, model.config.tokenizer_vocab_size
    p = size // g
    prompt = frames(b=2, t=1)[:, :, 0]
    start = model.tokenize(prompt[:, :, None])[:, 0].flatten(1)  # (2, n)
    changed = start.clone()
    changed[0, 1 * g + 2] = (changed[0, 1 * g + 2] + 1) % vocab  # row 0: token (1, 2); row 1: nothing
    plan = iter([changed, changed])  # the second step changes nothing more

    def sample_frame(cache, action, *args, **kwargs):
        tokens = next(plan).clone()
        return tokens, torch.zeros(tokens.shape[0], tokens.shape[1], model.config.dynamics_dim)

    monkeypatch.setattr(model.dynamics, "sample_frame", sample_frame)
    decoded = model.detokenize(changed.view(2, 1, g, g))[:, :, 0]
    plain = model.start(prompt, carry=False).step(torch.tensor([0, 0]))
    assert torch.allclose(plain, decoded)

    plan = iter([changed, changed])
    session = model.start(prompt, carry=True)
    first = session.step(torch.tensor([0, 0]))
    rows = slice(max(1 - margin, 0) * p, (1 + margin + 1) * p)
    cols = slice(max(2 - margin, 0) * p, (2 + margin + 1) * p)
    want = prompt.clone()
    want[0, :, rows, cols] = decoded[0, :, rows, cols]
    assert torch.equal(first, want)
    assert not torch.equal(first[0], prompt[0]) and torch.equal(first[1], prompt[1])
    assert torch.equal(session.step(torch.tensor([0, 0])), first)  # nothing changed: nothing re-drawn


def test_carry_setting_defaults_to_the_config_and_rejects_non_bools():
    assert GenieConfig().carry_unchanged is True
    model = tiny_model(carry_unchanged=False)
    assert model.start(frames(b=1, t=1)[:, :, 0]).carry is False
    assert model.start(frames(b=1, t=1)[:, :, 0], carry=True).carry is True
    with pytest.raises(TypeError, match="carry must be True, False or None"):
        model.start(frames(b=1, t=1)[:, :, 0], carry="yes")
    with pytest.raises(ConfigError, match="carry_margin"):
        tiny_config(carry_margin=-1)
    context = tiny_model(tokenizer_context=1)  # its tokens code changes, not patches: nothing to carry
    assert context.start(frames(b=1, t=1)[:, :, 0]).carry is False
    with pytest.raises(ValueError, match="per-frame tokenizer"):
        context.start(frames(b=1, t=1)[:, :, 0], carry=True)


# ---------------------------------------------------------------------------------------------- action gain
def test_action_gain_samples_as_embeddings_moved_from_their_mean():
    """Sampling with ``action_gain`` g is sampling from the model whose latent-action embeddings were moved
    to mean + g * (e - mean), the null action's left alone; training reads the embeddings as they are."""
    gain = 1.7
    model = tiny_model(action_gain=gain, bf16=False)
    edited = tiny_model(bf16=False)
    edited.load_state_dict(model.state_dict())
    with torch.no_grad():
        w = edited.dynamics.action_emb.weight
        n = edited.dynamics.null_action
        mean = w[:n].mean(0)
        w[:n] = mean + gain * (w[:n] - mean)
    prompt = frames(b=2, t=2)
    actions = torch.tensor([[1, 0, 3], [2, 2, 0]])

    def rollout(m):
        return m.generate(prompt, 5, actions=actions, generator=torch.Generator().manual_seed(3))

    assert torch.equal(rollout(model), rollout(edited))
    plain = tiny_model(bf16=False)
    plain.load_state_dict(model.state_dict())
    assert not torch.equal(rollout(model), rollout(plain))  # the gain changes what is sampled
    tokens, acts = _tokens_actions(model)
    g = torch.Generator().manual_seed(0)
    loss = model.dynamics.loss(tokens, acts, generator=g)[0]
    assert torch.equal(loss, plain.dynamics.loss(tokens, acts, generator=torch.Generator().manual_seed(0))[0])
    with pytest.raises(ConfigError, match="action_gain"):
        tiny_config(action_gain=-0.5)
