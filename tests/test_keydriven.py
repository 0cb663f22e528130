"""Metric 7 (key-driven fidelity against the real game): its helpers on synthetic frames whose answers are
known, and the command end to end on a tiny model with 2 real starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_checkpoint

from genie_env import Genie
from training.keydriven import (
    KEYS,
    KeyArgs,
    bank_prompt_frames,
    check_floors,
    format_table,
    key_metrics,
    parse_key_sequence,
    run_keydriven,
    view_shift,
)

ROOT = Path(__file__).parent.parent

try:
    import procgen  # noqa: F401

    HAVE_PROCGEN = True
except Exception:  # pragma: no cover - optional extra
    HAVE_PROCGEN = False

# camera motion per step (right, up) of each key in the synthetic world
MOTION = {"LEFT": (-2, 0), "RIGHT": (2, 0), "NONE": (0, 0), "UP": (0, 1), "LEFT+UP": (-2, 1), "RIGHT+UP": (2, 1)}


def texture(seed: int = 0, size: int = 128) -> torch.Tensor:
    """A coloured blocky texture (3, size, size): every shift of it looks different."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(3, size // 4, size // 4, generator=g)
    return blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)


def view(tex: torch.Tensor, right: int, up: int, size: int = 64) -> torch.Tensor:
    """The size x size view of ``tex`` with the camera moved ``right`` and ``up`` from the centre."""
    c = (tex.shape[-1] - size) // 2
    return tex[:, c - up: c - up + size, c + right: c + right + size]


def synthetic_world(starts: int = 3, steps: int = 8) -> torch.Tensor:
    """(starts, keys, 1 + steps, 3, 64, 64): each key moves the camera by MOTION per step."""
    out = torch.zeros(starts, len(KEYS), steps + 1, 3, 64, 64)
    for s in range(starts):
        tex = texture(s)
        for k, key in enumerate(KEYS):
            dx, dy = MOTION[key]
            for t in range(steps + 1):
                out[s, k, t] = view(tex, dx * t, dy * t)
    return out


@pytest.mark.parametrize("dx, dy", [(0, 0), (5, 0), (-7, 0), (0, 3), (0, -4), (6, -2), (-16, 16)])
def test_view_shift_finds_a_planted_camera_move(dx, dy):
    tex = texture(1)
    a, b = view(tex, 0, 0), view(tex, dx, dy)
    assert view_shift(a, b).tolist() == [dx, dy]
    # batched, and each pair on its own
    pair = view_shift(torch.stack([a, b]), torch.stack([b, a]))
    assert pair.tolist() == [[dx, dy], [-dx, -dy]]


def test_view_shift_keeps_still_when_nothing_tells_a_move():
    flat = torch.full((3, 64, 64), 0.4)
    assert view_shift(flat, flat).tolist() == [0, 0]
    with pytest.raises(ValueError, match="max_shift"):
        view_shift(flat, flat, max_shift=32)


def test_a_model_that_returns_the_real_frames_scores_perfectly():
    real = synthetic_world()
    res = key_metrics(real, real.clone())
    assert res["key_accuracy"] == 1.0 and res["key_pairs"] > 0
    assert res["scroll_real_px"] == 2 * 2 * 8  # RIGHT minus LEFT: 2 px a step each way, 8 steps
    assert res["scroll_model_px"] == res["scroll_real_px"] and res["scroll_ratio"] == 1.0
    assert res["scroll_agreement"] == res["scroll_agreement_where_real_moved"] == 1.0
    assert res["jump_real_px"] == 4 and res["jump_ratio"] == 1.0 and res["jump_agreement"] == 1.0
    assert res["psnr"] == pytest.approx([60.0] * 8)
    assert all(check_floors(res).values())


def test_a_copy_model_gets_the_copy_psnr_and_no_scroll():
    real = synthetic_world()
    copy = real[:, :, :1].expand_as(real).clone()
    res = key_metrics(real, copy)
    assert res["psnr"] == pytest.approx(res["copy_psnr"])
    assert res["scroll_model_px"] == 0 and res["scroll_ratio"] == 0 and res["scroll_agreement"] == 0
    assert res["jump_model_px"] == 0 and res["jump_agreement"] == 0 and res["jump_agreement_where_real_moved"] == 0
    floors = check_floors(res)
    assert not floors["psnr_above_copy"] and not floors["scroll_ratio"] and not floors["jump_agreement"]


def test_intervals_over_the_starts_bracket_each_figure_and_show_how_much_the_starts_disagree():
    real = synthetic_world(starts=8)
    # a perfect model on every start: nothing to disagree about, every interval is the figure itself
    res = key_metrics(real, real.clone())
    for name in ("key_accuracy", "scroll_ratio", "scroll_agreement", "jump_ratio", "jump_agreement"):
        assert res[f"{name}_ci"] == pytest.approx([res[name]] * 2)
    # perfect on half the starts, the unchanged start frame on the other half: figures of 0.5, and an
    # interval around each that is as wide as resampling 8 such starts makes it
    half = real.clone()
    half[::2] = real[::2, :, :1].expand_as(real[::2])
    res = key_metrics(real, half)
    for name in ("scroll_ratio", "scroll_agreement", "jump_agreement"):
        lo, hi = res[f"{name}_ci"]
        assert res[name] == pytest.approx(0.5)
        assert lo < 0.5 < hi and 0.3 < hi - lo < 0.9, (name, lo, hi)
    lo, hi = res["key_accuracy_ci"]
    assert lo < res["key_accuracy"] < hi
    assert "95% interval" in format_table(res)


def test_key_accuracy_counts_a_model_that_swaps_left_and_right_as_wrong():
    real = synthetic_world()
    swapped = real.clone()
    li, ri = KEYS.index("LEFT"), KEYS.index("RIGHT")
    swapped[:, [li, ri]] = real[:, [ri, li]]
    res = key_metrics(real, swapped)
    # the model's LEFT frame is the real RIGHT one: the pairs (LEFT, RIGHT) and (RIGHT, LEFT) are missed
    assert res["key_accuracy"] < 1.0
    assert res["scroll_model_px"] == -res["scroll_real_px"] and res["scroll_agreement"] == 0


def test_key_metrics_rejects_mismatched_inputs():
    real = synthetic_world(starts=1, steps=2)
    with pytest.raises(ValueError, match="real and gen"):
        key_metrics(real, real[:, :, :2])
    with pytest.raises(ValueError, match="keys"):
        key_metrics(real[:, :5], real[:, :5])


def test_key_sequence_parsing():
    assert parse_key_sequence("RIGHT*2,right+up,NONE*1") == ["RIGHT", "RIGHT", "RIGHT+UP", "NONE"]
    assert parse_key_sequence("") == []
    with pytest.raises(ValueError, match="long_keys"):
        parse_key_sequence("JUMP*3")


@pytest.mark.skipif(not HAVE_PROCGEN, reason="needs the optional record extra (procgen)")
def test_real_starts_are_shared_by_every_key(tiny_checkpoint):
    from genie_env import Genie

    model = Genie.from_pretrained(tiny_checkpoint)
    args = KeyArgs(starts=2, steps=8, long_keys="RIGHT*3,RIGHT+UP*3", long_steps=6, long_starts=2)
    res = run_keydriven(model, args, log=lambda *a: None)
    real, gen = res["_real"], res["_gen"]
    assert real.shape == gen.shape == (2, 6, 9, 3, 16, 16)
    # every key starts from the same restored state, and the model from that frame
    assert torch.equal(real[:, :, 0], real[:, :1, 0].expand_as(real[:, :, 0]))
    assert torch.equal(gen[:, :, 0], real[:, :, 0])
    # the keys do different things in the real game
    li, ri = KEYS.index("LEFT"), KEYS.index("RIGHT")
    assert (real[:, li, -1] - real[:, ri, -1]).abs().amax() > 0
    assert res["scroll_real_px"] > 0  # the view follows the agent right under RIGHT
    assert res["_long_real"].shape == res["_long_gen"].shape == (2, 7, 3, 16, 16)


@pytest.mark.skipif(not HAVE_PROCGEN, reason="needs the optional record extra (procgen)")
def test_keydriven_cli_smoke(tiny_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "training.evaluate", "--keydriven", "2", "--checkpoint",
                        str(tiny_checkpoint), "--long-keys", "RIGHT*4,RIGHT+UP*4", "--long-steps", "8", "--no-bf16",
                        "--threads", "1", "--strip-colors", "64",
                        "--json", str(tmp_path / "k.json"), "--strip", str(tmp_path / "k.png")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "key accuracy" in r.stdout and "scroll RIGHT - LEFT" in r.stdout and "floor" in r.stdout
    res = json.loads((tmp_path / "k.json").read_text())
    assert res["starts"] == 2 and len(res["psnr"]) == len(res["copy_psnr"]) == 8
    assert res["dtype"] == "fp32" and res["bf16"] is False   # --no-bf16 is honoured, as by training.evaluate
    assert set(res["floors"]) >= {"psnr_above_copy", "key_accuracy", "scroll_ratio", "jump_agreement"}
    assert (tmp_path / "k.png").stat().st_size > 0 and (tmp_path / "k-long.png").stat().st_size > 0


def test_bad_settings_are_refused_by_name(tiny_checkpoint):
    from genie_env import Genie

    model = Genie.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"prompt_frames must be in \[1, 3\]"):
        run_keydriven(model, KeyArgs(starts=2, prompt_frames=9))
    with pytest.raises(ValueError, match="starts must be >= 1"):
        run_keydriven(model, KeyArgs(starts=0))
    (tiny_checkpoint / "action_map.json").write_text(json.dumps({"LEFT": 1, "RIGHT": 2}))
    with pytest.raises(ValueError, match="action map lacks"):
        run_keydriven(Genie.from_pretrained(tiny_checkpoint), KeyArgs(starts=2))


def test_metric_7_primes_as_many_frames_as_the_env(tmp_path):
    """The command's default prompt length is what Genie-v0's reset primes with: the checkpoint's clips."""
    frames = Genie.from_pretrained(write_tiny_checkpoint(tmp_path / "frames"))
    clips = Genie.from_pretrained(write_tiny_checkpoint(tmp_path / "clips", prompt_frames=3))
    bare = Genie.from_pretrained(write_tiny_checkpoint(tmp_path / "bare"))
    bare.extra_files = {}
    assert (bank_prompt_frames(frames), bank_prompt_frames(clips), bank_prompt_frames(bare)) == (1, 3, 1)
