"""Train an agent inside Genie-v0 only (PPO, Schulman et al. 2017), to be played on the real game afterwards.

    python -m training.train_agent --out AGENT_RUN --prompts DATA [--steps 200000] [--resume]

Every step the agent takes is a step of the world model: the reward and the episode's end are the model's
own predictions (the checkpoint's reward and termination heads). Episodes start from real frames (the
prompt bank: ``--prompts DATA`` draws them from a recorded dataset, with a share of them from the last
frames before the episodes' ends, so that the dream shows rewards often enough to learn from) and are
truncated after ``--episode-steps`` steps, since a world model drifts the longer it dreams. The policy picks
among the latent actions of the checkpoint's action map, so that each of them has a real key.

Writes AGENT_RUN/``checkpoint.pt`` (resume state, atomic), ``agent.json`` + ``agent.safetensors`` (the
agent, loadable with `genie_env.agent.load_agent`), ``metrics.csv`` (the learning curve inside the dream)
and ``prompts.npz`` (the start frames used).

PPO as in CleanRL's ``ppo.py``: clipped objective, GAE(λ), advantage normalisation, value clipping off,
gradient clipping, linear learning-rate decay. Gymnasium's NEXT_STEP autoreset: the step after an episode
ends only restarts it, so that transition is left out of the loss.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genie_env.agent import AgentConfig, DreamAgent
from genie_env.vector_env import GenieVectorEnv
from training.checkpoint import RunLock, atomic_save, load_checkpoint


@dataclass
class AgentArgs:
    """Command-line arguments of `python -m training.train_agent`."""

    out: Path
    """Run folder (checkpoint, agent files, metrics.csv)."""
    checkpoint: str | None = None
    """The world model: a release folder or hub id; None = the shipped model."""
    prompts: str | None = None
    """Dataset folder (DATA/videos) to draw start frames from; None = the checkpoint's prompt bank."""
    num_prompts: int = 4096
    """How many start frames to draw from --prompts."""
    end_share: float = 0.5
    """Share of start frames drawn from the last --end-window frames of episodes that ended with a reward."""
    end_window: int = 48
    """See --end-share."""
    steps: int = 200_000
    """Total environment steps to train for."""
    num_envs: int = 32
    """Dream environments stepped as one batch."""
    rollout: int = 32
    """Steps per environment between updates."""
    episode_steps: int = 100
    """Truncate dream episodes after this many steps."""
    gamma: float = 0.99
    gae_lambda: float = 0.95
    learning_rate: float = 5e-4
    epochs: int = 3
    """PPO epochs over each rollout."""
    minibatches: int = 4
    clip: float = 0.2
    entropy: float = 0.01
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    reward_scale: float = 0.1
    """Rewards are multiplied by this for learning (CoinRun's coin is worth 10)."""
    maskgit_steps: int = 0
    """MaskGIT steps of the dream (0 = the checkpoint's default)."""
    dtype: str = ""
    """bf16 or fp32 for the world model ("" = what the hardware runs natively)."""
    seed: int = 0
    threads: int = 0
    """CPU threads (0 = all cores)."""
    checkpoint_minutes: float = 10.0
    """Save a resume checkpoint at least this often."""
    resume: bool = False
    """Continue from OUT/checkpoint.pt (the dream episodes in flight restart; the rest is exact)."""


def build_prompt_bank(data: str | Path, num: int, end_share: float, end_window: int, seed: int,
                      image_size: int = 64) -> np.ndarray:
    """(num, H, W, 3) uint8 start frames from a recorded dataset: ``end_share`` of them from the last
    ``end_window`` frames of videos whose episode ended with a reward, the rest uniformly over all frames."""
    from training.data import FrameCache, load_actions

    cache = FrameCache(data, image_size, log=lambda *a: None)
    rng = np.random.default_rng(seed)
    lengths = np.array([v.frames for v in cache.videos])
    rewarded = []
    for i, v in enumerate(cache.videos):
        meta = load_actions(data, v.name) or {}
        end = meta.get("end")
        if end and end.get("reward", 0) > 0:
            rewarded.append(i)
    n_end = int(round(num * end_share)) if rewarded else 0
    picks = []
    for _ in range(n_end):
        i = int(rng.choice(rewarded))
        lo = max(0, lengths[i] - end_window)
        picks.append((i, int(rng.integers(lo, lengths[i]))))
    cum = np.cumsum(lengths)
    for g in rng.integers(0, cum[-1], size=num - n_end):
        i = int(np.searchsorted(cum, g, side="right"))
        picks.append((i, int(g - (cum[i] - lengths[i]))))
    return np.stack([cache.clip(i, t, 1)[0] for i, t in picks])


def gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, terminated: np.ndarray,
        done: np.ndarray, valid: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """Advantages of a (T, N) rollout under NEXT_STEP autoreset.

    ``values[t]`` is V(obs the action of step t was chosen on), ``next_values[t]`` V(obs step t returned);
    ``done[t]`` = terminated or truncated at step t; ``valid[t]`` = False for the step that only restarts an
    ended episode. A terminated step does not bootstrap; a truncated one bootstraps from its final frame; the
    λ-return never runs across an episode's end."""
    T = rewards.shape[0]
    adv = np.zeros_like(rewards, dtype=np.float64)
    last = np.zeros(rewards.shape[1], dtype=np.float64)
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * lam * (1.0 - done[t]) * last
        last = np.where(valid[t], last, 0.0)
        adv[t] = last
    return adv


class AgentTrainer:
    def __init__(self, args: AgentArgs, log=print, reward_fn=None) -> None:
        self.args, self.log = args, log
        if args.threads:
            torch.set_num_threads(args.threads)
        self.out = Path(args.out)
        self.lock = RunLock(self.out)
        self.stop_requested = False
        self.reward_fn = reward_fn

    def _envs(self) -> GenieVectorEnv:
        a = self.args
        envs = GenieVectorEnv(a.num_envs, a.checkpoint, max_episode_steps=a.episode_steps,
                              dtype=a.dtype or None, maskgit_steps=a.maskgit_steps or None,
                              reward_fn=self.reward_fn)
        if self.reward_fn is None and envs.model.outcomes is None:
            raise ValueError(f"the world model {a.checkpoint or '(shipped)'} predicts no reward or episode end: "
                             "train its reward stage first (`python -m training.train --stage reward`), "
                             "or pick a checkpoint that has one")
        bank_path = self.out / "prompts.npz"
        if bank_path.is_file():
            envs.prompt_bank = np.load(bank_path)["frames"]
        elif a.prompts is not None:
            bank = build_prompt_bank(a.prompts, a.num_prompts, a.end_share, a.end_window, a.seed,
                                     envs.model.config.image_size)
            np.savez_compressed(self.out / "prompts.npz", frames=bank)
            envs.prompt_bank = bank
        return envs

    def _agent_config(self, envs: GenieVectorEnv) -> AgentConfig:
        amap = envs.action_map or {}
        if amap:
            names = sorted(amap, key=lambda k: amap[k])
            actions = [int(amap[k]) for k in names]
        else:  # no action map: every latent action, named by number
            actions = list(range(envs.single_action_space.n))
            names = [f"LATENT_{i}" for i in actions]
        return AgentConfig(actions=actions, action_names=names, image_size=envs.model.config.image_size)

    def run(self) -> DreamAgent:
        self.lock.acquire()
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):  # noqa: ARG001
            self.stop_requested = True
            self.log(f"{signal.Signals(signum).name} received: saving and stopping")

        for s in old:
            signal.signal(s, handler)
        try:
            return self._run()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.lock.release()

    def _run(self) -> DreamAgent:
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self.out / "checkpoint.pt"
        if ckpt.is_file() and not a.resume:
            raise RuntimeError(f"{ckpt} exists: pass --resume to continue it, or choose another --out")
        envs = self._envs()
        torch.manual_seed(a.seed)
        agent = DreamAgent(self._agent_config(envs))
        opt = torch.optim.Adam(agent.parameters(), lr=a.learning_rate, eps=1e-5)
        step, update, elapsed = 0, 0, 0.0
        if a.resume and ckpt.is_file():
            state = load_checkpoint(ckpt)
            agent.load_state_dict(state["agent"])
            opt.load_state_dict(state["optimizer"])
            step, update, elapsed = state["step"], state["update"], state["elapsed"]
            torch.set_rng_state(state["torch_rng"])
            self.log(f"resuming at step {step}")
        (self.out / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                        for k, v in asdict(a).items()}, indent=1))
        n, T = a.num_envs, a.rollout
        per_update = n * T
        total_updates = max(1, math.ceil(a.steps / per_update))
        obs, _ = envs.reset(seed=a.seed + update)
        prev_done = np.zeros(n, dtype=bool)
        ep_return = np.zeros(n)
        ep_len = np.zeros(n, dtype=np.int64)
        gen = torch.Generator().manual_seed(a.seed * 7919 + update)
        last_save = time.time()
        csv_path = self.out / "metrics.csv"
        if not a.resume and csv_path.is_file():
            csv_path.unlink()
        while update < total_updates and not self.stop_requested:
            t0 = time.time()
            for g in opt.param_groups:
                g["lr"] = a.learning_rate * (1.0 - update / total_updates)
            buf_obs = np.zeros((T, n, *obs.shape[1:]), dtype=np.uint8)
            buf_k = np.zeros((T, n), dtype=np.int64)
            buf_logp = np.zeros((T, n), dtype=np.float32)
            buf_v = np.zeros((T, n), dtype=np.float32)
            buf_nv = np.zeros((T, n), dtype=np.float32)
            buf_r = np.zeros((T, n), dtype=np.float32)
            buf_term = np.zeros((T, n), dtype=np.float32)
            buf_done = np.zeros((T, n), dtype=np.float32)
            buf_valid = np.zeros((T, n), dtype=bool)
            finished, events, ends = [], 0, 0
            agent.eval()
            with torch.no_grad():
                logits, value = agent(torch.from_numpy(obs))
            for t in range(T):
                k = torch.multinomial(F.softmax(logits, -1), 1, generator=gen).squeeze(-1)
                buf_obs[t], buf_k[t], buf_v[t] = obs, k.numpy(), value.numpy()
                buf_logp[t] = F.log_softmax(logits, -1).gather(1, k[:, None]).squeeze(1).numpy()
                buf_valid[t] = ~prev_done
                obs, rew, term, trunc, _ = envs.step(agent.latent_ids[k].numpy())
                with torch.no_grad():
                    logits, value = agent(torch.from_numpy(obs))
                buf_nv[t] = value.numpy()
                buf_r[t] = rew * a.reward_scale
                buf_term[t], buf_done[t] = term, term | trunc
                live = ~prev_done
                ep_return[live] += rew[live]
                ep_len[live] += 1
                events += int((rew[live] > 0).sum())
                ends += int(term[live].sum())
                for i in np.flatnonzero(live & (term | trunc)):
                    finished.append((ep_return[i], ep_len[i], bool(term[i])))
                    ep_return[i], ep_len[i] = 0.0, 0
                prev_done = term | trunc
            adv = gae(buf_r, buf_v, buf_nv, buf_term, buf_done, buf_valid, a.gamma, a.gae_lambda)
            ret = adv + buf_v
            logs = self._update(agent, opt, buf_obs, buf_k, buf_logp, adv, ret, buf_valid)
            update += 1
            step += per_update
            dt = time.time() - t0
            elapsed += dt
            row = {"step": step, "update": update, "elapsed_s": round(elapsed, 1), "env_steps_per_s": per_update / dt,
                   "episodes": len(finished),
                   "mean_return": float(np.mean([f[0] for f in finished])) if finished else float("nan"),
                   "mean_length": float(np.mean([f[1] for f in finished])) if finished else float("nan"),
                   "rewards_per_1000": 1000.0 * events / buf_valid.sum(),
                   "terminations_per_1000": 1000.0 * ends / buf_valid.sum(), **logs}
            self._log_row(csv_path, row)
            self.log(f"step {step}: {row['episodes']} episodes, return {row['mean_return']:.2f}, "
                     f"rewards/1000 {row['rewards_per_1000']:.1f}, entropy {logs['entropy']:.3f}, "
                     f"{row['env_steps_per_s']:.0f} steps/s")
            if time.time() - last_save > a.checkpoint_minutes * 60 or update == total_updates or self.stop_requested:
                self._save(agent, opt, step, update, elapsed)
                last_save = time.time()
        if update == total_updates:
            self._save(agent, opt, step, update, elapsed)
        envs.close()
        return agent.eval()

    def _update(self, agent, opt, obs, k, logp_old, adv, ret, valid) -> dict[str, float]:
        a = self.args
        agent.train()
        idx = np.flatnonzero(valid.reshape(-1))
        obs_f = torch.from_numpy(obs.reshape(-1, *obs.shape[2:]))
        k_f = torch.from_numpy(k.reshape(-1))
        logp_f = torch.from_numpy(logp_old.reshape(-1))
        adv_f = torch.from_numpy(adv.reshape(-1)).float()
        ret_f = torch.from_numpy(ret.reshape(-1)).float()
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "entropy": [], "approx_kl": []}
        mb = max(1, len(idx) // a.minibatches)
        for _ in range(a.epochs):
            rng.shuffle(idx)
            for s in range(0, len(idx), mb):
                j = torch.from_numpy(idx[s: s + mb])
                logits, v = agent(obs_f[j])
                logp_all = F.log_softmax(logits, -1)
                logp = logp_all.gather(1, k_f[j][:, None]).squeeze(1)
                ratio = (logp - logp_f[j]).exp()
                adv_j = adv_f[j]
                adv_j = (adv_j - adv_j.mean()) / (adv_j.std() + 1e-8) if len(j) > 1 else adv_j
                pg = -torch.min(ratio * adv_j, ratio.clamp(1 - a.clip, 1 + a.clip) * adv_j).mean()
                vl = 0.5 * (v - ret_f[j]).pow(2).mean()
                ent = -(logp_all.exp() * logp_all).sum(-1).mean()
                loss = pg + a.value_coef * vl - a.entropy * ent
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(agent.parameters(), a.max_grad_norm)
                opt.step()
                stats["policy_loss"].append(float(pg.detach()))
                stats["value_loss"].append(float(vl.detach()))
                stats["entropy"].append(float(ent.detach()))
                stats["approx_kl"].append(float(((ratio - 1) - (logp - logp_f[j])).mean().detach()))
        agent.eval()
        return {key: float(np.mean(v)) for key, v in stats.items()}

    def _save(self, agent, opt, step, update, elapsed) -> None:
        atomic_save({"agent": agent.state_dict(), "optimizer": opt.state_dict(), "step": step, "update": update,
                     "elapsed": elapsed, "torch_rng": torch.get_rng_state(),
                     "args": {k: str(v) for k, v in asdict(self.args).items()}}, self.out / "checkpoint.pt")
        agent.save(self.out)

    @staticmethod
    def _log_row(path: Path, row: dict) -> None:
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


def parse_args(argv: list[str] | None = None) -> AgentArgs:
    p = argparse.ArgumentParser(prog="python -m training.train_agent", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    for f in fields(AgentArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out":
            p.add_argument(flag, type=Path, required=True)
        elif f.type == "bool":
            p.add_argument(flag, action="store_true")
        elif f.name in ("checkpoint", "prompts"):
            p.add_argument(flag, type=str, default=None)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    return AgentArgs(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        AgentTrainer(args).run()
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
