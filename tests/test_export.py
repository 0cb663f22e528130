"""Exporting a release into a shippable folder: prompt bank of real frames, action map, half precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoint
from test_training import moving_square_videos

from genie_env import Genie
from training.export import action_map
from training.export import main as export_main


def test_action_map_picks_the_most_associated_latent_action():
    rng = np.random.default_rng(0)
    groups = rng.choice(["LEFT", "RIGHT", "NONE", "UP"], size=4000)
    truth = {"LEFT": 5, "RIGHT": 2, "NONE": 0, "UP": 7}
    noisy = rng.random(4000) < 0.3
    latents = np.where(noisy, rng.integers(0, 8, 4000), np.vectorize(truth.get)(groups))
    am = action_map(latents, groups, 8)
    assert am["map"] == truth
    assert sum(am["counts"]["LEFT"]) == int((groups == "LEFT").sum())


def test_export_writes_a_loadable_shippable_folder(tmp_path):
    release = write_tiny_checkpoint(tmp_path / "release", n_prompts=2)
    val = moving_square_videos(tmp_path / "val", n=3, frames=20)
    out = tmp_path / "weights"
    assert export_main(["--release", str(release), "--val-data", str(val), "--out", str(out), "--prompts", "10"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["action_map.json", "config.json", "model.safetensors",
                                                     "prompts.npz"]
    model = Genie.from_pretrained(out)
    clips = np.load(out / "prompts.npz")["frames"]
    # clips of 3 frames (the tiny model's context window of 4 less the generated frame), start frame last
    assert clips.shape == (10, 3, 16, 16, 3) and clips.dtype == np.uint8
    # the bank holds real clips of the validation videos, consecutive frames of one video each (each
    # video's first clip comes first)
    from genie_env.media import read_video

    videos = [read_video(val / "videos" / f"video_{i:03d}.mp4") for i in range(3)]
    assert np.array_equal(clips[0], videos[0][:3])
    for clip in clips:
        assert any(np.array_equal(clip, v[s: s + 3]) for v in videos for s in range(len(v) - 2))
    amap = json.loads((out / "action_map.json").read_text())
    assert set(amap) <= {"LEFT", "RIGHT", "NONE", "UP", "LEFT+UP", "RIGHT+UP"} and set(amap) >= {"LEFT", "RIGHT"}
    assert all(0 <= v < 8 for v in amap.values())
    ref = Genie.from_pretrained(release)
    assert model.dynamics.head.weight.dtype == torch.float32
    torch.testing.assert_close(model.dynamics.head.weight, ref.dynamics.head.weight, atol=1e-3, rtol=1e-3)


def test_export_sets_shipped_sampling_and_keeps_the_model_card(tmp_path):
    release = write_tiny_checkpoint(tmp_path / "release", n_prompts=2)
    val = moving_square_videos(tmp_path / "val", n=3, frames=20)
    out = tmp_path / "weights"
    out.mkdir()
    (out / "README.md").write_text("# card\n")
    (out / "samples.png").write_bytes(b"png")
    args = ["--release", str(release), "--val-data", str(val), "--out", str(out), "--prompts", "4"]
    assert export_main(args + ["--maskgit-steps", "3", "--temperature", "0.25"]) == 0
    model = Genie.from_pretrained(out)
    assert (model.config.maskgit_steps, model.config.temperature) == (3, 0.25)
    assert (out / "README.md").read_text() == "# card\n" and (out / "samples.png").read_bytes() == b"png"
    with pytest.raises(SystemExit):
        export_main(args + ["--maskgit-steps", "0"])
    assert Genie.from_pretrained(out).config.maskgit_steps == 3  # a refused export leaves the folder alone


def test_export_prompt_frames_option(tmp_path):
    release = write_tiny_checkpoint(tmp_path / "release", n_prompts=2)
    val = moving_square_videos(tmp_path / "val", n=2, frames=20)
    out = tmp_path / "weights"
    args = ["--release", str(release), "--val-data", str(val), "--out", str(out), "--prompts", "4"]
    assert export_main(args + ["--prompt-frames", "1"]) == 0
    frames = np.load(out / "prompts.npz")["frames"]
    assert frames.shape == (4, 16, 16, 3)  # single start frames, as banks were before clips
    from genie_env.media import read_video

    assert np.array_equal(frames[0], read_video(val / "videos" / "video_000.mp4")[0])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit):
        export_main(args + ["--prompt-frames", "4"])  # the tiny model's window holds 3 + the generated one
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # refused before anything was written
