"""A random agent in Genie-v0: the canonical Gymnasium loop.

    python examples/random_agent.py                       # the shipped model
    python examples/random_agent.py --checkpoint path/to/checkpoint --steps 50
"""

from __future__ import annotations

import argparse

import gymnasium as gym

import genie_env  # noqa: F401  (registers Genie-v0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder or hub repo id (default: shipped model)")
    parser.add_argument("--steps", type=int, default=200, help="environment steps to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--maskgit-steps", type=int, default=None, help="fewer is faster (default: the model's)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="number format (default: bf16 where the hardware runs it natively, else fp32)")
    args = parser.parse_args()

    env = gym.make("Genie-v0", checkpoint=args.checkpoint, maskgit_steps=args.maskgit_steps, dtype=args.dtype)
    env.action_space.seed(args.seed)

    observation, info = env.reset(seed=args.seed)
    episodes, episode_return = 0, 0.0
    for _ in range(args.steps):
        action = env.action_space.sample()
        observation, reward, terminated, truncated, info = env.step(action)
        episode_return += reward
        if terminated or truncated:
            episodes += 1
            print(f"episode {episodes}: return {episode_return}, {info['step']} steps")
            observation, info = env.reset()
            episode_return = 0.0
    env.close()
    print(f"ran {args.steps} steps; last observation {observation.shape} {observation.dtype}, "
          f"mean pixel {observation.mean():.1f}")


if __name__ == "__main__":
    main()
