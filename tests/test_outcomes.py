"""Reward and episode-end heads: the loss learns, checkpoints with and without heads load, the env and
the vector env return what the heads predict, the reward stage reads outcomes from the right transition,
and metric 8's helpers count right."""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import tiny_model, write_tiny_checkpoint
from gymnasium.utils.env_checker import check_env
from test_training import run

from genie_env import Genie, GenieEnv, GenieVectorEnv
from training.data import FrameCache, OutcomeSampler
from training.outcomes import FeaturePool, Strata, best_thresholds, dream_event_rates, precision_recall


def force_heads(model: Genie, reward: float = 10.0, fire: bool = True) -> Genie:
    """Make both heads fire (or never fire) whatever they see."""
    assert model.outcomes is not None
    last = model.outcomes.out[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(50.0 if fire else -50.0)
        model.outcomes.event_reward.fill_(reward)
    return model


@pytest.mark.parametrize("inp", ["hidden", "tokens", "tokens2"])
def test_outcome_loss_falls_on_tiny_batch(inp):
    model = tiny_model(outcome_input=inp[:6], outcome_frames=2 if inp == "tokens2" else 1)
    torch.manual_seed(0)
    frames = torch.rand(8, 3, 3, 16, 16)
    actions = torch.randint(0, 8, (8, 3))
    targets = torch.tensor([[1.0, 1.0], [0, 1], [0, 0], [0, 0], [1, 1], [0, 0], [0, 1], [0, 0]])
    weights = torch.ones(8)
    with torch.no_grad():
        feats = model.outcome_features(frames, actions)
    opt = torch.optim.Adam(model.outcomes.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, logs = model.outcomes.loss(feats, actions[:, -1], targets, weights, pos_weight=2.0)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    assert set(logs) >= {"reward_bce", "terminated_bce"}


def test_features_are_what_a_session_computes():
    model = tiny_model(outcome_input="hidden")
    x = torch.rand(2, 3, 3, 16, 16)
    acts = torch.tensor([[1, 2, 5], [0, 3, 4]])
    with torch.no_grad():
        expected = model.outcomes.probabilities(model.outcome_features(x, acts), acts[:, -1])
    session = model.start(x)  # primes with the actions the latent action model infers
    with torch.no_grad():
        inferred = model.latent_actions.infer(x)
        expected_inferred = model.outcomes.probabilities(
            model.outcome_features(x, torch.cat([inferred, acts[:, -1:]], 1)), acts[:, -1])
    session.step(acts[:, -1])
    torch.testing.assert_close(session.last_outcomes, expected_inferred)
    assert not torch.allclose(expected, expected_inferred) or torch.equal(inferred, acts[:, :2])


def test_two_frame_heads_read_the_frame_before_as_a_session_does():
    model = tiny_model(outcome_input="tokens", outcome_frames=2)
    x = torch.rand(2, 3, 3, 16, 16)
    acts = torch.tensor([[1, 2, 5], [0, 3, 4]])
    with torch.no_grad():
        feats = model.outcome_features(x, acts)
        tokens = model.tokenize(x).flatten(2)  # (b, T, n)
    assert torch.equal(feats, tokens[:, 1:])  # frames t-1 and t
    session = model.start(x)
    session.step(acts[:, -1])
    with torch.no_grad():
        torch.testing.assert_close(session.last_outcomes, model.outcomes.probabilities(feats, acts[:, -1]))
        # the next step reads the prompt's last frame and the frame just generated
        generated = session.last_tokens.clone()
        session.step(acts[:, 0])
        want = model.outcomes.probabilities(torch.stack([tokens[:, -1], generated], 1), acts[:, 0])
    torch.testing.assert_close(session.last_outcomes, want)
    # the frame before matters: the heads give other probabilities when it changes
    with torch.no_grad():
        other = model.outcomes.probabilities(torch.stack([tokens[:, 0], generated], 1), acts[:, 0])
    assert not torch.allclose(other, want)
    # a one-frame prompt: frame t stands in for frame t-1 (as outcome_features repeats it)
    session = model.start(x[:, :, :1])
    session.step(acts[:, 0])
    with torch.no_grad():
        want = model.outcomes.probabilities(model.outcome_features(x[:, :, :1], acts[:, :1]), acts[:, 0])
    torch.testing.assert_close(session.last_outcomes, want)


def test_checkpoint_with_heads_round_trips_and_one_without_loads(tmp_path):
    model = force_heads(tiny_model(outcome_input="hidden"), reward=7.5)
    model.save_pretrained(tmp_path / "with")
    back = Genie.from_pretrained(tmp_path / "with")
    assert back.outcomes is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert float(back.outcomes.event_reward) == 7.5
    tiny_model().save_pretrained(tmp_path / "without")
    old = Genie.from_pretrained(tmp_path / "without")
    assert old.outcomes is None
    assert "outcome_input" in json.loads((tmp_path / "without" / "config.json").read_text())
    cfg = json.loads((tmp_path / "without" / "config.json").read_text())
    for k in ("outcome_input", "outcome_dim", "outcome_end_fraction", "outcome_pos_weight"):
        del cfg[k]  # a checkpoint written before the heads existed
    (tmp_path / "without" / "config.json").write_text(json.dumps(cfg))
    assert Genie.from_pretrained(tmp_path / "without").outcomes is None


def test_env_returns_what_the_heads_predict_and_reward_fn_overrides(tmp_path):
    firing = force_heads(tiny_model(outcome_input="hidden"))
    ckpt = write_tiny_checkpoint(tmp_path / "c", outcome_input="hidden")
    env = GenieEnv(ckpt)
    env.model = firing  # same config and files
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(1)
    assert (reward, terminated, truncated) == (10.0, True, False)
    assert info["reward_probability"] > 0.99 and info["termination_probability"] > 0.99
    env = GenieEnv(model=firing, reward_fn=lambda prev, a, obs: -1.0)
    env.prompt_bank = GenieEnv(ckpt).prompt_bank
    env.reset(seed=0)
    _, reward, terminated, _, _ = env.step(1)
    assert (reward, terminated) == (-1.0, True)
    silent = GenieEnv(model=force_heads(tiny_model(outcome_input="hidden"), fire=False))
    silent.prompt_bank = env.prompt_bank
    silent.reset(seed=0)
    _, reward, terminated, _, info = silent.step(1)
    assert (reward, terminated) == (0.0, False) and info["termination_probability"] < 0.01
    plain = GenieEnv(write_tiny_checkpoint(tmp_path / "plain"))
    plain.reset(seed=0)
    _, reward, terminated, _, info = plain.step(1)
    assert (reward, terminated) == (0.0, False) and "termination_probability" not in info


def test_env_with_heads_is_deterministic_and_check_env_clean(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "c", outcome_input="tokens")
    runs = []
    for _ in range(2):
        env = GenieEnv(ckpt)
        env.reset(seed=3)
        runs.append([(r, t, i["reward_probability"], i["termination_probability"])
                     for _, r, t, _, i in (env.step(a) for a in [1, 5, 2, 0])])
    assert runs[0] == runs[1]
    assert len({p for *_, p in runs[0]}) > 1  # the heads see the frames: probabilities move
    env = gym.make("Genie-v0", checkpoint=str(ckpt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught if "gymnasium" in str(w.filename) or "env" in str(w.message)] == []


def test_vector_env_terminates_and_autoresets_from_a_new_prompt(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "c", n_prompts=50, outcome_input="hidden")
    envs = GenieVectorEnv(3, ckpt)
    force_heads(envs.model)
    obs0, _ = envs.reset(seed=0)
    obs1, r, term, trunc, info = envs.step(np.array([1, 2, 3]))
    assert term.all() and not trunc.any() and (r == 10.0).all()
    assert (info["termination_probability"] > 0.99).all()
    obs2, r, term, trunc, info = envs.step(np.array([1, 2, 3]))  # NEXT_STEP autoreset: new prompts
    assert not term.any() and (r == 0).all() and (info["step"] == 0).all()
    bank = envs.prompt_bank
    for i in range(3):
        assert any(np.array_equal(obs2[i], b) for b in bank)
    assert any(not np.array_equal(obs2[i], obs0[i]) for i in range(3))  # drawn anew, not the first prompt
    with torch.no_grad():
        envs.model.outcomes.out[-1].bias.fill_(-50.0)
    _, r, term, _, _ = envs.step(np.array([1, 2, 3]))
    assert not term.any() and (r == 0).all()
    envs.close()


def test_vector_env_reward_fn_overrides_and_seed_determinism(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "c", outcome_input="tokens")
    outs = []
    for _ in range(2):
        envs = GenieVectorEnv(4, ckpt, max_episode_steps=50)
        envs.reset(seed=5)
        outs.append([envs.step(np.array([0, 3, 5, 7]))[4]["termination_probability"] for _ in range(3)])
    np.testing.assert_array_equal(np.stack(outs[0]), np.stack(outs[1]))
    envs = GenieVectorEnv(2, model=force_heads(tiny_model(outcome_input="tokens")),
                          reward_fn=lambda prev, a, obs: 2.0)
    envs.reset(seed=0, options={"prompt": np.zeros((16, 16, 3), np.uint8)})
    _, r, term, _, _ = envs.step(np.array([0, 1]))
    assert (r == 2.0).all() and term.all()


def _outcome_videos(folder, n=3, frames=10, episode_ends=0):
    """Videos whose frame i has brightness 10 * i + video; episode ends with a coin (video 0), a death
    (video 1) or none (cut, video 2). ``episode_ends``: marked as a recording of episode endings only."""
    from training.video import write_video

    vdir = folder / "videos"
    vdir.mkdir(parents=True)
    ends = [{"action": 7, "reward": 10.0, "terminated": True, "truncated": False},
            {"action": 1, "reward": 0.0, "terminated": True, "truncated": False}, None]
    names = ["LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "NONE", "UP", "RIGHT+DOWN", "RIGHT", "RIGHT+UP"]
    for v in range(n):
        video = np.stack([np.full((16, 16, 3), 10 * i + v, np.uint8) for i in range(frames)])
        write_video(vdir / f"video_{v:03d}.mp4", video)
        meta = {"actions": [4] * (frames - 1), "action_names": names, "rewards": [0.0] * (frames - 1),
                "terminated": [False] * (frames - 1), "end": ends[v % 3]}
        if v == 2:
            meta["rewards"][4] = 1.0  # a reward inside a video, on the transition 4 -> 5
        if episode_ends:
            meta["episode_ends"] = episode_ends
        (vdir / f"video_{v:03d}.json").write_text(json.dumps(meta))
    return folder


def test_outcome_sampler_puts_each_event_on_its_transition(tmp_path):
    cache = FrameCache(_outcome_videos(tmp_path / "d"), 16, log=lambda *a: None)
    s = OutcomeSampler(cache)
    assert s.event_counts() == {"transitions": 3 * 9 + 2, "reward_events": 2, "terminations": 2,
                                "reward_events_that_ended": 1}
    assert s.mean_event_reward == pytest.approx(5.5)
    # end transitions come last: video 0 (coin), then video 1 (death)
    b = s.gather([27, 28], k=3)
    shade = b["frames"][:, :, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(shade, [[70, 80, 90, 90], [71, 81, 91, 91]])  # t = 9, no t+1: repeated
    np.testing.assert_array_equal(b["events"], [[1, 1], [0, 1]])
    assert list(b["is_end"]) == [True, True] and b["group"] == ["RIGHT", "LEFT"]
    b = s.gather([18 + 4, 1], k=3)  # video 2, transition 4 -> 5; video 0, transition 1 -> 2
    shade = b["frames"][:, :, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(shade, [[22, 32, 42, 52], [0, 0, 10, 20]])  # frames before 0: frame 0
    np.testing.assert_array_equal(b["events"], [[1, 0], [0, 0]])
    draws = s.sample(400, k=2)
    ends = draws["is_end"]
    assert 0.15 < ends.mean() < 0.4  # end_fraction 0.25 plus the uniform share
    # importance weights restore the natural share of end transitions (2 of 29)
    assert (draws["weight"] * ends).sum() / draws["weight"].sum() == pytest.approx(2 / 29, abs=0.03)


def test_feature_pool_holds_every_end_the_frames_before_and_weights_back(tmp_path):
    cache = FrameCache(_outcome_videos(tmp_path / "d"), 16, log=lambda *a: None)
    s = OutcomeSampler(cache, end_fraction=0.5)
    model = tiny_model(outcome_input="tokens")
    pool = FeaturePool(model, s, {"RIGHT": 2, "LEFT": 1}, inside=5, near=2, batch_size=4, log=lambda *a: None)
    # 2 ends; the 2 transitions before each end (videos 0 and 1: 7->8, 8->9); 5 of the other 23
    assert len(pool.tokens) == 2 + 4 + 5 and pool.is_end.sum() == 2
    np.testing.assert_array_equal(pool.events[:2].numpy(), [[1, 1], [0, 1]])
    assert pool.actions[:2].tolist() == [2, 1]  # end transitions: the action map's latent for the group
    # tokens of the end transitions are those of each video's last frame
    last = torch.from_numpy(np.stack([cache.clip(v, 9, 1)[0] for v in (0, 1)])).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = model.tokenizer.encode(last.float().div(255)[:, :, None]).flatten(2)[:, 0]
    assert torch.equal(pool.tokens[:2], want)
    assert pool.weight[6:].sum() == pytest.approx(27 - 4)  # the far stratum counts as all of its transitions
    b = pool.sample(2000)
    is_end = b["events"][:, 1] > 0
    assert 0.4 < is_end.mean() < 0.6
    # importance weights restore the natural share of end transitions (2 of 29)
    assert (b["weight"] * is_end).sum() / b["weight"].sum() == pytest.approx(2 / 29, abs=0.01)
    # written once, read back by a run that asks for the same pool; another pool is computed afresh
    logs: list[str] = []
    first = FeaturePool(model, s, {"RIGHT": 2, "LEFT": 1}, inside=5, near=2, batch_size=4, log=logs.append,
                        cache=tmp_path / "pool.pt")
    again = FeaturePool(model, s, {"RIGHT": 2, "LEFT": 1}, inside=5, near=2, batch_size=4, log=logs.append,
                        cache=tmp_path / "pool.pt")
    assert "read from" in logs[1] and torch.equal(first.tokens, again.tokens)
    assert np.array_equal(first.weight, again.weight) and np.array_equal(first.is_end, again.is_end)
    other = FeaturePool(model, s, {"RIGHT": 2, "LEFT": 1}, inside=5, near=1, batch_size=4, log=logs.append,
                        cache=tmp_path / "pool.pt")
    assert "computed once" in logs[2] and len(other.tokens) == 2 + 2 + 5


def test_a_share_of_ordinary_transitions_in_each_batch_keeps_the_game_s_distribution(tmp_path):
    cache = FrameCache(_outcome_videos(tmp_path / "d"), 16, log=lambda *a: None)
    s = OutcomeSampler(cache, end_fraction=0.25)
    model = tiny_model(outcome_input="tokens")
    plain = FeaturePool(model, s, {"RIGHT": 2, "LEFT": 1}, inside=5, near=2, batch_size=4, log=lambda *a: None)
    pool = FeaturePool(model, s, {"RIGHT": 2, "LEFT": 1}, inside=5, near=2, batch_size=4, log=lambda *a: None,
                       inside_fraction=0.5)
    assert pool.is_other.sum() == 5 and not (pool.is_other & pool.is_end).any()
    for p, least in ((plain, 0.0), (pool, 0.5)):
        b = p.sample(8000)
        other = p.is_other[b["index"]]
        # drawn at least inside_fraction of the time, weighted back to the game's share: 23 of 29
        assert other.mean() == pytest.approx(least + (1 - 0.25 - least) * 5 / 9, abs=0.03)
        assert (b["weight"] * other).sum() / b["weight"].sum() == pytest.approx(23 / 29, abs=0.02)
        assert (b["weight"] * p.is_end[b["index"]]).sum() / b["weight"].sum() == pytest.approx(2 / 29, abs=0.01)
    with pytest.raises(ValueError, match="inside_fraction"):
        FeaturePool(model, s, {"RIGHT": 2, "LEFT": 1}, inside=5, near=2, inside_fraction=0.8, log=lambda *a: None)


def test_episode_ends_recordings_join_the_pool_with_weights_that_keep_the_game_s_distribution(tmp_path):
    full = OutcomeSampler(FrameCache(_outcome_videos(tmp_path / "d"), 16, log=lambda *a: None), end_fraction=0.5)
    # an episode-ends recording of 6 videos: 4 more ends (2 coins, 2 deaths) and 4 x 2 more near transitions
    ends = OutcomeSampler(FrameCache(_outcome_videos(tmp_path / "e", n=6, frames=6, episode_ends=6), 16,
                                     log=lambda *a: None))
    assert full.natural and not ends.natural
    strata = Strata([full, ends], inside=5, near=2, rng=np.random.default_rng(0))
    assert strata.counts == {"ends": 2 + 4, "near": 4 + 8, "others": 5}
    w, is_end = strata.weight, strata.is_end
    # each stratum weighs what the full recording holds: 2 ends, 4 near, 23 others
    assert w[is_end].sum() == pytest.approx(2)
    assert w[~is_end].sum() == pytest.approx(4 + 23)
    # its ends (after its 30 inside transitions), then 2 before each end of videos 0, 1, 3, 4; no others
    assert strata.picks[1][1].tolist() == [30, 31, 32, 33] + [3, 4, 8, 9, 18, 19, 23, 24]
    model = tiny_model(outcome_input="tokens")
    pool = FeaturePool(model, full, {"RIGHT": 2, "LEFT": 1}, inside=5, near=2, batch_size=4, log=lambda *a: None,
                       extra=[ends])
    assert len(pool.tokens) == len(strata) and pool.is_end.sum() == 6
    assert pool.events[pool.is_end].sum() == 6 + 3  # 6 ends (coins or deaths), 3 of them coins
    assert pool.event_counts()["terminations"] == 2 + 4
    b = pool.sample(4000)
    is_end = b["events"][:, 1] > 0
    assert 0.4 < is_end.mean() < 0.6
    # importance weights restore the full recording's share of end transitions (2 of 29)
    assert (b["weight"] * is_end).sum() / b["weight"].sum() == pytest.approx(2 / 29, abs=0.01)
    with pytest.raises(ValueError, match="add a full"):
        Strata([ends], inside=5, near=2, rng=np.random.default_rng(0))


def test_best_thresholds_pick_the_best_f1():
    p = np.array([[0.9, 0.1], [0.6, 0.8], [0.3, 0.7], [0.2, 0.2], [0.05, 0.75]])
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [0, 1]], bool)
    thr = best_thresholds(p, y, np.ones(5))
    # head 0: threshold just under 0.9 gives P 1, R 0.5 (F1 .67); under 0.3: P .67 R 1 (F1 .8)
    assert 0.2 < thr[0] < 0.3
    assert 0.2 < thr[1] < 0.7  # every event above, no non-event: F1 1
    assert ((p[:, 1] > thr[1]) == y[:, 1]).all()


def test_a_reward_that_ends_the_episode_terminates_too():
    """With outcome_reward_terminates a predicted reward is also a termination, in the env's decision and in
    the threshold search, which then leaves the termination head only the other endings to find."""
    model = tiny_model(outcome_input="tokens", outcome_reward_terminates=True)
    heads = model.outcomes
    heads.threshold.copy_(torch.tensor([0.5, 0.5]))
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.1, 0.1]])
    reward, terminated = heads.decide(probs)
    assert reward.tolist() == [1.0, 0.0, 0.0] and terminated.tolist() == [True, True, False]
    assert tiny_model(outcome_input="tokens").outcomes.decide(probs)[1].tolist() == [False, True, False]
    # coins (rows 0-1) end episodes and the reward head finds them; the termination head sees only the death
    # (row 2): alone its best threshold would have to take in the coins' low termination probabilities too
    p = np.array([[0.9, 0.05], [0.8, 0.1], [0.1, 0.7], [0.1, 0.3], [0.2, 0.2]])
    y = np.array([[1, 1], [1, 1], [0, 1], [0, 0], [0, 0]], bool)
    alone, ruled = best_thresholds(p, y, np.ones(5)), best_thresholds(p, y, np.ones(5), reward_terminates=True)
    assert 0.3 < ruled[1] < 0.7 and alone[1] < 0.05
    fire = (p[:, 1] > ruled[1]) | (p[:, 0] > ruled[0])
    assert (fire == y[:, 1]).all()


def test_precision_recall_on_known_inputs():
    pred = np.array([1, 1, 0, 0, 1, 0], bool)
    true = np.array([1, 0, 1, 0, 1, 0], bool)
    r = precision_recall(pred, true)
    assert r == {"precision": 2 / 3, "recall": 2 / 3, "true_events": 3.0, "predicted_events": 3.0}
    r = precision_recall(pred, true, weight=np.array([1, 10, 1, 1, 1, 1.0]))
    assert r["precision"] == pytest.approx(2 / 12) and r["recall"] == pytest.approx(2 / 3)
    assert np.isnan(precision_recall(np.zeros(3, bool), np.zeros(3, bool))["precision"])


def test_dream_event_rates_count_live_steps_only(tmp_path):
    model = force_heads(Genie.from_pretrained(write_tiny_checkpoint(tmp_path / "c", outcome_input="tokens")))
    res = dream_event_rates(model, steps=12, num_envs=4, seed=0, max_episode_steps=None,
                            maskgit_steps=1)
    # every live step ends its episode; the step after only restarts the row and is not counted
    assert res["steps"] >= 12 and res["terminations"] == res["steps"] == res["reward_events"]
    assert res["terminations_per_1000"] == 1000


def test_reward_stage_trains_heads_on_a_release(tmp_path):
    data = _outcome_videos(tmp_path / "d", n=6)
    base = write_tiny_checkpoint(tmp_path / "base")
    from test_training import tiny_train_config

    cfg = tiny_train_config(tmp_path / "cfg.yaml")
    out = tmp_path / "run"
    r = run("-m", "training.train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--stage",
            "reward", "--init-from", str(base), "--no-progress", "--threads", "1", check=False)
    assert r.returncode == 2 and "outcome_input=hidden" in r.stderr
    run("-m", "training.train", "--config", str(cfg), "--data", str(data), "--val-data", str(data),
        "--out", str(out), "--stage", "reward", "--init-from", str(base), "--no-progress", "--threads", "1",
        "--log-every", "1", "outcome_input=hidden", "stages.reward.max_steps=4", "stages.reward.batch_size=4")
    model = Genie.from_pretrained(out / "reward" / "release")
    assert model.outcomes is not None and float(model.outcomes.event_reward) == pytest.approx(7.0)  # (10 + 10 + 1) / 3
    assert float(model.outcomes.logit_offset[0]) == pytest.approx(-np.log(20.0))
    assert (out / "reward" / "release" / "prompts.npz").is_file()  # the env can play the release
    assert "val_terminated_recall" in (out / "reward" / "val_metrics.csv").read_text()
    # other heads on top of that release (its heads do not fit them: they start from scratch), with the endings
    # of an episode-ends recording joining the pool
    ends = _outcome_videos(tmp_path / "e", n=6, frames=6, episode_ends=6)
    r = run("-m", "training.train", "--config", str(cfg), "--data", str(data), "--ends-data", str(ends),
            "--out", str(tmp_path / "run2"), "--stage", "reward", "--init-from", str(out / "reward" / "release"),
            "--no-progress", "--threads", "1", "outcome_input=tokens", "outcome_frames=2", "stages.reward.max_steps=4",
            "stages.reward.batch_size=4")
    assert "differ from the config's" in r.stdout + r.stderr
    assert "8 ends" in r.stdout and "2 recording(s)" in r.stdout  # 4 + 4 ends
    model = Genie.from_pretrained(tmp_path / "run2" / "reward" / "release")
    assert model.config.outcome_frames == 2
    assert model.outcomes.prev_emb.weight.shape[0] == model.config.tokenizer_vocab_size
    # a reward that does not end its episode (video 2) rules out outcome_reward_terminates
    r = run("-m", "training.train", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "run3"),
            "--stage", "reward", "--init-from", str(base), "--no-progress", "--threads", "1", "outcome_input=hidden",
            "outcome_reward_terminates=true", "stages.reward.max_steps=2", check=False)
    assert r.returncode == 2 and "1 of the 3 recorded reward events did not end their episode" in r.stderr


def test_calibration_saves_thresholds_and_keeps_a_half_precision_folder_half(tmp_path):
    """`training.outcomes --calibrate-on` rewrites the checkpoint folder with the new thresholds; a shipped
    (float16) folder stays float16, not twice its size."""
    from genie_env.hub import read_safetensors_header, stored_dtype

    ckpt = write_tiny_checkpoint(tmp_path / "c", outcome_input="tokens", outcome_frames=2)
    Genie.from_pretrained(ckpt).save_pretrained(ckpt, dtype=torch.float16)
    assert stored_dtype(ckpt) == torch.float16
    before = Genie.from_pretrained(ckpt).outcomes.threshold.clone()
    data = _outcome_videos(tmp_path / "d", n=6)
    run("-m", "training.outcomes", "--checkpoint", str(ckpt), "--calibrate-on", str(data), "--data", str(data))
    header = read_safetensors_header(ckpt / "model.safetensors")
    assert header["outcomes.out.2.weight"]["dtype"] == "F16"
    assert stored_dtype(ckpt) == torch.float16
    assert not torch.equal(Genie.from_pretrained(ckpt).outcomes.threshold, before)
    assert (ckpt / "prompts.npz").is_file() and (ckpt / "action_map.json").is_file()
    # a float32 folder stays float32
    Genie.from_pretrained(ckpt).save_pretrained(ckpt)
    assert stored_dtype(ckpt) is None
