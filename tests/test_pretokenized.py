"""Pre-tokenised training data: a tokens file gives the dynamics stage exactly the batches, loss and gradient
that the videos give; a frames file gives any stage the videos' frames; a file from other weights is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_training import losses, run, tiny_train_config, train

from training.data import ClipSampler, FrameCache, to_tensor
from training.pretokenized import (
    FrameFile,
    PretokenizedError,
    TokenClipSampler,
    TokenFile,
    open_training_data,
    to_batch,
    write_frames_file,
    write_tokens_file,
)
from training.train import StageModule
from training.video import write_video


def noise_videos(folder: Path, lengths=(10, 11, 13, 9), size: int = 16, seed: int = 0) -> tuple[Path, list]:
    """Random-pixel videos (so a tiny random tokenizer gives many tokens), with outcomes beside each."""
    rng = np.random.default_rng(seed)
    vdir = folder / "videos"
    vdir.mkdir(parents=True)
    vids = []
    for i, n in enumerate(lengths):
        f = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        write_video(vdir / f"video_{i:03d}.mp4", f)
        vids.append(f)
        meta = {"actions": [0] * (n - 1), "rewards": [float(j == n - 2) * (i + 1) for j in range(n - 1)],
                "terminated": [j == n - 2 for j in range(n - 1)],
                "end": None if i == 0 else {"action": i, "reward": 10.0, "terminated": i % 2 == 1,
                                             "truncated": i % 2 == 0}}
        if i != 3:  # one video without outcomes
            (vdir / f"video_{i:03d}.json").write_text(json.dumps(meta))
    return folder, vids


def spread_model(vids: list, seed: int = 0):
    """A tiny random model whose codebooks are spread over these videos' encoder outputs: a random
    codebook maps every frame to a handful of tokens and every transition to one action, which would let
    a wrong clip start or a wrong action go unnoticed."""
    m = tiny_model(seed)
    x = to_tensor(np.concatenate(vids)[None])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = m.tokenizer._encode_latents(x).reshape(-1, m.config.tokenizer_latent_dim)
        m.tokenizer.quantizer.embed.copy_(z[torch.randperm(len(z), generator=g)[: m.config.tokenizer_vocab_size]])
        zl, _ = m.latent_actions._encode(to_tensor(np.concatenate(vids)[None]))
        m.latent_actions.quantizer.embed.copy_(zl[torch.randperm(len(zl), generator=g)[: m.config.action_vocab_size]])
    return m


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretok")
    data, vids = noise_videos(tmp / "data")
    model = spread_model(vids)
    model.save_pretrained(tmp / "release")
    run("-m", "training.pretokenize", "--checkpoint", str(tmp / "release"), "--data", str(data),
        "--out", str(tmp / "d.tokens.safetensors"), "--frames-out", str(tmp / "d.frames.safetensors"),
        "--threads", "1", "--batch", "7")
    return tmp, data, vids, model


def test_tokens_file_gives_the_videos_batches(made):
    tmp, data, vids, model = made
    tf = TokenFile(tmp / "d.tokens.safetensors")
    acts = tf.arrays["actions"]
    # the fixture can see the faults it is for: varied tokens and actions, and clip-start actions that
    # differ from mid-clip ones
    assert np.unique(tf.arrays["tokens"]).size > 20 and np.unique(acts[acts != 255]).size >= 4
    assert (acts[:, 0] != acts[:, 1]).sum() >= 3
    cache = FrameCache(data, 16)
    for clip_frames, seed in ((4, 3), (2, 5), (9, 1)):
        sv, st = ClipSampler(cache, clip_frames, seed=seed), TokenClipSampler(tf, clip_frames, seed=seed)
        for _ in range(4):
            x = to_tensor(sv.sample(5))
            tok, act = st.sample(5)
            with torch.no_grad():
                assert np.array_equal(model.tokenizer.encode(x).numpy(), tok)
                assert np.array_equal(model.latent_actions.infer(x).numpy(), act)


def test_tokens_file_gives_the_videos_loss_and_gradient(made):
    tmp, data, vids, model = made
    model.train()
    module = StageModule(model, "dynamics", model.config, cotrain_lam=False)
    cache, tf = FrameCache(data, 16), TokenFile(tmp / "d.tokens.safetensors")
    out = []
    for sampler in (ClipSampler(cache, 4, seed=2), TokenClipSampler(tf, 4, seed=2)):
        torch.manual_seed(0)  # the mask draws
        module.zero_grad()
        loss, _ = module(**to_batch(sampler.sample(3), torch.device("cpu")))
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in module.trained_parameters()]))
    assert torch.equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        assert torch.allclose(a, b, atol=1e-7)


def test_outcomes_and_boundaries_are_stored(made):
    tmp, data, vids, _ = made
    for f in (TokenFile(tmp / "d.tokens.safetensors"), FrameFile(tmp / "d.frames.safetensors")):
        a = f.arrays
        assert list(a["video_frames"]) == [len(v) for v in vids]
        assert list(a["video_offsets"]) == [0, 10, 21, 34]
        assert list(a["has_outcomes"]) == [1, 1, 1, 0] and list(a["has_end"]) == [0, 1, 1, 0]
        # video 1 (11 frames, offset 10): reward 2 on its last transition (frame 9 -> 10)
        assert a["rewards"][10 + 9] == 2.0 and a["terminated"][10 + 9] == 1 and a["rewards"][10 + 10] == 0
        assert a["rewards"][34:].sum() == 0
        assert list(a["end_action"]) == [-1, 1, 2, -1]
        assert list(a["end_terminated"]) == [0, 1, 0, 0] and list(a["end_truncated"]) == [0, 0, 1, 0]
    r, t = TokenFile(tmp / "d.tokens.safetensors").clip_outcomes(1, 7, 4)  # transitions 7->8, 8->9, 9->10
    assert r.tolist() == [0, 0, 2.0] and t.tolist() == [False, False, True]
    ff = FrameFile(tmp / "d.frames.safetensors")
    for i, v in enumerate(vids):
        assert np.array_equal(ff.clip(i, 0, len(v)), v)  # lossless videos: the frames themselves
    cache = FrameCache(data, 16)
    s1, s2 = ClipSampler(cache, 3, seed=4), ClipSampler(ff, 3, seed=4)
    for _ in range(3):
        assert np.array_equal(s1.sample(4), s2.sample(4))


def test_dynamics_stage_trains_the_same_from_the_file(made):
    """The CLI end to end: the dynamics stage's losses from the tokens file equal those from the videos."""
    tmp, data, _, _ = made
    cfg = tiny_train_config(tmp / "c.yaml", dynamics={"cotrain_lam": False, "max_steps": 5})
    common = ("--stage", "dynamics", "--init-from", str(tmp / "release"))
    train(cfg, data, tmp / "from-videos", *common)
    r = train(cfg, tmp / "d.tokens.safetensors", tmp / "from-file", *common)
    assert "tokens file" in r.stdout
    a = losses(tmp / "from-videos" / "dynamics" / "metrics.csv")
    b = losses(tmp / "from-file" / "dynamics" / "metrics.csv")
    assert len(a) == 5 and a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5), (k, a, b)


def test_a_file_from_other_weights_is_refused(made):
    tmp, data, vids, _ = made
    other = spread_model(vids, seed=1)
    other.save_pretrained(tmp / "other")
    cfg = tiny_train_config(tmp / "c2.yaml", dynamics={"cotrain_lam": False})
    r = train(cfg, tmp / "d.tokens.safetensors", tmp / "r1", "--stage", "dynamics", "--init-from",
              str(tmp / "other"), check=False)
    assert r.returncode == 2 and "was tokenised with" in r.stderr and str(tmp / "release") in r.stderr
    # co-training the latent action model needs frames
    cfg3 = tiny_train_config(tmp / "c3.yaml", dynamics={"cotrain_lam": True})
    r = train(cfg3, tmp / "d.tokens.safetensors", tmp / "r2", "--stage", "dynamics", "--init-from",
              str(tmp / "release"), check=False)
    assert r.returncode == 2 and "cotrain_lam=false" in r.stderr
    # the tokenizer stage trains on frames
    with pytest.raises(PretokenizedError, match="holds tokens, not frames"):
        open_training_data(tmp / "d.tokens.safetensors", "tokenizer", 16)
    with pytest.raises(PretokenizedError, match="image_size is 32"):
        open_training_data(tmp / "d.frames.safetensors", "tokenizer", 32)


def test_bad_files_get_clear_errors(made, tmp_path):
    tmp = made[0]
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(PretokenizedError, match="not a pre-tokenised file"):
        TokenFile(tmp_path / "junk.safetensors")
    blob = (tmp / "d.tokens.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(PretokenizedError, match="truncated"):
        TokenFile(tmp_path / "cut.safetensors")
    with pytest.raises(PretokenizedError, match="not a tokens file"):
        TokenFile(tmp / "d.frames.safetensors")
    # safetensors itself reads the file
    from safetensors import safe_open

    with safe_open(str(tmp / "d.tokens.safetensors"), framework="np") as f:
        assert f.get_tensor("tokens").dtype == np.uint16


def test_writers_refuse_mismatched_sizes(made, tmp_path):
    tmp, data, vids, model = made
    cache = FrameCache(data, 16)
    big = tiny_model(0, image_size=32)
    with pytest.raises(ValueError, match="the model takes 32"):
        write_tokens_file(big, cache, tmp_path / "x.safetensors", source="x")
    assert write_frames_file(cache, tmp_path / "f.safetensors").is_file()
    r = run("-m", "training.pretokenize", "--data", str(data), check=False)
    assert r.returncode != 0 and "nothing to write" in r.stderr


def test_the_reward_stage_reads_a_dataset_folder_not_a_file(made):
    tmp, _, _, _ = made
    cfg = tiny_train_config(tmp / "c4.yaml")
    for name, what in (("d.tokens.safetensors", "is a tokens file"), ("d.frames.safetensors", "not a frames file")):
        r = train(cfg, tmp / name, tmp / f"rw-{name}", "--stage", "reward", "--init-from", str(tmp / "release"),
                  "outcome_input=tokens", check=False)
        assert r.returncode == 2 and what in r.stderr and "dataset folder" in r.stderr, r.stderr


def test_a_context_tokenizer_is_refused_with_a_reason(made):
    """Closed-loop tokens depend on where a clip starts: a file of whole videos would not hold the tokens the
    dynamics sees at play time, so pre-tokenising says so instead of writing them."""
    from conftest import tiny_config

    from genie_env import Genie

    tmp, data, _, _ = made
    model = Genie(tiny_config(tokenizer_context=1)).eval()
    with pytest.raises(ValueError, match="depend on where the clip starts"):
        write_tokens_file(model, FrameCache(data, 16), tmp / "ctx.tokens.safetensors", str(data))
    assert not (tmp / "ctx.tokens.safetensors").exists()
