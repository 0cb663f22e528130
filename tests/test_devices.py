"""Every path on every device present (CI has only a CPU; on a machine with CUDA each test also runs
there): the model's seed API, the env and the vector env with autoreset, the viewer, evaluation, each
training stage with bf16 autocast, pre-tokenising and the speed tools. What is checked is that each runs
where it is asked to, keeps its tensors there and gives the host numpy arrays, and stays seeded."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import DEVICES, tiny_model, write_tiny_checkpoint
from gymnasium.utils.env_checker import check_env
from test_training import moving_square_videos, run, tiny_train_config, train

from genie_env.env import GenieEnv

pytestmark = pytest.mark.parametrize("device", DEVICES)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("devices") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Videos, or where no video codec is installed (a GPU image without PyAV) the same kind of frames
    in a frames file, which every stage and evaluation read alike."""
    folder = tmp_path_factory.mktemp("devices")
    try:
        import av  # noqa: F401
    except ImportError:
        from training.pretokenized import ArraySource, write_frames_file

        rng = np.random.default_rng(0)
        clips = [np.repeat(rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8), 20, 0) for _ in range(3)]
        for c in clips:  # a square moving right
            for t in range(20):
                c[t, 4:8, t % 12 : t % 12 + 4] = (250, 200, 30)
        return write_frames_file(ArraySource(clips, folder), folder / "data.frames.safetensors")
    return moving_square_videos(folder / "data", n=3, frames=20)


def test_seed_api_runs_on_the_device(device):
    model = tiny_model().to(device)
    model.autocast_dtype = torch.bfloat16
    prompt = torch.rand(2, 3, 16, 16, device=device)
    outs = [model.generate(prompt, 4, generator=torch.Generator(device=device).manual_seed(3)) for _ in range(2)]
    assert outs[0].device.type == device and torch.equal(outs[0], outs[1])  # seeded on the device
    assert model.infer_actions(outs[0]).device.type == device
    tokens = model.tokenize(outs[0])
    assert tokens.device.type == device and model.detokenize(tokens).shape == (2, 3, 4, 16, 16)
    assert model.play(prompt, torch.tensor([1, 2]), generator=torch.Generator(device=device)).device.type == device
    session = model.start(prompt)
    session.step(torch.tensor([0, 1], device=device))
    session.reset_rows(torch.tensor([1]), prompt[:1])  # rows on the host, cache on the device
    assert session.step(torch.tensor([2, 3])).device.type == device  # host actions are moved


def test_cached_play_equals_recompute_on_the_device(device):
    model = tiny_model().to(device)
    dyn = model.dynamics
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, 32, (2, 3, dyn.num_tokens), device=device, generator=g)
    actions = torch.randint(0, 8, (2, 2), device=device, generator=g)
    full = dyn(tokens, actions, torch.zeros(2, 2, dyn.num_tokens, dtype=torch.bool, device=device))
    cache = dyn.new_cache(2, device=device)
    dyn.step(cache, tokens[:, 0], torch.full((2,), dyn.null_action, device=device), commit=True)
    dyn.step(cache, tokens[:, 1], actions[:, 0], commit=True)
    step = dyn.step(cache, tokens[:, 2], actions[:, 1])
    assert torch.allclose(step, full[:, 1], atol=1e-4)


def test_env_passes_check_env_on_the_device(device, ckpt):
    env = GenieEnv(ckpt, device=device)
    assert env.model.device.type == device
    check_env(env, skip_render_check=True)
    obs = [env.reset(seed=5)[0]] + [env.step(a)[0] for a in (1, 2, 3)]
    again = [env.reset(seed=5)[0]] + [env.step(a)[0] for a in (1, 2, 3)]
    assert all(isinstance(o, np.ndarray) and o.dtype == np.uint8 for o in obs)
    assert all(np.array_equal(a, b) for a, b in zip(obs, again))


def test_vector_env_autoresets_on_the_device(device, ckpt):
    envs = gym.make_vec("Genie-v0", num_envs=3, vectorization_mode="vector_entry_point", checkpoint=ckpt,
                        device=device, max_episode_steps=2)
    bank = np.load(ckpt / "prompts.npz")["frames"]
    envs.reset(seed=1)
    acts = np.array([1, 2, 3])
    envs.step(acts)
    _, _, _, trunc, _ = envs.step(acts)
    obs, rew, _, _, info = envs.step(acts)  # the autoreset step
    assert trunc.all() and info["step"].tolist() == [0, 0, 0] and (rew == 0).all()
    assert all(any(np.array_equal(o, b) for b in bank) for o in obs)
    assert envs.unwrapped.model.device.type == device
    envs.close()


def test_viewer_runs_on_the_device(device, ckpt, tmp_path, monkeypatch):
    pytest.importorskip("pygame")
    from genie_env.viewer import main

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    assert main(["--checkpoint", str(ckpt), "--headless", "--steps", "3", "--device", device,
                 "--record", str(tmp_path / "run.gif")]) == 0
    assert (tmp_path / "run.gif").is_file()


def test_evaluate_runs_on_the_device(device, ckpt, data, tmp_path):
    out = tmp_path / "eval.json"
    run("-m", "training.evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--clips", "2", "--json",
        str(out), "--threads", "1", "--device", device, "--strip", str(tmp_path / "strip.png"))
    res = json.loads(out.read_text())
    assert res["device"].startswith(device) and np.isfinite(res["rollout_psnr@4"])
    assert (tmp_path / "strip.png").is_file()


def test_each_stage_trains_on_the_device_with_bf16(device, data, tmp_path):
    """All three stages, bf16 autocast, validation (rollouts, sample images) included."""
    cfg = tiny_train_config(tmp_path / "c.yaml", tokenizer={"max_steps": 2}, lam={"max_steps": 2},
                            dynamics={"max_steps": 2, "cotrain_lam": True})
    train(cfg, data, tmp_path / "run", "--device", device, "--val-data", str(data), "--val-clips", "2", "bf16=true")
    for stage in ("tokenizer", "lam", "dynamics"):
        assert (tmp_path / "run" / stage / "DONE").is_file()
    # resume state carries the device's random state
    state = torch.load(tmp_path / "run" / "dynamics" / "checkpoint.pt", weights_only=True)
    assert (state["cuda_rng"] is not None) == (device == "cuda")


def test_pretokenize_and_train_from_tokens_on_the_device(device, ckpt, data, tmp_path):
    tokens = tmp_path / "d.tokens.safetensors"
    run("-m", "training.pretokenize", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tokens),
        "--device", device, "--threads", "1")
    cfg = tiny_train_config(tmp_path / "c.yaml", dynamics={"max_steps": 2, "cotrain_lam": False})
    train(cfg, tokens, tmp_path / "run", "--device", device, "--stage", "dynamics", "--init-from", str(ckpt))
    assert (tmp_path / "run" / "dynamics" / "DONE").is_file()


def test_speed_tools_run_on_the_device(device, ckpt, tmp_path):
    from genie_env import benchmark
    from training.throughput import measure, measure_inputs

    out = tmp_path / "bench.json"
    assert benchmark.main(["--checkpoint", str(ckpt), "--batch-sizes", "2", "--episode-steps", "12", "--reps", "2",
                           "--threads", "1", "--device", device, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["vector_env_steps_per_s"]["2"] > 0 and (res["device"] == "cpu") == (device == "cpu")
    cfg = tiny_train_config(tmp_path / "c.yaml")
    assert measure("tokenizer", cfg, True, 1, device)["frames_per_s"] > 0
    rows = measure_inputs(cfg, True, 1, device)
    assert [r["input"] for r in rows] == ["frames", "tokens"] and all(r["frames_per_s"] > 0 for r in rows)

