"""Record a video dataset from a procgen game with a uniformly random policy (Genie §3, CoinRun study).

    python -m training.record --out data/coinrun-train --frames 200000 --start-level 0 --num-levels 10000
    python -m training.record --out data/coinrun-val --frames 20000 --start-level 1000000 --num-levels 1000
    python -m training.record --out data/coinrun-ends --frames 160000 --episode-ends 32 --hold 8 --seed 4

Writes ``OUT/videos/video_000000.mp4`` (one episode, or a piece of one, per file: a video never crosses
an episode boundary) and beside each ``video_000000.json`` with the game, the level seed, the true game
action of every transition and its outcome. The three Genie stages never read actions or outcomes: the
actions serve evaluation, the outcomes the reward stage and evaluation.

Outcomes. ``rewards[i]`` and ``terminated[i]`` belong to the transition from frame i to frame i+1. The
game's last transition of an episode is not in the video: its next observation is already the next
episode's first frame. It is stored as ``end``: ``{"action", "reward", "terminated", "truncated"}``, where
*terminated* means the game ended the episode (CoinRun: the coin or a death) and *truncated* that the time
limit did (not a termination). A video cut because it reached ``--max-video-frames``, or because recording
stopped, has ``end: null`` (the episode went on).

Videos are encoded losslessly (H.264 in RGB, qp 0): 4:2:0 chroma subsampling costs about 13 dB on 64x64
pixel art. Needs the optional ``record`` extra (``pip install -e .[record]``) for procgen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genie_env.media import write_video

# CoinRun-style platformers: the true-action groups used by the action-alignment metric.
PLATFORMER_GROUPS = ("LEFT", "LEFT+UP", "RIGHT", "RIGHT+UP", "UP", "NONE")


def action_group(combo: tuple[str, ...]) -> str:
    """Group a procgen button combo by what it does in a platformer (EVALUATION.md, metric 5)."""
    left, right, up = "LEFT" in combo, "RIGHT" in combo, "UP" in combo
    if left:
        return "LEFT+UP" if up else "LEFT"
    if right:
        return "RIGHT+UP" if up else "RIGHT"
    return "UP" if up else "NONE"


@dataclass
class RecordArgs:
    out: Path
    """Dataset folder; videos go to OUT/videos."""
    game: str = "coinrun"
    """procgen game name (coinrun, bigfish, leaper, ...)."""
    frames: int = 10000
    """Total frames to record."""
    start_level: int = 0
    """First level seed of the range."""
    num_levels: int = 1000
    """Number of level seeds in the range (0 = unlimited)."""
    num_envs: int = 16
    """Parallel game instances."""
    max_video_frames: int = 1000
    """An episode longer than this is split into several videos."""
    min_video_frames: int = 2
    """Episodes shorter than this are dropped."""
    hold: int = 1
    """Hold each random action for 1..hold frames (1 = uniformly random every frame, as the paper)."""
    seed: int = 0
    """Seed of the random policy and of procgen's level draws."""
    distribution_mode: str = "hard"
    """procgen distribution mode."""
    time_limit: int = 1000
    """The game's own episode step limit (procgen: 1000): an episode ended at this length was truncated."""
    episode_ends: int = 0
    """Keep only the last N frames of each episode that ends, with its ``end`` (0 = every frame). Such a
    recording gathers episode endings (the reward stage's rare events) many times faster than a full one;
    it is not the game's natural distribution of frames, so it adds to a full recording, never replaces it."""


def _import_procgen():
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from procgen import ProcgenGym3Env  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise SystemExit(
            "recording needs procgen: install the optional extra with `pip install -e .[record]` "
            f"(procgen-mirror, Python 3.11). Import error: {e}"
        ) from e
    return ProcgenGym3Env


def record(args: RecordArgs, log=print) -> dict:
    """Record ``args.frames`` frames; returns a summary dict (also written to OUT/dataset.json)."""
    ProcgenGym3Env = _import_procgen()
    if args.frames < 1:
        raise ValueError(f"frames must be >= 1, got {args.frames}")
    if args.episode_ends < 0 or args.episode_ends == 1:
        raise ValueError(f"episode_ends must be 0 (every frame) or >= 2 frames, got {args.episode_ends}")
    window = args.episode_ends
    out = Path(args.out)
    vid_dir = out / "videos"
    vid_dir.mkdir(parents=True, exist_ok=True)
    if any(vid_dir.glob("video_*.mp4")):
        raise FileExistsError(f"{vid_dir} already holds videos; record into an empty folder")

    env = ProcgenGym3Env(
        num=args.num_envs,
        env_name=args.game,
        start_level=args.start_level,
        num_levels=args.num_levels,
        distribution_mode=args.distribution_mode,
        rand_seed=args.seed,
    )
    combos = [tuple(c) for c in env.get_combos()]
    names = ["+".join(c) if c else "NONE" for c in combos]
    n_actions = len(combos)
    rng = np.random.default_rng(args.seed)

    # Per env: frames and actions of the episode piece being recorded.
    frames: list[list[np.ndarray]] = [[] for _ in range(args.num_envs)]
    acts: list[list[int]] = [[] for _ in range(args.num_envs)]
    rews: list[list[float]] = [[] for _ in range(args.num_envs)]
    ends: list[dict | None] = [None] * args.num_envs
    ep_steps = np.zeros(args.num_envs, dtype=np.int64)  # steps taken in each env's current episode
    seeds = [None] * args.num_envs
    held = np.zeros(args.num_envs, dtype=np.int64)
    hold_left = np.zeros(args.num_envs, dtype=np.int64)
    n_videos = 0
    n_frames = 0
    t0 = time.time()

    def flush(i: int) -> None:
        nonlocal n_videos, n_frames
        f, a, r, end = frames[i], acts[i], rews[i], ends[i]
        keep = min(len(f), args.frames - n_frames)
        if keep >= args.min_video_frames:
            if keep < len(f) and window:  # the budget ends inside an episode's last frames: keep its tail
                f, a, r = f[len(f) - keep:], a[len(a) - (keep - 1):], r[len(r) - (keep - 1):]
            elif keep < len(f):
                end = None  # cut short: the episode went on
                f, a, r = f[:keep], a[: keep - 1], r[: keep - 1]
            name = f"video_{n_videos:06d}"
            write_video(vid_dir / f"{name}.mp4", np.stack(f))
            meta = {
                "game": args.game,
                "level_seed": seeds[i],
                "num_frames": len(f),
                "actions": [int(x) for x in a],
                "action_names": names,
                "action_groups": [action_group(combos[x]) for x in a],
                "rewards": [float(x) for x in r],
                "terminated": [False] * len(r),
                "end": end,
                "policy": "uniform-random" if args.hold == 1 else f"uniform-random, held 1-{args.hold} frames",
            }
            if window:
                meta["episode_ends"] = window
            (vid_dir / f"{name}.json").write_text(json.dumps(meta))
            n_videos += 1
            n_frames += len(f)
        frames[i], acts[i], rews[i], ends[i] = [], [], [], None

    _, obs, first = env.observe()
    info = env.get_info()
    while args.frames - n_frames >= args.min_video_frames:  # room left for one more video
        rgb = obs["rgb"]
        for i in range(args.num_envs):
            if first[i] and frames[i]:
                if window and ends[i] is None:  # an episode-ends recording keeps only pieces with their end
                    frames[i], acts[i], rews[i] = [], [], []
                else:
                    flush(i)  # the previous episode ended: never let a video cross the boundary
            if not frames[i]:
                seeds[i] = int(info[i].get("level_seed", -1))
            frames[i].append(rgb[i].copy())
            if window and len(frames[i]) > window:  # only the episode's last `window` frames are kept
                del frames[i][0], acts[i][0], rews[i][0]
        # uniformly random actions, optionally held for a random number of frames
        new = hold_left <= 0
        held[new] = rng.integers(0, n_actions, size=int(new.sum()))
        hold_left[new] = rng.integers(1, args.hold + 1, size=int(new.sum()))
        hold_left -= 1
        for i in range(args.num_envs):
            if frames[i]:
                acts[i].append(int(held[i]))
        env.act(held.astype(np.int32))
        rew, obs, first = env.observe()
        info = env.get_info()
        ep_steps += 1
        for i in range(args.num_envs):
            if first[i]:
                # the episode ended with this action; its next observation is the new episode's first
                # frame, so the transition is not in the video: keep it as the video's ``end``
                if acts[i]:
                    truncated = int(ep_steps[i]) >= args.time_limit and not info[i].get("prev_level_complete", 0)
                    ends[i] = {"action": acts[i].pop(), "reward": float(rew[i]),
                               "terminated": not truncated, "truncated": bool(truncated)}
                ep_steps[i] = 0
            elif acts[i] and not window and len(frames[i]) >= args.max_video_frames:
                # the video is full and the episode goes on: cut it here (this transition is in neither
                # video); checked after the action so that an episode ending right here keeps its ``end``
                acts[i].pop()
                flush(i)
            elif acts[i]:
                rews[i].append(float(rew[i]))
    summary = {
        "game": args.game,
        "videos": n_videos,
        "frames": n_frames,
        "level_range": [args.start_level, args.start_level + args.num_levels],
        "seed": args.seed,
        "hold": args.hold,
        "episode_ends": window,
        "outcomes": _outcome_summary(vid_dir),
        "action_names": names,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2))
    log(f"recorded {n_frames} frames in {n_videos} videos to {vid_dir} ({summary['seconds']} s)")
    return summary


def _outcome_summary(vid_dir: Path) -> dict:
    """Counts of reward events and episode ends over the recorded videos."""
    n = {"transitions": 0, "reward_events": 0, "terminations": 0, "truncations": 0}
    for meta_path in sorted(vid_dir.glob("video_*.json")):
        meta = json.loads(meta_path.read_text())
        rewards, end = meta.get("rewards", []), meta.get("end")
        n["transitions"] += len(rewards) + (end is not None)
        n["reward_events"] += sum(r > 0 for r in rewards) + bool(end and end["reward"] > 0)
        n["terminations"] += bool(end and end["terminated"])
        n["truncations"] += bool(end and end["truncated"])
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.record", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help=RecordArgs.__dataclass_fields__["out"].__doc__)
    for name, f in RecordArgs.__dataclass_fields__.items():
        if name == "out":
            continue
        p.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default)
    ns = p.parse_args(argv)
    record(RecordArgs(**vars(ns)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
