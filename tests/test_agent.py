"""The dream agent: its policy network and files, PPO's advantages under NEXT_STEP autoreset, training in the
dream on a tiny model, and the real-game evaluation (metric 9)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genie_env import GenieVectorEnv
from genie_env.agent import AgentConfig, DreamAgent, load_agent
from training.evaluate_agent import real_actions_for, summarize
from training.train_agent import AgentArgs, AgentTrainer, gae

try:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import procgen  # noqa: F401
    HAVE_PROCGEN = True
except ImportError:
    HAVE_PROCGEN = False


def test_agent_files_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    agent = DreamAgent(AgentConfig(actions=[1, 2, 5], action_names=["LEFT", "RIGHT", "RIGHT+UP"], image_size=16))
    agent.save(tmp_path)
    back = load_agent(tmp_path)
    assert back.config == agent.config
    for k, v in agent.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    obs = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    assert set(back.act(obs).tolist()) <= {1, 2, 5}  # latent ids, not policy indices
    assert np.array_equal(back.act(obs, deterministic=True), agent.act(obs, deterministic=True))
    with pytest.raises(ValueError, match=r"obs must be \(batch, 16, 16, 3\)"):
        back.act(obs[0])
    with pytest.raises(FileNotFoundError, match="no agent in"):
        load_agent(tmp_path / "nothing")
    with pytest.raises(ValueError, match="must not repeat"):
        AgentConfig(actions=[1, 1])


def test_gae_under_next_step_autoreset():
    # one env, 5 steps: step 1 terminates, step 2 only restarts (invalid), step 4 is truncated
    r = np.array([[0.0], [1.0], [0.0], [0.0], [2.0]])
    v = np.array([[0.5], [0.6], [9.0], [0.2], [0.3]])      # V(obs each action was chosen on)
    nv = np.array([[0.6], [9.0], [0.2], [0.3], [0.7]])     # V(obs each step returned)
    term = np.array([[0.0], [1.0], [0.0], [0.0], [0.0]])
    done = np.array([[0.0], [1.0], [0.0], [0.0], [1.0]])
    valid = np.array([[True], [True], [False], [True], [True]])
    g, lam = 0.9, 0.5
    adv = gae(r, v, nv, term, done, valid, g, lam)[:, 0]
    a4 = 2.0 + g * 0.7 - 0.3                  # truncated: bootstraps from its final frame
    a3 = 0.0 + g * 0.3 - 0.2 + g * lam * a4
    a1 = 1.0 - 0.6                            # terminated: no bootstrap, no carry from the restart step
    a0 = 0.0 + g * 0.6 - 0.5 + g * lam * a1
    assert np.allclose(adv, [a0, a1, 0.0, a3, a4])


def test_ppo_in_the_dream_learns_a_rewarded_action(tiny_checkpoint, tmp_path):
    # the reward is 1 for latent action 2 (RIGHT in the tiny checkpoint's action map), 0 otherwise
    args = AgentArgs(out=tmp_path / "agent", checkpoint=str(tiny_checkpoint), steps=16 * 8 * 12, num_envs=16,
                     rollout=8, episode_steps=10, learning_rate=3e-3, entropy=0.0, seed=0, threads=1)
    trainer = AgentTrainer(args, log=lambda *a: None, reward_fn=lambda prev, a, obs: float(a == 2))
    agent = trainer.run()
    assert agent.config.action_names == ["NONE", "LEFT", "RIGHT", "UP", "LEFT+UP", "RIGHT+UP"]
    # judged on frames of the dream it learned in (random noise images are outside what it saw)
    envs = GenieVectorEnv(16, str(tiny_checkpoint))
    obs = [envs.reset(seed=1)[0]]
    for _ in range(3):
        obs.append(envs.step(np.random.default_rng(2).integers(0, 8, 16))[0])
    with torch.no_grad():
        p = torch.softmax(agent(torch.from_numpy(np.concatenate(obs)))[0], -1)[:, agent.config.actions.index(2)]
    assert p.mean() > 0.6  # 1/6 before training
    rows = (tmp_path / "agent" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 and rows[0].startswith("step,update")
    back = load_agent(tmp_path / "agent")
    assert torch.equal(back.policy.weight, agent.policy.weight)
    # a finished run is not overwritten by accident
    with pytest.raises(RuntimeError, match="--resume"):
        AgentTrainer(args, log=lambda *a: None, reward_fn=lambda prev, a, obs: 0.0).run()


def test_success_intervals():
    res = [{"return": 10.0, "success": True, "length": 5}] * 3 + [{"return": 0.0, "success": False, "length": 9}] * 7
    s = summarize(res)
    assert s["episodes"] == 10 and s["mean_return"] == 3.0 and s["success_rate"] == 0.3
    lo, hi = s["success_ci95"]
    assert 0.10 < lo < 0.11 and 0.60 < hi < 0.61  # Wilson interval for 3 of 10
    lo, hi = s["return_ci95"]
    assert lo < 3.0 < hi and hi - 3.0 == pytest.approx(1.96 * np.std([10] * 3 + [0] * 7, ddof=1) / np.sqrt(10))


def test_latent_actions_go_to_the_real_buttons_of_their_key_group():
    combos = [("LEFT", "DOWN"), ("LEFT",), ("LEFT", "UP"), ("DOWN",), (), ("UP",), ("RIGHT", "DOWN"), ("RIGHT",),
              ("RIGHT", "UP"), ("D",), ("A",), ("W",), ("S",), ("Q",), ("E",)]  # procgen's order
    agent = DreamAgent(AgentConfig(actions=[6, 0, 1, 3, 5, 7], image_size=16,
                                   action_names=["NONE", "LEFT", "RIGHT", "UP", "LEFT+UP", "RIGHT+UP"]))
    assert real_actions_for(agent, combos) == {6: 4, 0: 1, 1: 7, 3: 5, 5: 2, 7: 8}
    agent.config.action_names[0] = "JUMP"
    with pytest.raises(ValueError, match="no action for key group 'JUMP'"):
        real_actions_for(agent, combos)


@pytest.mark.skipif(not HAVE_PROCGEN, reason="needs the optional record extra (procgen)")
def test_evaluate_agent_command_on_the_real_game(tmp_path):
    import subprocess
    import sys

    agent = DreamAgent(AgentConfig(actions=[0, 1, 3], action_names=["LEFT", "RIGHT", "RIGHT+UP"]))
    agent.save(tmp_path / "ag")
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "training.evaluate_agent", "--agent", str(tmp_path / "ag"),
                        "--start-level", "2000000", "--num-levels", "3", "--json", str(out), "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for name in ("agent", "random"):
        assert res[name]["episodes"] == 3
        assert [x["level"] for x in res[name]["per_level"]] == [2000000, 2000001, 2000002]
        assert all(0 < x["length"] <= 1000 for x in res[name]["per_level"])
        assert f"{name:>6}: mean return" in r.stdout
    assert set(res["latent_to_real"]) == {"0", "1", "3"}


def test_training_in_a_dream_without_reward_heads_is_refused(tiny_checkpoint, tmp_path):
    args = AgentArgs(out=tmp_path / "agent", checkpoint=str(tiny_checkpoint), steps=64, num_envs=2, rollout=4)
    with pytest.raises(ValueError, match="predicts no reward or episode end"):
        AgentTrainer(args, log=lambda *a: None).run()


def test_dream_episodes_end_where_the_heads_say(tmp_path):
    from conftest import write_tiny_checkpoint
    from test_outcomes import force_heads

    from genie_env import Genie

    folder = write_tiny_checkpoint(tmp_path / "c", outcome_input="tokens")
    model = force_heads(Genie.from_pretrained(folder), reward=10.0)
    model.save_pretrained(folder, extra_files={n: folder / n for n in ("prompts.npz", "action_map.json")})
    args = AgentArgs(out=tmp_path / "agent", checkpoint=str(folder), steps=2 * 8 * 2, num_envs=2, rollout=8,
                     episode_steps=50, threads=1)
    AgentTrainer(args, log=lambda *a: None).run()
    import csv

    rows = list(csv.DictReader(open(tmp_path / "agent" / "metrics.csv")))
    # every game step is a coin that ends the episode; every other step only restarts it (not counted)
    assert [float(r["terminations_per_1000"]) for r in rows] == [1000.0, 1000.0]
    assert [float(r["rewards_per_1000"]) for r in rows] == [1000.0, 1000.0]
    assert all(float(r["mean_return"]) == 10.0 and float(r["mean_length"]) == 1.0 for r in rows)


def test_codec_view_shows_frames_as_the_tokenizer_rebuilds_them(tiny):
    from training.evaluate_agent import codec_view

    obs = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    seen = codec_view(tiny)(obs)
    assert seen.shape == obs.shape and seen.dtype == np.uint8
    x = torch.from_numpy(obs).permute(0, 3, 1, 2).float().div(255)[:, :, None]
    with torch.no_grad():
        want = tiny.detokenize(tiny.tokenize(x))[:, :, 0].clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1)
    assert np.array_equal(seen, want.numpy()) and not np.array_equal(seen, obs)


def test_the_shipped_agent_loads_and_acts_through_the_shipped_action_map():
    from genie_env.hub import default_weights_dir

    agent = load_agent()
    amap = json.loads((default_weights_dir() / "action_map.json").read_text())
    assert {amap[name] for name in agent.config.action_names} == set(agent.config.actions)
    assert all(amap[name] == a for name, a in zip(agent.config.action_names, agent.config.actions))
    obs = np.zeros((2, 64, 64, 3), np.uint8)
    assert set(agent.act(obs).tolist()) <= set(agent.config.actions)
