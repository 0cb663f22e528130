"""Turn a trained release folder into a shippable model folder: weights in half precision, a bank of real
prompt frames from validation levels, the action map, and the evaluation figures.

    python -m training.export --release runs/coinrun/dynamics/release --val-data data/coinrun-val --out weights

The action map says, for each true action group (LEFT, RIGHT, UP = jump, ...), which latent action is
most associated with it: latent actions are inferred on recorded validation transitions whose true
actions are known, and each group gets the latent action with the highest pointwise mutual information
with it (each latent action used once, strongest associations first). The viewer's arrow keys use it.
A release that carries an action_map.json keeps it (a dynamics trained with ``key_actions`` learned the
keys through that map).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from genie_env import Genie
from genie_env.config import ConfigError
from genie_env.env import load_action_map, max_prompt_frames
from genie_env.hub import EXTRA_FILES
from training.data import FrameCache, load_actions

GROUPS = ("LEFT", "RIGHT", "UP", "LEFT+UP", "RIGHT+UP", "NONE")


def prompt_bank(val_data: Path, size: int, n: int = 256, seed: int = 0, frames: int = 1) -> np.ndarray:
    """Real prompts from the validation videos (one episode each): each video's first clip, then clips
    drawn uniformly at random. ``frames`` = 1: (n, H, W, 3) uint8 start frames; more: (n, frames, H, W, 3)
    clips of consecutive frames of one episode, the start frame last (the env primes the model with the
    frames before it). Videos shorter than ``frames`` are skipped."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    cache = FrameCache(val_data, size, log=lambda *a: None)
    usable = [i for i, v in enumerate(cache.videos) if v.frames >= frames]
    if not usable:
        raise ValueError(f"{val_data}: no video has {frames} frames for a prompt clip")
    rng = np.random.default_rng(seed)
    clips = [np.asarray(cache.clip(i, 0, frames)) for i in usable][:n]
    while len(clips) < n:
        i = usable[int(rng.integers(len(usable)))]
        clips.append(np.asarray(cache.clip(i, int(rng.integers(cache.videos[i].frames - frames + 1)), frames)))
    out = np.stack(clips)
    return out[:, 0] if frames == 1 else out


@torch.no_grad()
def infer_with_groups(model: Genie, val_data: Path, max_transitions: int = 20000, clip: int = 16
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Latent actions and true action groups of recorded validation transitions."""
    cache = FrameCache(val_data, model.config.image_size, log=lambda *a: None)
    lat, grp = [], []
    total = 0
    for i, e in enumerate(cache.videos):
        meta = load_actions(val_data, e.name)
        if not meta or "action_groups" not in meta:
            continue
        for start in range(0, e.frames - clip + 1, clip):
            x = torch.from_numpy(np.array(cache.clip(i, start, clip))).permute(3, 0, 1, 2)[None].float() / 255
            lat.append(model.infer_actions(x)[0].cpu().numpy())
            grp.append(np.array(meta["action_groups"][start : start + clip - 1]))
            total += clip - 1
            if total >= max_transitions:
                break
        if total >= max_transitions:
            break
    if not lat:
        raise ValueError(f"{val_data} has no true actions stored beside its videos (video_*.json)")
    return np.concatenate(lat), np.concatenate(grp)


def action_map(latents: np.ndarray, groups: np.ndarray, n_actions: int) -> dict:
    """{group: latent action} by pointwise mutual information, greedy and one-to-one."""
    present = [g for g in GROUPS if (groups == g).any()]
    joint = np.zeros((len(present), n_actions))
    for gi, g in enumerate(present):
        joint[gi] = np.bincount(latents[groups == g], minlength=n_actions)
    p = joint / joint.sum()
    pg, pa = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.where(p > 0, np.log(p / (pg * pa)), -np.inf)
    out: dict = {}
    used_g, used_a = set(), set()
    for flat in np.argsort(-pmi, axis=None):
        gi, a = np.unravel_index(flat, pmi.shape)
        if gi in used_g or a in used_a or not np.isfinite(pmi[gi, a]):
            continue
        out[present[gi]] = int(a)
        used_g.add(gi)
        used_a.add(a)
    for gi, g in enumerate(present):  # more groups than actions: fall back to the best, shared
        if g not in out:
            out[g] = int(np.argmax(pmi[gi]))
    return {"map": out, "counts": {g: joint[gi].astype(int).tolist() for gi, g in enumerate(present)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n")[0])
    p.add_argument("--release", type=Path, required=True)
    p.add_argument("--val-data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--prompt-frames", type=int, default=None,
                   help="frames of each prompt clip, the start frame last (1 = single start frames); the "
                        "env primes the model with the ones before the start (default: 4, fewer when the "
                        "model's context window is shorter)")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--maskgit-steps", type=int, default=None,
                   help="the shipped default number of MaskGIT steps (default: the release's)")
    p.add_argument("--temperature", type=float, default=None,
                   help="the shipped default sampling temperature (default: the release's)")
    a = p.parse_args(argv)
    model = Genie.from_pretrained(a.release)
    sampling = {k: v for k, v in (("maskgit_steps", a.maskgit_steps), ("temperature", a.temperature)) if v is not None}
    if sampling:
        try:
            model.config = dataclasses.replace(model.config, **sampling)
        except ConfigError as e:
            p.error(str(e))
    most = max_prompt_frames(model.config.context_frames)
    if a.prompt_frames is None:
        a.prompt_frames = min(4, most)
    if not 1 <= a.prompt_frames <= most:
        p.error(f"--prompt-frames must be in [1, {most}] (the model's context "
                f"window less the generated frame), got {a.prompt_frames}")
    try:
        frames = prompt_bank(a.val_data, model.config.image_size, a.prompts, frames=a.prompt_frames)
    except ValueError as e:
        p.error(str(e))
    keep_card = a.out.resolve() != a.release.resolve()
    trained_map = load_action_map(model)  # {} when the release carries none
    model.extra_files = {k: v for k, v in model.extra_files.items() if k == "README.md" and keep_card}
    tmp = a.out.with_name(a.out.name + ".extras")
    tmp.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(tmp / "prompts.npz", frames=frames)
    lat, grp = infer_with_groups(model, a.val_data)
    am = action_map(lat, grp, model.config.action_vocab_size)
    if trained_map:  # a release's own map: its dynamics may have learned the keys through it
        if trained_map != am["map"]:
            print(f"kept the release's action map {trained_map}; {a.val_data} alone would give {am['map']}")
        am["map"] = trained_map
    (tmp / "action_map.json").write_text(json.dumps(am["map"], indent=1) + "\n")
    extras = {"prompts.npz": tmp / "prompts.npz", "action_map.json": tmp / "action_map.json"}
    for name in EXTRA_FILES:  # the model card and its pictures stay
        if name not in extras and (a.out / name).is_file():
            extras[name] = a.out / name
    dtype = torch.float16 if a.dtype == "fp16" else None
    model.save_pretrained(a.out, dtype=dtype, extra_files=extras)
    for f in extras.values():
        if f.parent == tmp:
            f.unlink()
    tmp.rmdir()
    print(f"wrote {a.out}: {len(frames)} prompts of {a.prompt_frames} frame(s), action map {am['map']}")
    print("latent action counts per true action group:", json.dumps(am["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
