"""The dynamics stage driven by recorded keys (``stages.dynamics.key_actions``): the sampler hands each
transition the latent action of the key pressed there, through the action map, and the stage trains on
those in place of the inferred ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_training import moving_square_videos, tiny_train_config, train

from training.data import DatasetError, FrameCache, KeyClipSampler, to_tensor
from training.train import StageModule

AMAP = {"LEFT": 5, "NONE": 0, "RIGHT": 3}


def _square_x(frame: np.ndarray) -> int:
    """Column of the moving square's left edge (its colour is the only red above 200)."""
    return int(np.nonzero((frame[..., 0] > 200).any(0))[0][0])


def test_key_actions_are_the_keys_pressed_on_each_transition(tmp_path):
    """In the moving-square videos, LEFT / NONE / RIGHT move the square by -2 / 0 / +2 pixels on the next
    frame: each clip's key latents must say how the square moves between its frames t and t+1."""
    data = moving_square_videos(tmp_path / "d", n=4, frames=20)
    cache = FrameCache(data, 16, log=lambda *a: None)
    sampler = KeyClipSampler(cache, 6, AMAP, share=1.0, seed=3)
    by_latent = {v: k for k, v in AMAP.items()}
    checked = 0
    for _ in range(20):
        batch = sampler.sample(4)
        assert batch["frames"].shape == (4, 6, 16, 16, 3) and batch["key_actions"].shape == (4, 5)
        for clip, keys in zip(batch["frames"], batch["key_actions"]):
            for t, k in enumerate(keys):
                dx = _square_x(clip[t + 1]) - _square_x(clip[t])
                if dx != 0:  # a move the wall did not stop: its sign is the key's
                    assert by_latent[int(k)] == ("RIGHT" if dx > 0 else "LEFT"), (t, keys)
                    checked += 1
                else:
                    assert k in (AMAP["NONE"], AMAP["LEFT"], AMAP["RIGHT"])
    assert checked > 100


def test_key_actions_share_and_videos_without_keys(tmp_path):
    data = moving_square_videos(tmp_path / "d", n=4, frames=20)
    cache = FrameCache(data, 16, log=lambda *a: None)
    none = KeyClipSampler(cache, 4, AMAP, share=0.0, seed=0).sample(64)["key_actions"]
    assert (none == -1).all()
    half = KeyClipSampler(cache, 4, AMAP, share=0.5, seed=0).sample(400)["key_actions"]
    keyed = (half >= 0).all(1).mean()
    assert 0.4 < keyed < 0.6 and ((half >= 0).all(1) | (half == -1).all(1)).all()  # whole clips, either way
    # Same seed, same draws (the sampler's state is the training checkpoint's): frames and keys alike.
    a, b = (KeyClipSampler(cache, 4, AMAP, share=0.5, seed=9).sample(8) for _ in range(2))
    assert np.array_equal(a["frames"], b["frames"]) and np.array_equal(a["key_actions"], b["key_actions"])
    # A video recorded without its keys: its clips are inferred.
    (data / "videos" / "video_001.json").unlink()
    (data / "videos" / "video_002.json").write_text(json.dumps({"actions": []}))
    cache = FrameCache(data, 16, log=lambda *a: None)
    s = KeyClipSampler(cache, 4, AMAP, share=1.0, seed=0)
    assert s.keyed_videos == 2
    unkeyed = (s.sample(400)["key_actions"] == -1).all(1).mean()
    assert 0.35 < unkeyed < 0.65  # half the videos (of equal length) record no keys: their clips are inferred
    for v in (1, 2):
        (data / "videos" / f"video_{v:03d}.json").unlink(missing_ok=True)
    for v in (0, 3):
        (data / "videos" / f"video_{v:03d}.json").unlink()
    with pytest.raises(DatasetError, match="records its keys"):
        KeyClipSampler(FrameCache(data, 16, log=lambda *a: None), 4, AMAP, share=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        KeyClipSampler(cache, 4, AMAP, share=1.5)


def test_the_stage_trains_on_the_key_actions(tmp_path):
    """The loss with key actions given equals the dynamics' loss on those actions; -1 keeps the inferred."""
    data = moving_square_videos(tmp_path / "d", n=2, frames=12)
    cache = FrameCache(data, 16, log=lambda *a: None)
    batch = KeyClipSampler(cache, 4, AMAP, share=1.0, seed=0).sample(2)
    frames, keys = to_tensor(batch["frames"]), torch.from_numpy(batch["key_actions"])
    genie = tiny_model(seed=0)
    module = StageModule(genie, "dynamics", genie.config, cotrain_lam=False)
    with torch.no_grad():
        tokens = genie.tokenizer.encode(frames).flatten(2)
        inferred = genie.latent_actions.infer(frames)
    assert not torch.equal(inferred, keys)  # else the check below could not tell them apart

    def loss_of(**kw):
        torch.manual_seed(1)
        return module(frames=frames, **kw)[0]

    def direct(actions):
        torch.manual_seed(1)
        return genie.dynamics.loss(tokens, actions)[0] * genie.config.lambda_dynamics

    assert torch.equal(loss_of(key_actions=keys), direct(keys))
    assert torch.equal(loss_of(key_actions=torch.full_like(keys, -1)), direct(inferred))
    assert torch.equal(loss_of(), direct(inferred))
    mixed = keys.clone()
    mixed[0] = -1
    assert torch.equal(loss_of(key_actions=mixed), direct(torch.cat([inferred[:1], keys[1:]])))


def test_key_actions_in_the_training_cli(tmp_path):
    """End to end: the latent action model's own action map drives the stage, or, where it has none, one made
    from the recorded keys as training.export makes it; the release keeps the map and the export keeps the
    release's. Videos without keys, or another stage, give a clear error."""
    from genie_env import Genie
    from training.export import action_map, infer_with_groups

    data = moving_square_videos(tmp_path / "d", n=4, frames=20)
    cfg = tiny_train_config(tmp_path / "c.yaml")
    base = tmp_path / "base"
    train(cfg, data, base, "--stage", "tokenizer")
    train(cfg, data, base, "--stage", "lam")
    tok, lam = f"tokenizer={base / 'tokenizer' / 'release'}", base / "lam" / "release"
    r = train(cfg, data, tmp_path / "made", "--stage", "dynamics", "--init-part", tok,
              "--init-part", f"latent_actions={lam}", "stages.dynamics.key_actions=0.5")
    assert "made one from the recorded keys" in r.stdout and "50% of the clips driven" in r.stdout
    made = json.loads((tmp_path / "made" / "dynamics" / "release" / "action_map.json").read_text())
    want = action_map(*infer_with_groups(Genie.from_pretrained(lam), data), 8)["map"]
    assert made == want and set(made) == {"LEFT", "NONE", "RIGHT"}

    mapped = tmp_path / "mapped"
    shutil.copytree(lam, mapped)
    (mapped / "action_map.json").write_text(json.dumps(AMAP))
    r = train(cfg, data, tmp_path / "run", "--stage", "dynamics", "--init-part", f"latent_actions={mapped}",
              "--init-part", tok, "stages.dynamics.key_actions=0.5")
    assert "made one" not in r.stdout and "4 of 4 videos" in r.stdout and str(AMAP) in r.stdout
    rel = tmp_path / "run" / "dynamics" / "release"
    assert json.loads((rel / "action_map.json").read_text()) == AMAP
    from test_training import run

    r = run("-m", "training.export", "--release", str(rel), "--val-data", str(data), "--out", str(tmp_path / "ex"),
            "--prompts", "4")
    assert json.loads((tmp_path / "ex" / "action_map.json").read_text()) == AMAP
    assert (AMAP != want) == ("kept the release's action map" in r.stdout)

    bad = train(cfg, data, tmp_path / "lam2", "--stage", "lam", "stages.lam.key_actions=0.5", check=False)
    assert bad.returncode == 2 and "drive only the dynamics stage" in bad.stderr
    for j in (data / "videos").glob("*.json"):
        j.unlink()
    bad = train(cfg, data, tmp_path / "nokeys", "--stage", "dynamics", "--init-part", tok,
                "--init-part", f"latent_actions={lam}", "stages.dynamics.key_actions=0.5", check=False)
    assert bad.returncode == 2 and "no true actions stored" in bad.stderr and "key_actions=0" in bad.stderr
