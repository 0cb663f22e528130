"""GIFs of the dream agent: playing inside Genie-v0, and playing the real game on a level it never saw.

    python scripts/agent_gifs.py --agent weights --out docs/ [--level 2000003] [--steps 150]

Writes OUT/agent-dream.gif (the world model's frames, its reward and episode end) and OUT/agent-real.gif
(procgen CoinRun; needs the `record` extra), each with the step's reward in the title row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from genie_env import GenieEnv
from genie_env.agent import load_agent
from genie_env.media import save_video


def _banner(frame: np.ndarray, hit: bool, ended: bool) -> np.ndarray:
    """The frame with a 4-pixel bar on top: yellow on a reward, red on an episode end, grey otherwise."""
    bar = np.zeros((4, frame.shape[1], 3), np.uint8)
    bar[:] = (230, 200, 40) if hit else (200, 40, 40) if ended else (60, 60, 60)
    return np.concatenate([bar, frame], 0)


def dream(agent, steps: int, seed: int) -> list[np.ndarray]:
    env = GenieEnv()
    obs, _ = env.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    frames = [_banner(obs, False, False)]
    for _ in range(steps):
        obs, r, term, trunc, _ = env.step(int(agent.act(obs[None], generator=gen)[0]))
        frames.append(_banner(obs, r > 0, term))
        if term or trunc:
            obs, _ = env.reset()
            frames.append(_banner(obs, False, False))
    return frames


def real(agent, level: int, steps: int, seed: int) -> list[np.ndarray]:
    from training.evaluate_agent import _make_env, real_actions_for

    env = _make_env("coinrun", level, "hard")
    mapping = real_actions_for(agent, [tuple(c) for c in env.get_combos()])
    gen = torch.Generator().manual_seed(seed)
    obs = env.observe()[1]["rgb"][0]
    frames = [_banner(obs, False, False)]
    for _ in range(steps):
        latent = int(agent.act(obs[None], generator=gen)[0])
        env.act(np.array([mapping[latent]], dtype=np.int32))
        r, o, first = env.observe()
        if first[0]:  # the episode ended: show the last frame again, marked
            frames.append(_banner(frames[-1][4:], r[0] > 0, True))
            break
        obs = o["rgb"][0]
        frames.append(_banner(obs, r[0] > 0, False))
    return frames


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agent", type=Path, default=None, help="agent folder (default: the shipped agent)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--level", type=int, default=2_000_000, help="real level (outside the training range)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    agent = load_agent(a.agent)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, frames in (("dream", dream(agent, a.steps, a.seed)), ("real", real(agent, a.level, a.steps, a.seed))):
        path = save_video(np.stack(frames), a.out / f"agent-{name}.gif", fps=15, scale=2)
        print(f"{path}: {len(frames)} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
