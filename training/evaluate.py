"""Evaluate a Genie checkpoint with every metric of EVALUATION.md.

    python -m training.evaluate --checkpoint weights --data data/coinrun-val --json eval.json
    python -m training.evaluate --keydriven 48 --json keys.json --strip keys.png   # metric 7, the real game

Clips: 16 consecutive frames from the validation videos (never crossing a video, so never an episode
boundary), up to ``--clips`` of them spread evenly over the videos. The true game actions recorded beside
each video are used only for the action-alignment metric (NMI).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genie_env import Genie
from genie_env.models.genie import resolve_carry
from genie_env.precision import add_dtype_options, autocast_dtype, dtype_from_options
from training.data import FrameCache, load_actions
from training.metrics import nmi, perplexity, psnr

CLIP = 16


def load_eval_clips(data_dir: str | Path, image_size: int = 64, num_clips: int = 128, clip_frames: int = CLIP,
                    log=print) -> dict:
    """Deterministic evaluation clips: {"frames": (N, 3, T, H, W) float, "groups": (N, T-1) str or None}."""
    from training.pretokenized import FrameFile, is_pretokenized

    # a frames file (`training.pretokenize --frames-out`) serves where no video decoder is installed
    cache = FrameFile(data_dir) if is_pretokenized(data_dir) else FrameCache(data_dir, image_size, log=log)
    usable = [i for i, e in enumerate(cache.videos) if e.frames >= clip_frames]
    if not usable:
        raise ValueError(f"no video in {data_dir} has {clip_frames} frames")
    takes = spread_clips([cache.videos[i].frames // clip_frames for i in usable], num_clips)
    picks: list[tuple[int, int]] = []
    for i, take in zip(usable, takes):
        windows = cache.videos[i].frames // clip_frames
        # spread the clips over the video
        for j in range(take):
            picks.append((i, (j * windows // take) * clip_frames))
    frames, groups = [], []
    have_groups = True
    for i, start in picks:
        frames.append(cache.clip(i, start, clip_frames))
        meta = None if is_pretokenized(data_dir) else load_actions(data_dir, cache.videos[i].name)
        if meta and "action_groups" in meta:
            groups.append(meta["action_groups"][start : start + clip_frames - 1])
        else:
            have_groups = False
    x = torch.from_numpy(np.stack(frames)).permute(0, 4, 1, 2, 3).float().div(255)
    return {"frames": x, "groups": np.array(groups) if have_groups else None}


def spread_clips(windows: list[int], num_clips: int) -> list[int]:
    """How many clips to take from each video, given its number of whole clip windows: as even a share
    of ``num_clips`` as the windows allow (fewer clips than videos go to evenly spaced videos)."""
    v = len(windows)
    quota = [min((k + 1) * num_clips // v - k * num_clips // v, w) for k, w in enumerate(windows)]
    left = num_clips - sum(quota)
    while left > 0 and any(q < w for q, w in zip(quota, windows)):  # short videos' shares go to the others
        for k in sorted(range(v), key=lambda k: quota[k]):
            if left and quota[k] < windows[k]:
                quota[k] += 1
                left -= 1
    return quota


def _batches(n: int, bs: int):
    for i in range(0, n, bs):
        yield slice(i, min(n, i + bs))


def tokens_changed(tokens: torch.Tensor) -> float:
    """Share of token positions whose code differs from the frame before, over (B, T, h, w) tokens."""
    return float((tokens[:, 1:] != tokens[:, :-1]).float().mean()) if tokens.shape[1] > 1 else 0.0


AR_FRAMES = (1, 4, 8, 15)


@torch.no_grad()
def context_tokenizer_metrics(model: Genie, x: torch.Tensor, bs: int = 16) -> dict:
    """A tokenizer with context over (N, 3, T, H, W) clips, frame 0 real and the context of frame 1.

    ``tokenizer_psnr_cl`` (the headline ``tokenizer_psnr``) and ``tokenizer_psnr_cl@k``: frames 1.. coded
    and decoded closed loop, as a model trains and plays on them (`encode`, `encode_closed_loop`);
    ``tokenizer_psnr_tf``: frames 1.. coded against the real frame before and decoded against it
    (teacher forcing, how pairs train); ``tokenizer_psnr_ar`` and ``tokenizer_psnr_ar@k``: those
    teacher-forced tokens decoded frame by frame against the previous decoded frame (open loop: the
    drift closed-loop coding removes); ``tokenizer_psnr_nocontext``: frame 0 coded alone;
    ``tokens_changed`` (teacher forced) and ``tokens_changed_cl`` between consecutive frames 1..;
    "_tokens" (N, T, h, w) as `Genie.tokenize` gives them; "_decoded" (N, 3, T, H, W) frame 0 and the
    closed-loop decodes of frames 1.. ."""
    tok = model.tokenizer
    tf, ar, cl, alone, tf_toks, cl_toks, decs, play_toks = [], [], [], [], [], [], [], []
    with model._autocast():
        for sl in _batches(x.shape[0], bs):
            clip = x[sl]
            full = tok.encode_teacher_forced(clip)  # frame t against the real frame t-1, frame 0 alone
            t = full[:, 1:]
            tf_toks.append(full)
            play_toks.append(tok.encode(clip))
            prev = tok._previous(clip[:, :, 1:], clip[:, :, 0])
            tf.append(psnr(tok.decode_given(t, prev), clip[:, :, 1:]))
            ar.append(psnr(tok.decode(t, context=clip[:, :, 0]).float(), clip[:, :, 1:]))
            cl_tokens, cl_dec = tok.encode_closed_loop(clip[:, :, 1:], context=clip[:, :, 0])
            cl.append(psnr(cl_dec, clip[:, :, 1:]))
            cl_toks.append(cl_tokens)
            decs.append(torch.cat([clip[:, :, :1], cl_dec.float()], dim=2))
            alone.append(psnr(tok.decode(full[:, :1]).float(), clip[:, :, :1]))
    tf_all, ar_all, cl_all = torch.cat(tf_toks), torch.cat(ar), torch.cat(cl)
    res = {"tokenizer_psnr": float(cl_all.mean()), "tokenizer_psnr_tf": float(torch.cat(tf).mean()),
           "tokenizer_psnr_ar": float(ar_all.mean()), "tokenizer_psnr_cl": float(cl_all.mean())}
    for k in AR_FRAMES:
        if k <= ar_all.shape[1]:
            res[f"tokenizer_psnr_ar@{k}"] = float(ar_all[:, k - 1].mean())
            res[f"tokenizer_psnr_cl@{k}"] = float(cl_all[:, k - 1].mean())
    res["tokenizer_psnr_nocontext"] = float(torch.cat(alone).mean())
    res["tokens_changed"] = tokens_changed(tf_all[:, 1:])
    res["tokens_changed_cl"] = tokens_changed(torch.cat(cl_toks))
    res["codebook_usage"] = float(tf_all.unique().numel() / model.config.tokenizer_vocab_size)
    return {**res, "_tokens": torch.cat(play_toks), "_decoded": torch.cat(decs)}


@torch.no_grad()
def tokenizer_metrics(model: Genie, x: torch.Tensor, bs: int = 16) -> dict:
    if model.config.tokenizer_context:
        return context_tokenizer_metrics(model, x, bs)
    ps, toks = [], []
    for sl in _batches(x.shape[0], bs):
        t = model.tokenize(x[sl])
        toks.append(t)
        ps.append(psnr(model.detokenize(t), x[sl]))
    tok = torch.cat(toks)
    return {"tokenizer_psnr": float(torch.cat(ps).mean()), "tokens_changed": tokens_changed(tok),
            "codebook_usage": float(tok.unique().numel() / model.config.tokenizer_vocab_size),
            "_tokens": tok}


@torch.no_grad()
def action_metrics(model: Genie, x: torch.Tensor, groups: np.ndarray | None, bs: int = 16) -> dict:
    acts = torch.cat([model.infer_actions(x[sl]) for sl in _batches(x.shape[0], bs)])
    host = acts.cpu().numpy()
    res = {"latent_action_perplexity": perplexity(host, model.config.action_vocab_size), "_actions": acts}
    if groups is not None:
        res["action_nmi"] = nmi(host, groups)
    return res


@torch.no_grad()
def rollout(model: Genie, x: torch.Tensor, actions: torch.Tensor, steps: int, seed: int, bs: int = 32,
            maskgit_steps: int | None = None, temperature: float | None = None) -> torch.Tensor:
    """Prompt with frame 0, generate ``steps`` frames under ``actions`` -> (N, 3, steps + 1, H, W)."""
    outs = []
    for k, sl in enumerate(_batches(x.shape[0], bs)):
        g = torch.Generator(device=model.device).manual_seed(seed + k)  # sampling draws on the model's device
        outs.append(model.generate(x[sl, :, 0], steps + 1, actions=actions[sl, :steps], generator=g,
                                   maskgit_steps=maskgit_steps, temperature=temperature))
    return torch.cat(outs)


@torch.no_grad()
def dynamics_metrics(model: Genie, x: torch.Tensor, actions: torch.Tensor, tokens: torch.Tensor, seed: int = 0,
                     horizons=(4, 15), maskgit_steps: int | None = None, temperature: float | None = None) -> dict:
    res: dict = {}
    h_max = max(horizons)
    gen = rollout(model, x, actions, h_max, seed, maskgit_steps=maskgit_steps, temperature=temperature)
    codec_prompt = model.detokenize(tokens[:, :1])[:, :, 0]
    for t in horizons:
        truth = x[:, :, t]
        res[f"rollout_psnr@{t}"] = float(psnr(gen[:, :, t], truth).mean())
        res[f"pixel_copy_psnr@{t}"] = float(psnr(x[:, :, 0], truth).mean())
        res[f"codec_copy_psnr@{t}"] = float(psnr(codec_prompt, truth).mean())
        res[f"gain_over_copy@{t}"] = res[f"rollout_psnr@{t}"] - max(res[f"pixel_copy_psnr@{t}"],
                                                                    res[f"codec_copy_psnr@{t}"])
    g = torch.Generator().manual_seed(seed + 12345)
    rand_actions = torch.randint(0, model.config.action_vocab_size, actions.shape, generator=g)
    gen_r = rollout(model, x, rand_actions, 4, seed, maskgit_steps=maskgit_steps, temperature=temperature)
    res["rollout_psnr@4_random_actions"] = float(psnr(gen_r[:, :, 4], x[:, :, 4]).mean())
    res["delta_t_psnr@4"] = res["rollout_psnr@4"] - res["rollout_psnr@4_random_actions"]
    res["_rollout"] = gen
    return res


def evaluate(model: Genie, clips: dict, seed: int = 0, maskgit_steps: int | None = None,
             temperature: float | None = None, dynamics: bool = True) -> dict:
    x, groups = clips["frames"].to(model.device), clips["groups"]
    t0 = time.time()
    res = {"clips": int(x.shape[0])}
    tm = tokenizer_metrics(model, x)
    am = action_metrics(model, x, groups)
    res.update({k: v for k, v in tm.items() if not k.startswith("_")})
    res.update({k: v for k, v in am.items() if not k.startswith("_")})
    if dynamics:
        dm = dynamics_metrics(model, x, am["_actions"], tm["_tokens"], seed=seed, maskgit_steps=maskgit_steps,
                              temperature=temperature)
        res.update({k: v for k, v in dm.items() if not k.startswith("_")})
        res["_rollout"] = dm["_rollout"]
        res["maskgit_steps"] = int(maskgit_steps or model.config.maskgit_steps)
        res["temperature"] = float(model.config.temperature if temperature is None else temperature)
        res["carry"] = resolve_carry(model.config, None)
    res["seconds"] = round(time.time() - t0, 1)
    return res


@torch.no_grad()
def evaluate_stage(model: Genie, stage: str, clips: dict, samples_to: Path | None = None) -> dict:
    """Validation during training: the metrics that the stage can move."""
    x = clips["frames"].to(model.device)
    if stage == "tokenizer":
        tm = tokenizer_metrics(model, x)
        if samples_to and "_decoded" in tm:  # rows: real, decoded as at play time; columns: frames 0..
            save_strip(torch.stack([x[:4], tm["_decoded"][:4]], 1).flatten(0, 1).transpose(1, 2)[:, :8],
                       samples_to.with_suffix(".png"))
        elif samples_to:
            n = min(8, x.shape[0])
            save_strip(torch.stack([x[:n, :, 0], model.detokenize(tm["_tokens"][:n, :1])[:, :, 0]], 1),
                       samples_to.with_suffix(".png"))
        return {k: v for k, v in tm.items() if not k.startswith("_")}
    if stage == "lam":
        res = {k: v for k, v in action_metrics(model, x, clips["groups"]).items() if not k.startswith("_")}
        out = model.latent_actions(x)
        res["lam_pred_psnr"] = float(psnr(out.prediction, x[:, :, 1:]).mean())
        res["lam_copy_psnr"] = float(psnr(x[:, :, :-1], x[:, :, 1:]).mean())
        return res
    sub = {"frames": x[:16], "groups": None if clips["groups"] is None else clips["groups"][:16]}
    res = evaluate(model, sub)
    gen = res.pop("_rollout")
    if samples_to:
        save_strip(torch.stack([x[:4, :, : gen.shape[2]], gen[:4]], 1).flatten(0, 1).transpose(1, 2),
                   samples_to.with_suffix(".png"))
        save_gif(torch.cat([x[:4, :, : gen.shape[2]], gen[:4]], dim=-1), samples_to.with_suffix(".gif"))
    return res


def save_strip(frames: torch.Tensor, path: Path, scale: int = 2) -> None:
    """Save (rows, cols, 3, H, W) frames in [0, 1] as one PNG grid."""
    from PIL import Image

    rows, cols, _, h, w = frames.shape
    grid = frames.detach().cpu().permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3)
    img = Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy())
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_gif(clips: torch.Tensor, path: Path, scale: int = 3, fps: int = 8) -> None:
    """Save (B, 3, T, H, W) clips in [0, 1] as one animated GIF, the clips side by side."""
    from PIL import Image

    b, _, t, h, w = clips.shape
    frames = clips.detach().cpu().permute(2, 3, 0, 4, 1).reshape(t, h, b * w, 3)
    imgs = [Image.fromarray((f.clamp(0, 1) * 255).round().byte().numpy()).resize((b * w * scale, h * scale),
                                                                                 Image.NEAREST) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)


def print_table(res: dict) -> None:
    width = max(len(k) for k in res)
    for k, v in res.items():
        if k.startswith("_"):
            continue
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--keydriven" or a.startswith("--keydriven=") for a in argv):
        # metric 7 plays the real game instead of reading clips: its own options (training/keydriven.py)
        from training.keydriven import main as keydriven_main

        return keydriven_main(argv)
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="release folder or hub repo id (default: shipped model)")
    p.add_argument("--data", type=Path, required=True, help="validation dataset folder")
    p.add_argument("--clips", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maskgit-steps", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--carry", action=argparse.BooleanOptionalAction, default=None,
                   help="carry unchanged tokens' patches over sharp (default: the model's config.carry_unchanged)")
    add_dtype_options(p)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--strip", type=Path, default=None, help="save a rollout strip PNG here")
    p.add_argument("--outcome-max-inside", type=int, default=None,
                   help="metric 8 (models with reward / episode-end heads): every end transition and this many "
                        "others, weighted (default: every transition); dreams: python -m training.outcomes")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    model = Genie.from_pretrained(a.checkpoint, device=device)
    if a.carry is not None:
        model.config.carry_unchanged = a.carry
    a.dtype = dtype_from_options(a, model.device)
    model.autocast_dtype = autocast_dtype(a.dtype)
    clips = load_eval_clips(a.data, model.config.image_size, num_clips=a.clips)
    res = evaluate(model, clips, seed=a.seed, maskgit_steps=a.maskgit_steps, temperature=a.temperature)
    if model.outcomes is not None:  # metric 8 on the real transitions of --data
        from genie_env.env import load_action_map
        from training.outcomes import metric8

        res["reward_and_episode_end"] = metric8(model, [a.data], load_action_map(model), a.outcome_max_inside,
                                                seed=a.seed)[str(a.data)]
    res["threads"] = torch.get_num_threads()
    res["bf16"] = a.dtype == "bf16"
    res["dtype"] = a.dtype
    res["device"] = str(model.device)
    res["checkpoint"] = str(a.checkpoint or "shipped default")
    res["data"] = str(a.data)
    gen = res.pop("_rollout", None)
    print_table(res)
    if a.strip is not None and gen is not None:
        x = clips["frames"].to(gen.device)
        save_strip(torch.stack([x[:4], gen[:4]], 1).flatten(0, 1).transpose(1, 2), a.strip)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
