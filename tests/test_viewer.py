"""The viewer: the pure key handler, the loop driven by posted key events under SDL_VIDEODRIVER=dummy,
the genie-play command headless with recording, video writing, and the record_rollout example."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoint

from genie_env.env import GenieEnv
from genie_env.viewer import (
    SLOW_AFTER_STEPS,
    AutoPilot,
    KeyHandler,
    VideoWriter,
    Viewer,
    main,
    no_display,
    save_video,
    slow_message,
)

ROOT = Path(__file__).resolve().parents[1]
ACTION_MAP = {"LEFT": 1, "RIGHT": 2, "UP": 3, "LEFT+UP": 4, "RIGHT+UP": 5, "NONE": 0}
QUIET = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "SDL_VIDEODRIVER": "dummy"}

torch.set_num_threads(1)  # tiny models: threads only add hand-off costs on a busy machine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("viewer") / "tiny")


@pytest.fixture
def dummy_video(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")


def read_mp4(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# ---------------------------------------------------------------------------------------- key handler
def test_key_handler_maps_held_keys_through_the_action_map():
    keys = KeyHandler(ACTION_MAP, 8)
    assert keys.action() is None and keys.idle_action() == (0, "NONE (0)")
    keys.key_down("K_RIGHT")
    assert keys.action() == (2, "RIGHT (2)")
    keys.key_down("K_w")  # jump while running right
    assert keys.action()[0] == 5
    keys.key_down("K_LEFT")  # the newest horizontal key wins
    assert keys.action()[0] == 4
    keys.key_up("K_LEFT")
    keys.key_up("K_w")
    assert keys.action()[0] == 2
    keys.key_down("K_5")  # number keys pick latent actions directly (key 5 = latent 4)
    assert keys.action() == (4, "latent 4")
    keys.key_up("K_5")
    keys.key_up("K_RIGHT")
    assert keys.action() is None and keys.held == []


def test_key_handler_commands_and_missing_groups():
    keys = KeyHandler({"LEFT": 6}, 3)  # no UP group, no NONE, only 3 latent actions
    keys.key_down("K_UP")
    assert keys.action() is None  # nothing in the map for it
    keys.key_down("K_LEFT")
    assert keys.action()[0] == 6  # LEFT+UP is missing: falls back to LEFT
    keys.key_down("K_9")  # beyond the 3 latent actions: ignored
    assert keys.action()[0] == 6 and keys.idle_action()[0] == 0
    keys.key_down("K_SPACE")
    keys.key_down("K_r")
    assert keys.paused and keys.restart and not keys.quit
    keys.key_down("K_SPACE")
    keys.key_down("K_q")
    assert not keys.paused and keys.quit


def test_autopilot_holds_actions_for_a_while():
    pilot = AutoPilot([1, 2, 3], np.random.default_rng(0))
    seq = [pilot() for _ in range(60)]
    assert set(seq) <= {1, 2, 3} and len(set(seq)) > 1
    runs = np.flatnonzero(np.diff(seq)) + 1
    assert np.diff(np.concatenate([[0], runs])).min() >= 4  # each choice is held for >= 4 frames


# ---------------------------------------------------------------------------------------- the loop
def post(kind: str, key: str) -> None:
    import pygame

    pygame.event.post(pygame.event.Event(getattr(pygame, kind), key=getattr(pygame, key)))


def test_posted_key_events_change_the_action_and_frames_are_drawn(ckpt, dummy_video):
    env = GenieEnv(ckpt)
    viewer = Viewer(env, scale=4, seed=0)
    screen = viewer.screenshot()
    assert screen.shape == (16 * 4 + Viewer.BAR, 16 * 4, 3)
    picture = screen[: 16 * 4]
    assert picture.std() > 0  # the prompt frame is on screen, not a blank window
    assert np.array_equal(picture[::4, ::4], viewer.obs)  # drawn at 4x, pixel for pixel
    assert viewer.tick() and viewer.actions == [0]  # no key: NONE
    post("KEYDOWN", "K_RIGHT")
    viewer.tick()
    post("KEYDOWN", "K_UP")
    viewer.tick()
    post("KEYUP", "K_RIGHT")
    post("KEYUP", "K_UP")
    viewer.tick()
    post("KEYDOWN", "K_7")
    viewer.tick()
    assert viewer.actions == [0, 2, 5, 0, 6]
    assert np.array_equal(viewer.screenshot()[: 16 * 4][::4, ::4], viewer.obs)  # the newest frame is shown
    viewer.close()


def test_slow_message_names_the_one_setting_to_try():
    assert slow_message(14.0, 15, "fp32", False, 2) is None  # within 10% of the display rate
    emulated = slow_message(1.1, 15, "bf16", False, 2)
    assert "1.1 frames/s" in emulated and "15 frames/s" in emulated and "--dtype fp32" in emulated
    assert "--dtype" not in slow_message(8.0, 15, "bf16", True, 2)  # native bf16 is already the fast format
    assert "--maskgit-steps 1" in slow_message(8.0, 15, "fp32", False, 2)
    assert "--fps 8" in slow_message(8.7, 15, "fp32", False, 1)  # nothing left to cut: match the display


@pytest.mark.parametrize("display_fps, slow", [(1000, True), (1, False)])
def test_viewer_says_where_it_runs_and_warns_once_when_slow(ckpt, dummy_video, capsys, display_fps, slow):
    import pygame

    env = GenieEnv(ckpt, dtype="fp32")
    step = env.step

    def slow_step(action):  # at most 200 frames/s, whatever the machine
        time.sleep(0.005)
        return step(action)

    env.step = slow_step
    viewer = Viewer(env, scale=2, fps=display_fps, seed=0)
    for _ in range(3 * SLOW_AFTER_STEPS):
        viewer.tick()
    caption = pygame.display.get_caption()[0]
    assert f"cpu ({torch.get_num_threads()} thread" in caption and "), fp32" in caption and "fps" in caption
    assert 0 < viewer.model_fps() < 200
    err = capsys.readouterr().err
    assert err.count("slower than the") == (1 if slow else 0)
    assert (viewer.slow_notice is not None) is slow
    viewer.close()


def test_pause_restart_and_quit(ckpt, dummy_video):
    viewer = Viewer(GenieEnv(ckpt), scale=2, seed=0)
    viewer.tick()
    post("KEYDOWN", "K_SPACE")
    viewer.tick()
    viewer.tick()
    assert viewer.steps == 1  # paused: no new frames
    post("KEYDOWN", "K_SPACE")
    viewer.tick()
    assert viewer.steps == 2
    post("KEYDOWN", "K_r")
    viewer.tick()
    assert viewer.env._steps == 0  # restarted from a new prompt
    post("KEYDOWN", "K_ESCAPE")
    assert viewer.tick() is False
    viewer.close()


def test_headless_autopilot_records_every_frame(ckpt, dummy_video, tmp_path):
    writer = VideoWriter(tmp_path / "clip.gif", fps=10, scale=2)
    viewer = Viewer(GenieEnv(ckpt), scale=2, seed=0, autopilot=AutoPilot([1, 2], np.random.default_rng(0)),
                    writer=writer)
    post("KEYDOWN", "K_SPACE")  # pausing is ignored without a person at the keys
    for _ in range(5):
        viewer.tick()
    assert viewer.steps == 5 and set(viewer.actions) <= {1, 2}
    viewer.close()
    assert writer.close() == tmp_path / "clip.gif" and writer.frames_written == 6

    from PIL import Image

    with Image.open(tmp_path / "clip.gif") as gif:
        assert gif.n_frames >= 2 and gif.size == (32, 32)


# ---------------------------------------------------------------------------------------- genie-play
def test_genie_play_headless_records_a_clip_and_screenshot(ckpt, dummy_video, tmp_path, capsys):
    out = tmp_path / "clips" / "run.mp4"
    code = main(["--checkpoint", str(ckpt), "--headless", "--steps", "6", "--seed", "1", "--scale", "3",
                 "--record", str(out), "--maskgit-steps", "1"])
    assert code == 0
    frames = read_mp4(out)
    assert frames.shape == (7, 48, 48, 3)  # the prompt and 6 steps, scaled 3x
    shot = tmp_path / "clips" / "run.png"
    assert shot.is_file()
    assert str(out) in capsys.readouterr().out


def test_genie_play_without_a_display_falls_back_to_headless(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDL_VIDEODRIVER", "unset")  # (recorded, so that main's "dummy" is undone after)
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert no_display()
    monkeypatch.chdir(tmp_path)
    assert main(["--checkpoint", str(ckpt), "--steps", "3", "--scale", "2"]) == 0
    captured = capsys.readouterr()
    assert "running headless" in captured.err
    assert (tmp_path / "genie-play.mp4").is_file() and (tmp_path / "genie-play.png").is_file()
    assert "genie-play.mp4" in captured.out


def test_genie_play_reports_bad_arguments(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GENIE_ENV_WEIGHTS", str(tmp_path / "none"))
    assert main(["--headless", "--steps", "1"]) == 2  # no shipped model yet: a message, not a traceback
    assert "shipped default model" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), "--record", "x.avi"]) == 2
    assert main(["--checkpoint", str(ckpt), "--scale", "0"]) == 2
    assert main(["--help"]) == 0
    assert "--record" in capsys.readouterr().out


def test_genie_play_prompt_image_for_checkpoints_without_a_bank(tmp_path, dummy_video, capsys):
    bare = write_tiny_checkpoint(tmp_path / "bare")
    (bare / "prompts.npz").unlink()
    assert main(["--checkpoint", str(bare), "--headless", "--steps", "1"]) == 2
    assert "--prompt" in capsys.readouterr().err
    from PIL import Image

    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 255  # a 32x32 image for a 16x16 model: resized
    Image.fromarray(img).save(tmp_path / "start.png")
    out = tmp_path / "p.gif"
    assert main(["--checkpoint", str(bare), "--headless", "--steps", "2", "--scale", "1", "--prompt",
                 str(tmp_path / "start.png"), "--record", str(out)]) == 0
    with Image.open(out) as gif:
        first = np.asarray(gif.convert("RGB"))
    assert first[:, :6].max() < 30 and first[:, 10:].min() > 225  # the clip starts from the given image


def test_module_entry_point_runs(ckpt, tmp_path):
    out = subprocess.run([sys.executable, "-m", "genie_env.viewer", "--checkpoint", str(ckpt), "--headless",
                          "--steps", "2", "--record", str(tmp_path / "m.gif")],
                         capture_output=True, text=True, timeout=120, env=QUIET)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.gif").is_file() and (tmp_path / "m.png").is_file()


# ---------------------------------------------------------------------------------------- video
def test_mp4_sizes_are_even_and_frames_survive(tmp_path):
    frames = np.zeros((4, 5, 7, 3), np.uint8)
    frames[:, :, :3] = (255, 0, 0)  # left part red, right part black
    save_video(frames, tmp_path / "odd.mp4", fps=5, scale=1)
    got = read_mp4(tmp_path / "odd.mp4")
    assert got.shape == (4, 10, 14, 3)  # 1x would be odd: doubled
    assert got[:, 2:8, 1:4, 0].mean() > 200 and got[:, 2:8, 10:, :].mean() < 40
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        save_video(frames, tmp_path / "x.webm")
    with pytest.raises(ValueError, match="empty"):
        save_video(frames[:0], tmp_path / "empty.gif")


# ---------------------------------------------------------------------------------------- example
def test_record_rollout_example(ckpt, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "record_rollout.py"), "--checkpoint", str(ckpt),
                          "--steps", "5", "--actions", "RIGHT,RIGHT+UP,3", "--out", str(tmp_path / "r.mp4"),
                          "--scale", "2"], capture_output=True, text=True, timeout=120, env=QUIET)
    assert out.returncode == 0, out.stderr
    assert read_mp4(tmp_path / "r.mp4").shape == (6, 32, 32, 3)

    from PIL import Image

    with Image.open(tmp_path / "r.png") as strip:
        assert strip.size == (6 * 32, 32)  # all 6 frames (fewer than 8) side by side
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / "record_rollout.py"), "--checkpoint", str(ckpt),
                          "--actions", "JUMP", "--out", str(tmp_path / "b.mp4")],
                         capture_output=True, text=True, timeout=120, env=QUIET)
    assert bad.returncode != 0 and "JUMP" in bad.stderr


def test_viewer_keeps_score_and_restarts_when_the_model_ends_an_episode(tmp_path, dummy_video):
    from test_outcomes import force_heads

    from genie_env import Genie

    model = force_heads(Genie.from_pretrained(write_tiny_checkpoint(tmp_path / "c", outcome_input="tokens")))
    viewer = Viewer(GenieEnv(model=model), scale=2, seed=0)
    starts = []
    reset = viewer.env.reset

    def counting_reset(**kwargs):
        starts.append(1)
        return reset(**kwargs)

    viewer.env.reset = counting_reset
    for _ in range(3):
        assert viewer.tick()
    # every step collects the coin and ends the episode: three episodes, each restarted from a new frame
    assert viewer.episodes_ended == 3 and len(starts) == 3 and viewer.score == 0.0
    assert "episode over, score 10" in viewer.status()
    never = force_heads(Genie.from_pretrained(tmp_path / "c"), fire=False)
    quiet = Viewer(GenieEnv(model=never), scale=2, seed=0)
    for _ in range(3):
        quiet.tick()
    assert quiet.episodes_ended == 0 and "score 0" in quiet.status() and "episode over" not in quiet.status()
