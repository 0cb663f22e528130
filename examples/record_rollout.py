"""Roll a Genie model out under chosen actions and save the clip (mp4 or gif) and a PNG strip of frames.

    python examples/record_rollout.py --actions RIGHT,RIGHT,RIGHT+UP,NONE --steps 64 --out rollout.mp4
    python examples/record_rollout.py --checkpoint path/to/checkpoint --actions 2,3 --out rollout.gif

Actions are names from the checkpoint's action map (LEFT, RIGHT, UP, LEFT+UP, ...) or latent action
numbers, played in turn and repeated until --steps frames have been generated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from genie_env.env import GenieEnv
from genie_env.media import save_png, save_video


def parse_actions(text: str, action_map: dict[str, int], num_actions: int) -> list[int]:
    actions = []
    for item in text.split(","):
        item = item.strip().upper()
        if item.isdigit() and int(item) < num_actions:
            actions.append(int(item))
        elif item in action_map:
            actions.append(action_map[item])
        else:
            known = ", ".join(action_map) or "none: this checkpoint has no action map"
            raise SystemExit(f"--actions: {item!r} is neither a latent action in [0, {num_actions}) nor a "
                             f"name in the action map ({known})")
    return actions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder or hub repo id (default: shipped model)")
    parser.add_argument("--actions", default="RIGHT", help="comma-separated action names or latent action numbers")
    parser.add_argument("--steps", type=int, default=64, help="frames to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--maskgit-steps", type=int, default=None, help="fewer is faster (default: the model's)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="number format (default: bf16 where the hardware runs it natively, else fp32)")
    parser.add_argument("--out", default="rollout.mp4", help="output video, .mp4 or .gif")
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--scale", type=int, default=4, help="video pixels per frame pixel")
    parser.add_argument("--strip", default=None, help="PNG strip of 8 frames (default: the video path with .png)")
    args = parser.parse_args()

    env = GenieEnv(args.checkpoint, maskgit_steps=args.maskgit_steps, dtype=args.dtype)
    actions = parse_actions(args.actions, env.action_map, int(env.action_space.n))
    observation, _ = env.reset(seed=args.seed)
    frames = [observation]
    for t in range(args.steps):
        observation, *_ = env.step(actions[t % len(actions)])
        frames.append(observation)
    env.close()

    video = save_video(frames, args.out, fps=args.fps, scale=args.scale)
    picks = np.linspace(0, len(frames) - 1, num=min(8, len(frames))).round().astype(int)
    strip = np.concatenate([frames[i] for i in picks], axis=1).repeat(args.scale, 0).repeat(args.scale, 1)
    png = save_png(strip, args.strip or Path(args.out).with_suffix(".png"))
    print(f"saved {len(frames)} frames to {video} and a strip of {len(picks)} frames to {png}")


if __name__ == "__main__":
    main()
