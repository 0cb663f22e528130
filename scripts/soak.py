"""Soak test: resident memory and time per step stay flat over long runs.

    python scripts/soak.py --steps 10000 --vector-steps 100000 --num-envs 8              # the shipped model
    python scripts/soak.py --steps 10000 --vector-steps 100000 --num-envs 8 --tiny       # a tiny random model
    python scripts/soak.py --checkpoint runs/x/dynamics/release --json soak.json

Plays one ``--steps``-step episode of ``Genie-v0`` (random actions), then ``--vector-steps`` steps of the
vector env of ``--num-envs`` envs with Gymnasium's autoreset (episodes truncated after
``--vector-episode-steps``, 1000 as registered), sampling resident memory (RSS) and the mean time per
step over each interval. Prints the curves (step, RSS MB, ms/step) and a summary: RSS after warm-up and
at the end, time per step in the first and last intervals, whether the KV cache kept its shape and
storage, and the number of Python objects alive. ``--tiny`` builds a tiny random checkpoint in a temp
folder, for a run before trained weights exist (it measures the env machinery, not the model's speed).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import genie_env  # noqa: F401  (registers Genie-v0)
from genie_env.benchmark import rss_mb

# The tiny model of the test suite (16x16 frames, 2 dynamics layers of width 32).
TINY = dict(
    image_size=16, num_frames=4, tokenizer_vocab_size=32, tokenizer_patch_size=4, tokenizer_channels=8,
    tokenizer_latent_dim=8, action_vocab_size=8, lam_channels=8, lam_latent_dim=8, dynamics_dim=32,
    dynamics_depth=2, dynamics_num_heads=2, context_frames=4, maskgit_steps=2, temperature=1.0,
)


def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random tiny checkpoint with a prompt bank and an action map, as shipped models have."""
    from genie_env import Genie, GenieConfig

    torch.manual_seed(seed)
    model = Genie(GenieConfig(**TINY)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    size = model.config.image_size
    frames = np.random.default_rng(seed).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    np.savez(folder / "prompts.npz", frames=frames)
    (folder / "action_map.json").write_text(json.dumps({"NONE": 0, "LEFT": 1, "RIGHT": 2, "UP": 3}))
    model.save_pretrained(folder, extra_files={"prompts.npz": folder / "prompts.npz",
                                               "action_map.json": folder / "action_map.json"})
    return folder


def cache_signature(session) -> list[tuple]:
    """Shape, dtype and storage address of every KV cache tensor: unchanged when the cache is updated in
    place and never grows."""
    c = session.cache
    return [(tuple(t.shape), str(t.dtype), t.data_ptr()) for t in (c.k, c.v, c.age, c.ptr)]


def session_containers(session) -> dict[str, int]:
    """Lengths of the Python containers a session holds (none may grow with the steps)."""
    return {k: len(v) for k, v in vars(session).items() if isinstance(v, (list, dict, tuple, set))}


def soak(step_fn, steps: int, every: int, warmup: int, label: str, log=print) -> dict:
    """Call step_fn(i) ``steps`` times; sample RSS and mean ms/step every ``every`` steps."""
    curve = []
    gc.collect()
    t_last = time.perf_counter()
    for i in range(1, steps + 1):
        step_fn(i)
        if i % every == 0 or i == steps:
            now = time.perf_counter()
            n = every if i % every == 0 else i % every
            curve.append({"step": i, "rss_mb": round(rss_mb(), 2), "ms_per_step": round((now - t_last) / n * 1000, 3)})
            log(f"{label:>7} step {i:>7}  RSS {curve[-1]['rss_mb']:8.1f} MB  {curve[-1]['ms_per_step']:7.2f} ms/step")
            t_last = time.perf_counter()
    after = next(p for p in curve if p["step"] >= warmup)
    return {
        "steps": steps, "curve": curve,
        "rss_after_warmup_mb": after["rss_mb"], "rss_end_mb": curve[-1]["rss_mb"],
        "rss_growth_mb": round(curve[-1]["rss_mb"] - after["rss_mb"], 2),
        "rss_max_mb": max(p["rss_mb"] for p in curve),
        "ms_per_step_first": curve[0]["ms_per_step"], "ms_per_step_last": curve[-1]["ms_per_step"],
        "ms_per_step_median": float(np.median([p["ms_per_step"] for p in curve])),
    }


def session_health(current, session, before: tuple, objects: int) -> dict:
    """After a soak: whether the env still uses the same session, whether its KV cache and containers are
    as they were (``before`` from `cache_signature` and `session_containers`), and how many Python
    objects appeared since ``objects`` were counted."""
    gc.collect()
    return {
        "one_session": current is session,
        "kv_cache_unchanged": cache_signature(session) == before[0],
        "session_containers_unchanged": session_containers(session) == before[1],
        "kv_cache_shape": list(session.cache.k.shape),
        "python_objects_growth": len(gc.get_objects()) - objects,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10_000, help="length of the single-env episode")
    p.add_argument("--vector-steps", type=int, default=100_000, help="steps of the vector env")
    p.add_argument("--num-envs", type=int, default=8, help="envs in the vector env")
    p.add_argument("--vector-episode-steps", type=int, default=1000, help="truncation of the vector env's episodes")
    p.add_argument("--checkpoint", type=str, default=None, help="checkpoint folder or hub id (default: shipped)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random checkpoint built in a temp folder")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="inference dtype (default: the env's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the env's)")
    p.add_argument("--points", type=int, default=50, help="samples per curve")
    p.add_argument("--warmup", type=float, default=0.1, help="share of the steps before the reference RSS")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the curves and the summary here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tmp = None
    checkpoint = args.checkpoint
    if args.tiny:
        tmp = tempfile.TemporaryDirectory()
        checkpoint = str(tiny_checkpoint(Path(tmp.name) / "tiny"))
    kwargs = {"checkpoint": checkpoint, "dtype": args.dtype, "device": args.device}
    try:
        env = gym.make("Genie-v0", max_episode_steps=args.steps, **kwargs)
    except ValueError as e:  # CheckpointError: e.g. no shipped weights yet
        print(f"error: {e}\n(use --tiny for a tiny random model, or --checkpoint DIR)", file=sys.stderr)
        return 2
    report: dict = {"checkpoint": checkpoint or "shipped", "tiny": args.tiny, "threads": args.threads,
                    "torch": torch.__version__}
    rng = np.random.default_rng(args.seed)

    # ---- one long episode
    env.reset(seed=args.seed)
    session = env.unwrapped._session
    before = (cache_signature(session), session_containers(session))
    actions = rng.integers(0, env.action_space.n, args.steps + 1)
    ended = []

    def env_step(i: int) -> None:
        _, _, terminated, truncated, _ = env.step(int(actions[i]))
        if terminated or truncated:
            ended.append(i)

    print(f"Genie-v0: one episode of {args.steps} steps")
    objects = len(gc.get_objects())
    res = soak(env_step, args.steps, max(1, args.steps // args.points), int(args.steps * args.warmup), "env")
    res["episode_ended_at"] = ended
    res.update(session_health(env.unwrapped._session, session, before, objects))
    report["env"] = res
    env.close()

    # ---- the vector env with autoreset
    envs = gym.make_vec("Genie-v0", num_envs=args.num_envs, vectorization_mode="vector_entry_point",
                        max_episode_steps=args.vector_episode_steps, **kwargs)
    envs.reset(seed=args.seed)
    session = envs.unwrapped.session
    before = (cache_signature(session), session_containers(session))
    resets = {"n": 0}

    def vec_step(i: int) -> None:
        _, _, terminated, truncated, _ = envs.step(rng.integers(0, envs.single_action_space.n, args.num_envs))
        resets["n"] += int(np.sum(terminated | truncated))

    print(f"vector env: {args.num_envs} envs, {args.vector_steps} steps, episodes of {args.vector_episode_steps}")
    objects = len(gc.get_objects())
    res = soak(vec_step, args.vector_steps, max(1, args.vector_steps // args.points),
               int(args.vector_steps * args.warmup), "vector")
    res["episodes_ended"] = resets["n"]
    res.update(session_health(envs.unwrapped.session, session, before, objects))
    report["vector"] = res
    envs.close()

    for name in ("env", "vector"):
        r = report[name]
        print(f"{name}: {r['steps']} steps; RSS {r['rss_after_warmup_mb']:.1f} MB after warm-up -> "
              f"{r['rss_end_mb']:.1f} MB at the end ({r['rss_growth_mb']:+.1f} MB, max {r['rss_max_mb']:.1f}); "
              f"{r['ms_per_step_first']:.2f} -> {r['ms_per_step_last']:.2f} ms/step (median "
              f"{r['ms_per_step_median']:.2f}); KV cache {r['kv_cache_shape']} "
              f"{'unchanged' if r['kv_cache_unchanged'] else 'CHANGED'}; "
              f"Python objects {r['python_objects_growth']:+d}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
