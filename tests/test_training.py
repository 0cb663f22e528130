"""The training pipeline end to end on tiny configs: record -> cache -> train each stage -> resume exactly
-> evaluate; bad datasets; signals, locks and NaN; two processes with gloo."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY

from genie_env.media import read_video, write_video
from training.data import ClipSampler, DatasetError, FrameCache

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

try:
    import procgen  # noqa: F401

    HAVE_PROCGEN = True
except Exception:  # pragma: no cover - optional extra
    HAVE_PROCGEN = False


def run(*args, check=True, timeout=300, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def moving_square_videos(folder: Path, n: int = 4, frames: int = 12, size: int = 16, seed: int = 0) -> Path:
    """Synthetic videos: a square moving by a random action each frame, with the actions stored beside."""
    rng = np.random.default_rng(seed)
    vdir = folder / "videos"
    vdir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pos = rng.integers(2, size - 6, 2)
        out, acts = [], []
        for _ in range(frames):
            f = np.full((size, size, 3), 40, np.uint8)
            f[pos[0] : pos[0] + 4, pos[1] : pos[1] + 4] = (250, 200, 30)
            out.append(f)
            a = int(rng.integers(0, 3))
            acts.append(a)
            pos[1] = np.clip(pos[1] + (a - 1) * 2, 0, size - 4)
        write_video(vdir / f"video_{i:03d}.mp4", np.stack(out))
        groups = [["LEFT", "NONE", "RIGHT"][a] for a in acts[:-1]]
        (vdir / f"video_{i:03d}.json").write_text(json.dumps({"actions": acts[:-1], "action_groups": groups}))
    return folder


def tiny_train_config(path: Path, **stage_overrides) -> Path:
    cfg = {**TINY, "num_frames": 4, "seed": 1}
    cfg["stages"] = {
        "tokenizer": {"num_frames": 1, "batch_size": 4, "max_steps": 6},
        "lam": {"num_frames": 4, "batch_size": 2, "max_steps": 6},
        "dynamics": {"num_frames": 4, "batch_size": 2, "max_steps": 8},
    }
    for k, v in stage_overrides.items():
        cfg["stages"][k].update(v)
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(cfg, data, out, *extra, check=True, timeout=300):
    return run("-m", "training.train", "--config", str(cfg), "--data", str(data), "--out", str(out),
               "--no-progress", "--log-every", "1", "--threads", "1", *extra, check=check, timeout=timeout)


def losses(csv_path: Path) -> dict[int, float]:
    with open(csv_path) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


# ---------------------------------------------------------------------------------------------- recording
@pytest.mark.skipif(not HAVE_PROCGEN, reason="needs the optional record extra (procgen)")
def test_record_is_deterministic_and_lossless(tmp_path):
    args = ["-m", "training.record", "--frames", "120", "--num-envs", "2", "--num-levels", "5",
            "--max-video-frames", "40", "--seed", "3"]
    run(*args, "--out", str(tmp_path / "a"))
    run(*args, "--out", str(tmp_path / "b"))
    va = sorted((tmp_path / "a" / "videos").glob("*.mp4"))
    vb = sorted((tmp_path / "b" / "videos").glob("*.mp4"))
    assert len(va) == len(vb) >= 3
    total = 0
    for a, b in zip(va, vb):
        fa, fb = read_video(a), read_video(b)
        assert np.array_equal(fa, fb)
        meta = json.loads(a.with_suffix(".json").read_text())
        assert meta == json.loads(b.with_suffix(".json").read_text())
        assert len(meta["actions"]) == len(fa) - 1 == len(meta["action_groups"])  # one action per transition
        assert len(meta["rewards"]) == len(meta["terminated"]) == len(fa) - 1
        assert fa.shape[1:] == (64, 64, 3) and len(fa) <= 40
        total += len(fa)
    assert total == 120
    # recording into a folder that already holds videos is refused
    r = run(*args, "--out", str(tmp_path / "a"), check=False)
    assert r.returncode != 0 and "already holds videos" in r.stderr


@pytest.mark.skipif(not HAVE_PROCGEN, reason="needs the optional record extra (procgen)")
def test_record_stores_rewards_and_episode_ends(tmp_path):
    # 5 levels, held actions: within 3,000 frames several episodes end, some with the coin (seed 0)
    run("-m", "training.record", "--frames", "3000", "--num-envs", "4", "--num-levels", "5", "--hold", "8",
        "--out", str(tmp_path / "d"))
    ends, cut = [], 0
    for meta_path in sorted((tmp_path / "d" / "videos").glob("*.json")):
        meta = json.loads(meta_path.read_text())
        assert len(meta["rewards"]) == len(meta["terminated"]) == meta["num_frames"] - 1
        # in CoinRun the only reward is the coin, which ends the episode: never inside a video
        assert sum(meta["rewards"]) == 0 and not any(meta["terminated"])
        if meta["end"] is None:
            cut += 1
            continue
        end = meta["end"]
        assert set(end) == {"action", "reward", "terminated", "truncated"}
        assert end["terminated"] != end["truncated"] and 0 <= end["action"] < 15
        ends.append(end)
    coins = [e for e in ends if e["reward"] > 0]
    assert len(ends) >= 3 and coins and all(e["reward"] == 10.0 and e["terminated"] for e in coins)
    assert any(e["reward"] == 0 and e["terminated"] for e in ends)  # a death
    summary = json.loads((tmp_path / "d" / "dataset.json").read_text())["outcomes"]
    assert summary["terminations"] == sum(e["terminated"] for e in ends)
    assert summary["reward_events"] == len(coins)
    assert summary["transitions"] == 3000 - len(ends) - cut + len(ends)


@pytest.mark.skipif(not HAVE_PROCGEN, reason="needs the optional record extra (procgen)")
def test_record_episode_ends_keeps_the_last_frames_of_each_ended_episode(tmp_path):
    from training.video import read_video

    common = ["--num-envs", "2", "--num-levels", "5", "--hold", "8", "--seed", "1"]
    run("-m", "training.record", "--frames", "2500", *common, "--out", str(tmp_path / "full"))
    run("-m", "training.record", "--frames", "400", "--episode-ends", "6", *common, "--out", str(tmp_path / "ends"))
    assert json.loads((tmp_path / "ends" / "dataset.json").read_text())["episode_ends"] == 6
    full = [p for p in sorted((tmp_path / "full" / "videos").glob("*.json")) if json.loads(p.read_text())["end"]]
    ends = sorted((tmp_path / "ends" / "videos").glob("*.json"))
    assert len(full) >= 5 and len(ends) >= 5
    # the same games: the k-th ended episode's last 6 frames, actions, rewards and end, nothing else
    for f, e in zip(full[:5], ends[:5]):
        mf, me = json.loads(f.read_text()), json.loads(e.read_text())
        n = min(6, mf["num_frames"])
        assert me["num_frames"] == n and me["episode_ends"] == 6 and me["end"] == mf["end"]
        assert me["actions"] == mf["actions"][len(mf["actions"]) - (n - 1):]
        assert me["rewards"] == mf["rewards"][len(mf["rewards"]) - (n - 1):]
        np.testing.assert_array_equal(read_video(e.with_suffix(".mp4")), read_video(f.with_suffix(".mp4"))[-n:])
    # a budget that leaves one frame, too few for a video: the recording stops instead of waiting for room
    run("-m", "training.record", "--frames", "41", "--episode-ends", "2", *common, "--out", str(tmp_path / "odd"),
        timeout=60)
    assert json.loads((tmp_path / "odd" / "dataset.json").read_text())["frames"] == 40


@pytest.mark.skipif(not HAVE_PROCGEN, reason="needs the optional record extra (procgen)")
def test_record_tells_the_time_limit_from_a_termination(tmp_path):
    # seed 5 on 3 levels: within 6,000 frames two episodes run into procgen's 1,000-step limit
    run("-m", "training.record", "--frames", "6000", "--num-envs", "2", "--num-levels", "3", "--seed", "5",
        "--out", str(tmp_path / "d"))
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "d" / "videos").glob("*.json"))]
    truncated = [m for m in metas if m["end"] and m["end"]["truncated"]]
    assert truncated and all(m["num_frames"] == 1000 and not m["end"]["terminated"] for m in truncated)
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["outcomes"]["truncations"] == len(truncated)


@pytest.mark.skipif(not HAVE_PROCGEN, reason="needs the optional record extra (procgen)")
def test_video_encoding_is_lossless_on_game_frames(tmp_path):
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("ignore")
        from procgen import ProcgenGym3Env
    env = ProcgenGym3Env(num=1, env_name="coinrun", start_level=0, num_levels=1, rand_seed=0)
    frames = []
    for _ in range(30):
        frames.append(env.observe()[1]["rgb"][0].copy())
        env.act(np.array([7], np.int32))
    frames = np.stack(frames)
    write_video(tmp_path / "v.mp4", frames)
    assert np.array_equal(read_video(tmp_path / "v.mp4"), frames)  # PSNR = infinity


# ---------------------------------------------------------------------------------------------- dataset
def test_frame_cache_builds_once_and_rebuilds_on_change(tmp_path):
    data = moving_square_videos(tmp_path / "d", n=3, frames=10)
    logs = []
    c1 = FrameCache(data, 16, log=logs.append)
    assert len(c1.videos) == 3 and c1.total_frames == 30 and len(logs) == 1
    FrameCache(data, 16, log=logs.append)
    assert len(logs) == 1  # cached: no second decode
    np.testing.assert_array_equal(c1.clip(1, 2, 3), read_video(data / "videos" / "video_001.mp4")[2:5])
    moving_square_videos(tmp_path / "d", n=4, frames=10, seed=5)  # videos change
    c3 = FrameCache(data, 16, log=logs.append)
    assert len(logs) == 2 and len(c3.videos) == 4


def test_corrupted_shard_is_detected_and_rebuilt(tmp_path):
    data = moving_square_videos(tmp_path / "d", n=2, frames=8)
    c = FrameCache(data, 16, log=lambda *a: None)
    shard = c.cache_dir / c.manifest["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    logs = []
    c2 = FrameCache(data, 16, log=logs.append)
    assert any("corrupted" in m for m in logs)
    np.testing.assert_array_equal(c2.clip(0, 0, 8), read_video(data / "videos" / "video_000.mp4"))


def test_killed_cache_build_is_rebuilt(tmp_path):
    data = moving_square_videos(tmp_path / "d", n=2, frames=8)
    c = FrameCache(data, 16, log=lambda *a: None)
    (c.cache_dir / "manifest.json").unlink()  # what a kill before the manifest leaves
    logs = []
    FrameCache(data, 16, log=logs.append)
    assert logs and "decoding" in logs[0]


def test_bad_datasets(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        FrameCache(tmp_path / "missing")
    (tmp_path / "empty" / "videos").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no .mp4 videos"):
        FrameCache(tmp_path / "empty")
    data = moving_square_videos(tmp_path / "mixed", n=2, frames=3)
    moving_square_videos(tmp_path / "long", n=1, frames=10)
    (tmp_path / "long" / "videos" / "video_000.mp4").rename(data / "videos" / "video_long.mp4")
    (data / "videos" / "zero.mp4").write_bytes(b"")
    (data / "videos" / "text.mp4").write_text("this is not a video")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = FrameCache(data, 16, log=lambda *a: None)
        sampler = ClipSampler(cache, 4)
    messages = [str(w.message) for w in caught]
    assert any("skipped 2 unreadable video(s)" in m and "text.mp4" in m and "zero.mp4" in m for m in messages)
    assert any("skipped 2 video(s) shorter than num_frames=4" in m for m in messages)
    assert sampler.sample(3).shape == (3, 4, 16, 16, 3)
    with pytest.warns(UserWarning, match="skipped 3 video"), \
            pytest.raises(DatasetError, match="no video .* has at least num_frames=20"):
        ClipSampler(cache, 20)


def test_wrong_resolution_videos_are_resized(tmp_path):
    data = moving_square_videos(tmp_path / "d", n=1, frames=5, size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = FrameCache(data, 16, log=lambda *a: None)
    assert cache.clip(0, 0, 5).shape == (5, 16, 16, 3)
    assert any("resized 1 video(s) to 16x16" in str(w.message) for w in caught)


def _write_video_as(path: Path, frames: np.ndarray, pix_fmt: str, codec: str, container: str) -> None:
    """Frames in another pixel format than RGB (PyAV), under an .mp4 name whatever the container."""
    import av

    with av.open(str(path), "w", format=container) as c:
        s = c.add_stream(codec, rate=15)
        s.pix_fmt, s.width, s.height = pix_fmt, frames.shape[2], frames.shape[1]
        fmt = {"bgra": "rgba"}.get(pix_fmt, pix_fmt)
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format=fmt)):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def test_grayscale_and_rgba_videos_are_read_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 16, 16), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (5, 16, 16), dtype=np.uint16)
    rgba = rng.integers(0, 256, (5, 16, 16, 4), dtype=np.uint8)
    vdir = tmp_path / "d" / "videos"
    vdir.mkdir(parents=True)
    _write_video_as(vdir / "a_gray.mp4", gray, "gray", "ffv1", "matroska")
    _write_video_as(vdir / "b_gray16.mp4", gray16, "gray16le", "ffv1", "matroska")
    _write_video_as(vdir / "c_rgba.mp4", rgba, "rgba", "png", "mp4")
    _write_video_as(vdir / "d_bgra.mp4", rgba, "bgra", "ffv1", "matroska")
    cache = FrameCache(tmp_path / "d", 16, log=lambda *a: None)
    assert [v.name for v in cache.videos] == ["a_gray.mp4", "b_gray16.mp4", "c_rgba.mp4", "d_bgra.mp4"]
    clips = [cache.clip(i, 0, 5) for i in range(4)]
    assert all(c.shape == (5, 16, 16, 3) and c.dtype == np.uint8 for c in clips)
    np.testing.assert_array_equal(clips[0], np.repeat(gray[..., None], 3, -1))
    assert np.abs(clips[1].astype(int) - np.repeat(gray16[..., None] / 257, 3, -1)).max() <= 2  # 16 -> 8 bits
    np.testing.assert_array_equal(clips[2], rgba[..., :3])  # alpha dropped, colours kept
    np.testing.assert_array_equal(clips[3], rgba[..., :3])
    assert ClipSampler(cache, 4).sample(3).shape == (3, 4, 16, 16, 3)


def test_train_cli_reports_bad_dataset(tmp_path):
    cfg = tiny_train_config(tmp_path / "c.yaml")
    (tmp_path / "empty").mkdir()
    r = train(cfg, tmp_path / "empty", tmp_path / "run", check=False)
    assert r.returncode == 2 and "no .mp4 videos" in r.stderr


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """All three stages on a tiny config, uninterrupted."""
    tmp = tmp_path_factory.mktemp("run")
    data = moving_square_videos(tmp / "data", n=6, frames=20)
    cfg = tiny_train_config(tmp / "c.yaml")
    r = train(cfg, data, tmp / "run", "--val-data", str(data), "--val-every", "4", "--val-clips", "4")
    return tmp, data, cfg, r


def test_all_stages_produce_loadable_releases(trained_run):
    from genie_env import Genie

    tmp, data, cfg, r = trained_run
    for stage in ("tokenizer", "lam", "dynamics"):
        sdir = tmp / "run" / stage
        assert (sdir / "DONE").is_file(), r.stdout + r.stderr
        model = Genie.from_pretrained(sdir / "release")
        assert model.config.image_size == 16
        assert len(losses(sdir / "metrics.csv")) == {"tokenizer": 6, "lam": 6, "dynamics": 8}[stage]
        assert (sdir / "val_metrics.csv").is_file()
        assert list((sdir / "samples").glob("*.png")) or stage == "lam"
    assert list((tmp / "run" / "dynamics" / "samples").glob("*.gif"))  # rollouts to watch
    assert "release model in" in r.stdout


def test_resume_continues_exactly(trained_run):
    """Stop the dynamics stage after 3 steps, resume: the next losses equal the uninterrupted run's."""
    tmp, data, cfg, _ = trained_run
    out = tmp / "resumed"
    train(cfg, data, out, "--stage", "tokenizer")
    train(cfg, data, out, "--stage", "lam")
    r1 = train(cfg, data, out, "--stage", "dynamics", "--stop-after", "3")
    assert "resume with --resume" in r1.stdout
    assert not (out / "dynamics" / "DONE").exists()
    r2 = train(cfg, data, out, "--stage", "dynamics", "--resume")
    assert "resuming from" in r2.stdout and "at step 3" in r2.stdout
    ref = losses(tmp / "run" / "dynamics" / "metrics.csv")
    got = losses(out / "dynamics" / "metrics.csv")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == ref[step], (step, got[step], ref[step])


def test_init_part_takes_one_part_from_another_release(trained_run, tmp_path):
    """Fine-tune the dynamics on a different tokenizer: --init-part swaps one part in."""
    import torch
    from safetensors.torch import load_file

    tmp, data, cfg, _ = trained_run
    other = tmp_path / "other"
    train(cfg, data, other, "--stage", "tokenizer", "seed=7")
    run_dir = tmp / "run"
    out = tmp_path / "finetune"
    train(cfg, data, out, "--stage", "dynamics", "--init-from", str(run_dir / "dynamics" / "release"),
          "--init-part", f"tokenizer={other / 'tokenizer' / 'release'}", "--stop-after", "1")
    got = load_file(str(out / "dynamics" / "release" / "model.safetensors"))
    want_tok = load_file(str(other / "tokenizer" / "release" / "model.safetensors"))
    old_tok = load_file(str(run_dir / "tokenizer" / "release" / "model.safetensors"))
    keys = [k for k in want_tok if k.startswith("tokenizer.")]
    assert keys and all(torch.equal(got[k], want_tok[k]) for k in keys)  # frozen in this stage
    assert not all(torch.equal(want_tok[k], old_tok[k]) for k in keys)
    # Parts given only by --init-part, in a fresh folder: no warning that they are missing.
    fresh = train(cfg, data, tmp_path / "fresh", "--stage", "dynamics", "--stop-after", "1",
                  "--init-part", f"tokenizer={other / 'tokenizer' / 'release'}",
                  "--init-part", f"latent_actions={run_dir / 'dynamics' / 'release'}")
    log = fresh.stdout + fresh.stderr
    assert "tokenizer from" in log and "latent_actions from" in log
    assert "no trained tokenizer found" not in log and "no latent action model trained yet" not in log
    bad = train(cfg, data, tmp_path / "bad", "--stage", "dynamics", "--init-part", "tokeniser=x", check=False)
    assert bad.returncode == 2 and "expected PART=FOLDER with PART one of tokenizer" in bad.stderr
    bad = train(cfg, data, tmp_path / "bad2", "--stage", "dynamics", "--init-part", f"tokenizer={tmp_path}",
                check=False)
    assert bad.returncode == 2 and "is not a release folder" in bad.stderr


def test_dynamics_body_starts_a_dynamics_for_a_new_vocabulary(trained_run, tmp_path):
    """--init-part dynamics-body=REL: a dynamics for a tokenizer with another codebook starts from the
    release's dynamics, its vocabulary-sized embedding and output layer carried over to the new codes."""
    import torch
    from safetensors.torch import load_file

    from genie_env import Genie

    tmp, data, cfg, _ = trained_run
    run_dir = tmp / "run"
    base_vocab = Genie.from_pretrained(run_dir / "dynamics" / "release").config.tokenizer_vocab_size
    vocab = base_vocab * 2
    other = tmp_path / "other"
    train(cfg, data, other, "--stage", "tokenizer", f"tokenizer_vocab_size={vocab}")
    out = tmp_path / "body"
    r = train(cfg, data, out, "--stage", "dynamics", "--stop-after", "1",
              "--init-part", f"tokenizer={other / 'tokenizer' / 'release'}",
              "--init-part", f"latent_actions={run_dir / 'dynamics' / 'release'}",
              "--init-part", f"dynamics-body={run_dir / 'dynamics' / 'release'}",
              f"tokenizer_vocab_size={vocab}", "stages.dynamics.learning_rate=0")
    assert "but token_emb.weight, head.weight, head.bias, which are carried over" in r.stdout
    assert "dynamics vocabulary carried over" in r.stdout
    got = load_file(str(out / "dynamics" / "release" / "model.safetensors"))
    src = load_file(str(run_dir / "dynamics" / "release" / "model.safetensors"))
    body = [k for k in src if k.startswith("dynamics.") and not k.startswith(("dynamics.token_emb", "dynamics.head"))]
    assert body and all(torch.equal(got[k].float(), src[k].float()) for k in body)  # learning rate 0: as loaded
    assert got["dynamics.head.weight"].shape[0] == vocab and src["dynamics.head.weight"].shape[0] == base_vocab
    # the output layer carried over (training.transplant): each new code's row is one of the old codes' rows
    rows = (got["dynamics.head.weight"].float()[:, None] == src["dynamics.head.weight"].float()[None]).all(-1)
    assert bool(rows.any(1).all())
    # Given with the whole dynamics, or to another stage, or from another architecture: refused, with why.
    release = run_dir / "dynamics" / "release"
    bad = train(cfg, data, tmp_path / "bad", "--stage", "dynamics", "--init-from", str(release),
                "--init-part", f"dynamics-body={release}", check=False)
    assert bad.returncode == 2 and "give one of the two" in bad.stderr
    bad = train(cfg, data, tmp_path / "bad2", "--stage", "lam",
                "--init-part", f"dynamics-body={run_dir / 'dynamics' / 'release'}", check=False)
    assert bad.returncode == 2 and "starts a dynamics stage" in bad.stderr
    bad = train(cfg, data, tmp_path / "bad3", "--stage", "dynamics",
                "--init-part", f"dynamics-body={run_dir / 'dynamics' / 'release'}", "dynamics_depth=1", check=False)
    assert bad.returncode == 2 and "beyond the vocabulary" in bad.stderr


def test_existing_run_needs_resume_flag(trained_run):
    tmp, data, cfg, _ = trained_run
    r = train(cfg, data, tmp / "run", "--stage", "dynamics", check=False)
    assert r.returncode == 2 and "pass --resume" in r.stderr


def test_evaluate_cli_writes_every_metric(trained_run):
    tmp, data, _, _ = trained_run
    out = tmp / "eval.json"
    r = run("-m", "training.evaluate", "--checkpoint", str(tmp / "run" / "dynamics" / "release"), "--data",
            str(data), "--clips", "4", "--json", str(out), "--threads", "1", "--no-bf16")
    res = json.loads(out.read_text())
    for key in ("tokenizer_psnr", "codebook_usage", "latent_action_perplexity", "action_nmi", "rollout_psnr@4",
                "pixel_copy_psnr@4", "codec_copy_psnr@4", "gain_over_copy@4", "rollout_psnr@15",
                "pixel_copy_psnr@15", "codec_copy_psnr@15", "delta_t_psnr@4", "maskgit_steps", "clips", "threads"):
        assert key in res, key
    assert res["clips"] == 4 and 0 <= res["action_nmi"] <= 1
    assert "rollout_psnr@4" in r.stdout


def test_bad_config_values_are_named(tmp_path):
    data = moving_square_videos(tmp_path / "d", n=2, frames=6)
    cfg = tiny_train_config(tmp_path / "c.yaml")
    r = train(cfg, data, tmp_path / "run", "dynamics_dim=-4", check=False)
    assert r.returncode == 2 and "dynamics_dim must be in" in r.stderr
    r = train(cfg, data, tmp_path / "run", "stages.dynamics.dynamics_dim=64", check=False)
    assert r.returncode == 2 and "stages.dynamics cannot set dynamics_dim" in r.stderr


def test_numbers_in_exponent_notation_are_numbers(tmp_path):
    """learning_rate: 1e-3 is a float in a config file and in an override (YAML 1.1 would make a string of it
    and the run would stop with 'learning_rate must be a number')."""
    from genie_env import GenieConfig
    from training.train import load_run_config

    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 2e-4\nseed: 7\nstages:\n  tokenizer:\n    learning_rate: 1e-3\n")
    cfg, stages = load_run_config(path, ["stages.lam.learning_rate=5E-5", "warmup_steps=10"])
    assert cfg.learning_rate == 2e-4 and isinstance(cfg.learning_rate, float)
    assert stages["tokenizer"]["learning_rate"] == 1e-3 and stages["lam"]["learning_rate"] == 5e-5
    assert cfg.seed == 7 and isinstance(cfg.seed, int) and cfg.warmup_steps == 10
    (tmp_path / "model.yaml").write_text("learning_rate: 1e-3\n")
    assert GenieConfig.from_yaml(tmp_path / "model.yaml").learning_rate == 1e-3


def test_nan_loss_stops_naming_last_checkpoint(tmp_path, monkeypatch):
    import torch

    from training import train as train_mod

    data = moving_square_videos(tmp_path / "d", n=2, frames=6)
    cfg = tiny_train_config(tmp_path / "c.yaml")
    real = train_mod.StageModule.forward
    calls = {"n": 0}

    def poisoned(self, frames):
        loss, m = real(self, frames)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 4 else loss), m

    monkeypatch.setattr(train_mod.StageModule, "forward", poisoned)
    args = train_mod.parse_args(["--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "run"),
                                 "--stage", "tokenizer", "--no-progress", "--checkpoint-every", "2", "--threads", "1"])
    msg = r"loss became nan at step 4; the last good checkpoint is .*checkpoint.pt"
    with pytest.raises(FloatingPointError, match=msg):
        train_mod.Trainer(args, log=lambda *a: None).run()
    torch.set_num_threads(os.cpu_count() or 1)
    ck = torch.load(tmp_path / "run" / "tokenizer" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4


def _wait_for(pred, timeout=120):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.2)


def test_sigterm_saves_and_second_run_is_refused(tmp_path):
    data = moving_square_videos(tmp_path / "d", n=2, frames=6)
    cfg = tiny_train_config(tmp_path / "c.yaml", tokenizer={"max_steps": 100000, "epochs": 1000000})
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "training.train", "--config", str(cfg), "--data", str(data), "--out",
                          str(out), "--stage", "tokenizer", "--no-progress", "--log-every", "1", "--threads", "1"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        csv = out / "tokenizer" / "metrics.csv"
        _wait_for(lambda: csv.is_file() and len(losses(csv)) > 3)
        second = train(cfg, data, out, "--stage", "tokenizer", "--resume", check=False)
        assert second.returncode == 2 and "another training run" in second.stderr
        p.send_signal(signal.SIGTERM)
        stdout, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0
    assert "SIGTERM received" in stdout and "resume with --resume" in stdout
    import torch

    ck = torch.load(out / "tokenizer" / "checkpoint.pt", weights_only=True)
    assert ck["step"] >= 3


def test_two_processes_with_gloo(tmp_path):
    data = moving_square_videos(tmp_path / "d", n=4, frames=8)
    cfg = tiny_train_config(tmp_path / "c.yaml", tokenizer={"max_steps": 3})
    r = run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m", "training.train",
            "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "run"), "--stage", "tokenizer",
            "--no-progress", "--log-every", "1", timeout=300)
    assert (tmp_path / "run" / "tokenizer" / "DONE").read_text().strip() == "3", r.stdout + r.stderr
    rows = losses(tmp_path / "run" / "tokenizer" / "metrics.csv")
    assert sorted(rows) == [1, 2, 3]  # written once, by rank 0
    import torch

    ck = torch.load(tmp_path / "run" / "tokenizer" / "checkpoint.pt", weights_only=True)
    assert isinstance(ck["sampler"], list) and len(ck["sampler"]) == 2  # each rank's sampler state
