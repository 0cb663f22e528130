"""An agent on the real game (EVALUATION.md metric 9): one episode per level, next to a uniform random policy.

    python -m training.evaluate_agent --start-level 2000000 --num-levels 200 --json agent_eval.json
    python -m training.evaluate_agent --agent AGENT_RUN ...      # another agent (default: the shipped one)

The agent picks latent actions; each goes to the real game through the checkpoint's action map (latent
action -> key group -> the game's button combo for that group). The random policy draws uniformly from all
of the game's real actions (15 in procgen). Both play the same levels, one episode each, in procgen's
``distribution_mode`` as recorded (hard), until the game ends the episode or its time limit does. Prints the
mean return and the success rate (share of episodes that collected a reward, in CoinRun the coin), each
with a 95% confidence interval (normal for the mean return, Wilson for the rate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genie_env.agent import DreamAgent, load_agent


def real_actions_for(agent: DreamAgent, combos: list[tuple[str, ...]]) -> dict[int, int]:
    """latent action -> index of the game's button combo, through the agent's action names (key groups)."""
    from training.keydriven import combo_index

    return {int(latent): combo_index(combos, name) for latent, name in zip(agent.config.actions,
                                                                          agent.config.action_names)}


def _make_env(game: str, level: int, distribution_mode: str):
    from training.record import _import_procgen  # with the message that says how to install it

    return _import_procgen()(num=1, env_name=game, start_level=level, num_levels=1,
                             distribution_mode=distribution_mode, rand_seed=level)


def play_levels(policy, levels: list[int], game: str = "coinrun", distribution_mode: str = "hard",
                batch: int = 16, max_steps: int = 1000) -> list[dict]:
    """One episode on each level. ``policy(obs (b, h, w, 3) uint8, combos) -> (b,) real action indices``.
    Returns per level: return, success (a reward was collected), length."""
    results = []
    for s in range(0, len(levels), batch):
        chunk = levels[s: s + batch]
        envs = [_make_env(game, lv, distribution_mode) for lv in chunk]
        combos = [tuple(c) for c in envs[0].get_combos()]
        live = np.ones(len(envs), dtype=bool)
        ret = np.zeros(len(envs))
        length = np.zeros(len(envs), dtype=np.int64)
        got = np.zeros(len(envs), dtype=bool)
        obs = np.stack([e.observe()[1]["rgb"][0] for e in envs])
        while live.any():
            acts = policy(obs, combos)
            for i, e in enumerate(envs):
                if not live[i]:
                    continue
                e.act(np.array([acts[i]], dtype=np.int32))
                rew, o, first = e.observe()
                ret[i] += float(rew[0])
                got[i] |= float(rew[0]) > 0
                length[i] += 1
                if first[0] or length[i] >= max_steps:  # the episode ended (a new one began) or the time limit
                    live[i] = False
                else:
                    obs[i] = o["rgb"][0]
        results += [{"level": lv, "return": float(ret[i]), "success": bool(got[i]), "length": int(length[i])}
                    for i, lv in enumerate(chunk)]
    return results


def summarize(results: list[dict]) -> dict:
    """Mean return and success rate with 95% intervals (normal; Wilson for the rate)."""
    r = np.array([x["return"] for x in results], dtype=np.float64)
    n = len(r)
    half = 1.96 * r.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    k = sum(x["success"] for x in results)
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    w = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    mean = float(r.mean())
    return {"episodes": n, "mean_return": mean, "return_ci95": [mean - half, mean + half],
            "success_rate": p, "success_ci95": [centre - w, centre + w],
            "mean_length": float(np.mean([x["length"] for x in results]))}


def codec_view(model) -> callable:
    """Frames -> the same frames as the world model's tokenizer rebuilds them (what dream frames look like)."""

    @torch.no_grad()
    def view(obs: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(obs).to(model.device).permute(0, 3, 1, 2).float().div(255)
        y = model.detokenize(model.tokenize(x[:, :, None]))[:, :, 0]
        return (y.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    return view


def evaluate(agent: DreamAgent, start_level: int, num_levels: int, seed: int = 0, game: str = "coinrun",
             distribution_mode: str = "hard", deterministic: bool = False, batch: int = 16, log=print,
             view=None) -> dict:
    """Metric 9. ``view``: what the agent sees of a real frame (default: the frame itself)."""
    levels = list(range(start_level, start_level + num_levels))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    mapping: dict[int, int] = {}

    def agent_policy(obs, combos):
        if not mapping:
            mapping.update(real_actions_for(agent, combos))
        latent = agent.act(obs if view is None else view(obs), deterministic=deterministic, generator=gen)
        return np.array([mapping[int(a)] for a in latent])

    def random_policy(obs, combos):
        return rng.integers(0, len(combos), size=len(obs))

    out = {"game": game, "distribution_mode": distribution_mode, "levels": [start_level, start_level + num_levels],
           "seed": seed, "deterministic": deterministic}
    for name, pol in (("agent", agent_policy), ("random", random_policy)):
        t0 = time.time()
        res = play_levels(pol, levels, game, distribution_mode, batch=batch)
        out[name] = {**summarize(res), "seconds": round(time.time() - t0, 1), "per_level": res}
        s = out[name]
        log(f"{name:>6}: mean return {s['mean_return']:.2f} (95% CI {s['return_ci95'][0]:.2f}-"
            f"{s['return_ci95'][1]:.2f}), success {s['success_rate']:.3f} (95% CI {s['success_ci95'][0]:.3f}-"
            f"{s['success_ci95'][1]:.3f}), {s['episodes']} levels, mean length {s['mean_length']:.0f}")
    if mapping:
        out["latent_to_real"] = {str(k): v for k, v in mapping.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate_agent", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--agent", type=Path, default=None, help="agent folder (agent.json + agent.safetensors); "
                   "default: the shipped agent")
    p.add_argument("--start-level", type=int, default=2_000_000, help="first level (outside the training range)")
    p.add_argument("--num-levels", type=int, default=200, help="levels, one episode each")
    p.add_argument("--game", default="coinrun")
    p.add_argument("--distribution-mode", default="hard")
    p.add_argument("--seed", type=int, default=0, help="seed of both policies' action draws")
    p.add_argument("--deterministic", action="store_true", help="the agent takes its most likely action")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--codec", default=None, metavar="CHECKPOINT",
                   help="show the agent each real frame as this world model's tokenizer rebuilds it (as dream "
                        "frames look); 'shipped' for the shipped model")
    p.add_argument("--json", type=Path, default=None, help="write the figures (and per-level results) here")
    a = p.parse_args(argv)
    if a.num_levels < 1:
        print("error: --num-levels must be >= 1", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        agent = load_agent(a.agent)
        view = None
        if a.codec is not None:
            from genie_env import Genie

            view = codec_view(Genie.from_pretrained(None if a.codec == "shipped" else a.codec).eval())
        res = evaluate(agent, a.start_level, a.num_levels, a.seed, a.game, a.distribution_mode, a.deterministic,
                       view=view)
        res["codec"] = a.codec
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
