"""Key-driven fidelity against the real game (EVALUATION.md, metric 7): what a player of Genie-v0 gets.

    python -m training.evaluate --keydriven 48 --threads 1 --json keys.json --strip keys.png
    python -m training.keydriven --keydriven 48 ...            # the same command

From a real CoinRun state on a validation level (reached by a few steps of held random play, so the agent
may be moving) the game state is saved; for each key group of the checkpoint's action map (LEFT, RIGHT,
NONE, UP, LEFT+UP, RIGHT+UP) the state is restored and the key held for 8 steps in the real game, while
the model, primed as `GenieEnv.reset` primes it (the start frame and, where the checkpoint's prompt bank
holds clips, the real frames before it), holds the mapped latent action for 8 steps. All starts and keys
of the model side run as one batch per chunk, under a fixed seed and the checkpoint's sampling settings.

Figures: PSNR(model, real) at t = 1..8 next to copy (the start frame against real frame t); key accuracy
over ordered key pairs whose real frames at t = 8 differ; the view's horizontal shift under RIGHT minus
under LEFT at t = 8 and its vertical shift under UP minus NONE at t = 4, model against real (sign
agreement and the ratio of the means), each with a 95% interval over the starts (resampled). A start is
used only if no key ends the episode within 8 steps (a death or the coin would show the next level's first
frame), so each start is replayed further until it qualifies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genie_env import Genie
from genie_env.env import load_action_map, load_prompt_bank, max_prompt_frames
from genie_env.models.genie import resolve_carry
from genie_env.precision import add_dtype_options, autocast_dtype, dtype_from_options
from training.metrics import psnr

KEYS = ("LEFT", "RIGHT", "NONE", "UP", "LEFT+UP", "RIGHT+UP")
"""The key groups, in the order of every key axis below (EVALUATION.md metric 5's groups)."""

DIFFER_MSE = 0.002
"""Real frames of two keys count as different above this MSE (key accuracy only uses such pairs)."""

FLOORS = {
    "psnr_above_copy": "key-driven PSNR above copy at every t = 1..8 (goal: copy + 2 dB at t = 8)",
    "key_accuracy": (0.85, 0.95),
    "scroll_ratio": ((0.8, 1.25), (0.9, 1.1)),
    "jump_agreement": (0.9, 0.98),
}
"""What a new model must reach (floor, goal), issue 14."""


@dataclass
class KeyArgs:
    starts: int = 48
    """Real game states to start from (>= 48 for a reported figure)."""
    steps: int = 8
    """Steps each key is held."""
    warmup: int = 8
    """Steps of held random play before a start state is saved."""
    prompt_frames: int = 1
    """Real frames the model is primed with, ending at the start frame (the command's default: as many as
    Genie-v0's reset primes with, the length of the checkpoint's prompt clips, `bank_prompt_frames`)."""
    start_level: int = 1_000_000
    """First level of the validation range."""
    num_levels: int = 1000
    """Levels in the validation range."""
    distribution_mode: str = "hard"
    """procgen distribution mode, as the recordings."""
    seed: int = 0
    """Seed of the warm-up play, procgen's level draws and the model's sampling."""
    batch: int = 48
    """Model rows (start x key) per forward chunk."""
    max_shift: int = 16
    """Largest view shift searched, in pixels (at 64 x 64)."""
    long_keys: str = "RIGHT*8,RIGHT+UP*8"
    """Key sequence of the long keyboard rollout (KEY*count, comma separated), repeated to ``long_steps``;
    empty = none. Holding RIGHT alone often leaves the agent pushing against the first step of the level."""
    long_steps: int = 64
    """Steps of the long keyboard rollout."""
    long_starts: int = 3
    """Starts shown in the long rollout strip."""


# ---------------------------------------------------------------------------------------------- metrics
def grey(frames: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> (..., H, W) luma."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=frames.dtype, device=frames.device)
    return (frames * w[:, None, None]).sum(-3)


def view_shift(a: torch.Tensor, b: torch.Tensor, max_shift: int = 16) -> torch.Tensor:
    """How far the view moved from frame ``a`` to frame ``b``: (..., 3, H, W) pairs -> (..., 2) integer
    (dx, dy) in pixels, x to the right and y *up* (the camera's motion, so holding RIGHT gives dx > 0 and a
    jump dy > 0). The best integer shift of the grey images within ``max_shift`` by mean squared error over
    the overlap; among equal errors the smallest shift wins (a blank sky does not move)."""
    if a.shape != b.shape:
        raise ValueError(f"frames to compare must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    h, w = a.shape[-2:]
    if not 0 <= max_shift < min(h, w) // 2:
        raise ValueError(f"max_shift must be in [0, {min(h, w) // 2}) for {h}x{w} frames, got {max_shift}")
    ga, gb = grey(a.float()), grey(b.float())
    lead = ga.shape[:-2]
    best = torch.full(lead, float("inf"))
    out = torch.zeros(*lead, 2, dtype=torch.long)
    cands = [(dx, dy) for dx in range(-max_shift, max_shift + 1) for dy in range(-max_shift, max_shift + 1)]
    cands.sort(key=lambda s: (abs(s[0]) + abs(s[1]), s))
    for dx, dy in cands:
        # the camera moved right by dx and up by dy: b[y, x] shows what a showed at [y - dy, x + dx]
        ya, yb = (slice(-dy, h), slice(0, h + dy)) if dy < 0 else (slice(0, h - dy), slice(dy, h))
        xa, xb = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
        err = (ga[..., ya, xa] - gb[..., yb, xb]).pow(2).mean((-2, -1))
        better = err < best - 1e-9
        best = torch.where(better, err, best)
        out[better] = torch.tensor([dx, dy])
    return out


def _mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() - y.float()).pow(2).mean((-3, -2, -1))


BOOTSTRAP = 2000
"""Resamples of the starts behind each figure's 95% interval (a percentile bootstrap over starts)."""


def _resamples(n: int, seed: int = 0) -> torch.Tensor:
    """(BOOTSTRAP, n) start indices drawn with replacement, the same for every figure (fixed seed)."""
    return torch.randint(0, n, (BOOTSTRAP, n), generator=torch.Generator().manual_seed(seed))


def _interval(values: torch.Tensor) -> list[float]:
    """The 2.5% and 97.5% points of a figure over the resamples (resamples where it is undefined, such as a
    ratio over a zero real mean, are left out)."""
    v = values.double()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return [float("nan"), float("nan")]
    return [float(torch.quantile(v, 0.025)), float(torch.quantile(v, 0.975))]


def key_metrics(real: torch.Tensor, gen: torch.Tensor, keys: tuple[str, ...] = KEYS, max_shift: int = 16,
                jump_t: int = 4) -> dict:
    """Metric 7 from real and generated frames (N starts, K keys, 1 + T steps, 3, H, W) in [0, 1], frame 0
    being the start frame (the same for every key). Returns the figures as floats and lists; the key
    accuracy, scroll and jump figures come with 95% intervals over the starts (``*_ci``: the starts
    resampled)."""
    if real.shape != gen.shape or real.dim() != 6:
        raise ValueError(f"real and gen must both be (starts, keys, 1 + steps, 3, H, W), got {tuple(real.shape)} "
                         f"and {tuple(gen.shape)}")
    n, k, t1 = real.shape[:3]
    if k != len(keys):
        raise ValueError(f"{k} keys in the frames but {len(keys)} names: {keys}")
    steps = t1 - 1
    ix = {name: i for i, name in enumerate(keys)}
    start = real[:, :, :1].expand_as(real)
    model_psnr = psnr(gen[:, :, 1:].flatten(0, 1).transpose(1, 2), real[:, :, 1:].flatten(0, 1).transpose(1, 2))
    copy_psnr = psnr(start[:, :, 1:].flatten(0, 1).transpose(1, 2), real[:, :, 1:].flatten(0, 1).transpose(1, 2))
    res: dict = {
        "starts": n, "keys": list(keys), "steps": steps,
        "psnr": [float(v) for v in model_psnr.mean(0)],
        "copy_psnr": [float(v) for v in copy_psnr.mean(0)],
        "psnr_by_key": {name: float(model_psnr.view(n, k, steps)[:, i, -1].mean()) for i, name in enumerate(keys)},
        "copy_psnr_by_key": {name: float(copy_psnr.view(n, k, steps)[:, i, -1].mean()) for i, name in enumerate(keys)},
    }
    # key accuracy: ordered pairs (A, B) whose real frames at the last step differ
    r_end, g_end = real[:, :, -1], gen[:, :, -1]
    real_pair = _mse(r_end[:, :, None], r_end[:, None, :])           # (n, A, B)
    gen_to_real = _mse(g_end[:, :, None], r_end[:, None, :])         # (n, A, B): model under A vs real under B
    own = gen_to_real.diagonal(dim1=1, dim2=2)[:, :, None]           # (n, A, 1): model under A vs real under A
    pairs = (real_pair > DIFFER_MSE) & ~torch.eye(k, dtype=torch.bool)
    correct = (own < gen_to_real) & pairs
    res["key_pairs"] = int(pairs.sum())
    res["key_accuracy"] = float(correct.sum() / pairs.sum()) if pairs.any() else float("nan")
    boot = _resamples(n)
    per_correct, per_pairs = correct.sum((1, 2)).double(), pairs.sum((1, 2)).double()
    res["key_accuracy_ci"] = _interval(per_correct[boot].sum(1) / per_pairs[boot].sum(1))
    # scroll (RIGHT - LEFT, horizontal, last step) and jump (UP - NONE, vertical, step jump_t)
    checks = (("scroll", ("RIGHT", "LEFT"), steps, 0), ("jump", ("UP", "NONE"), min(jump_t, steps), 1))
    for name, (a, b), t, axis in checks:
        if a not in ix or b not in ix:
            continue
        diffs = {}
        for side, frames in (("model", gen), ("real", real)):
            sa = view_shift(real[:, 0, 0], frames[:, ix[a], t], max_shift)[:, axis]
            sb = view_shift(real[:, 0, 0], frames[:, ix[b], t], max_shift)[:, axis]
            diffs[side] = (sa - sb).float()
        m, r = diffs["model"], diffs["real"]
        res[f"{name}_model_px"] = float(m.mean())
        res[f"{name}_real_px"] = float(r.mean())
        res[f"{name}_ratio"] = float(m.mean() / r.mean()) if r.mean() != 0 else float("nan")
        same = torch.sign(m) == torch.sign(r)
        moved = r != 0
        res[f"{name}_agreement"] = float(same.float().mean())
        res[f"{name}_ratio_ci"] = _interval(m[boot].mean(1) / r[boot].mean(1))
        res[f"{name}_agreement_ci"] = _interval(same.double()[boot].mean(1))
        res[f"{name}_real_nonzero"] = int(moved.sum())
        # the same share over the starts where the real view moved: tells missing a real move apart from
        # moving where the game stood still
        res[f"{name}_agreement_where_real_moved"] = float(same[moved].float().mean()) if moved.any() else float("nan")
        res[f"{name}_t"] = t
    return res


def check_floors(res: dict) -> dict:
    """Each floor and goal of issue 14 -> True / False."""
    gain = [m - c for m, c in zip(res["psnr"], res["copy_psnr"])]
    out = {"psnr_above_copy": all(g > 0 for g in gain), "psnr_goal_copy+2@last": gain[-1] >= 2}
    acc_floor, acc_goal = FLOORS["key_accuracy"]
    out["key_accuracy"] = res["key_accuracy"] >= acc_floor
    out["key_accuracy_goal"] = res["key_accuracy"] >= acc_goal
    if "scroll_ratio" in res:
        (lo, hi), (glo, ghi) = FLOORS["scroll_ratio"]
        out["scroll_ratio"] = lo <= res["scroll_ratio"] <= hi
        out["scroll_ratio_goal"] = glo <= res["scroll_ratio"] <= ghi
    if "jump_agreement" in res:
        j_floor, j_goal = FLOORS["jump_agreement"]
        out["jump_agreement"] = res["jump_agreement"] >= j_floor
        out["jump_agreement_goal"] = res["jump_agreement"] >= j_goal
    return out


# ---------------------------------------------------------------------------------------------- the game
def key_combo(name: str) -> tuple[str, ...]:
    """A key group's buttons: "RIGHT+UP" -> ("RIGHT", "UP"), "NONE" -> ()."""
    return () if name == "NONE" else tuple(name.split("+"))


def combo_index(combos: list[tuple[str, ...]], name: str) -> int:
    want = set(key_combo(name))
    for i, c in enumerate(combos):
        if set(c) == want:
            return i
    raise ValueError(f"the game has no action for key group {name!r} (its combos: {combos})")


def parse_key_sequence(text: str, keys: dict[str, int] | None = None) -> list[str]:
    """ "RIGHT*32,RIGHT+UP*32" -> ["RIGHT"] * 32 + ["RIGHT+UP"] * 32."""
    seq: list[str] = []
    for item in filter(None, (s.strip().upper() for s in text.split(","))):
        name, _, count = item.partition("*")
        if name not in KEYS or (count and not count.isdigit()):
            raise ValueError(f"long_keys: {item!r} is not KEY or KEY*count with KEY one of {', '.join(KEYS)} "
                             "(e.g. RIGHT*32,RIGHT+UP*32)")
        seq += [name] * (int(count) if count else 1)
    return seq


class RealGame:
    """Batched procgen instances whose saved states are replayed under held keys."""

    def __init__(self, args: KeyArgs, num: int) -> None:
        from training.record import _import_procgen

        self.env = _import_procgen()(num=num, env_name="coinrun", start_level=args.start_level,
                                     num_levels=args.num_levels, distribution_mode=args.distribution_mode,
                                     rand_seed=args.seed)
        self.num = num
        self.combos = [tuple(c) for c in self.env.get_combos()]

    def frame(self) -> np.ndarray:
        return self.env.observe()[1]["rgb"].copy()

    def play(self, states: list[bytes], actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """From ``states`` take actions (num, T) -> frames (num, 1 + T, H, W, 3) uint8 (the start first) and
        whether an episode ended at each step (num, T)."""
        self.env.callmethod("set_state", states)
        frames, ended = [self.frame()], []
        for t in range(actions.shape[1]):
            self.env.act(actions[:, t].astype(np.int32))
            frames.append(self.frame())
            ended.append(self.env.observe()[2].copy())
        return np.stack(frames, 1), np.stack(ended, 1) if ended else np.zeros((self.num, 0), bool)


def random_play(rng: np.random.Generator, num: int, steps: int, n_actions: int, hold: int = 8) -> np.ndarray:
    """(num, steps) random actions, each held for 1..hold steps (as the held-action recordings)."""
    out = np.empty((num, steps), np.int64)
    for i in range(num):
        t = 0
        while t < steps:
            d = int(rng.integers(1, hold + 1))
            out[i, t: t + d] = rng.integers(n_actions)
            t += d
    return out


def real_starts(game: RealGame, args: KeyArgs, seqs: dict[str, np.ndarray], log=print, max_rounds: int = 20):
    """Start states from which every key sequence in ``seqs`` (name -> (T,) actions) runs without an
    episode end. Returns states, prompt frames (num, prompt_frames, H, W, 3) and the real frames of each
    sequence (name -> (num, 1 + T, H, W, 3))."""
    rng = np.random.default_rng(args.seed)
    n_act = len(game.combos)
    states = game.env.callmethod("get_state")
    todo = np.ones(game.num, bool)
    prompts = real = None
    for round_ in range(max_rounds):
        # play on (from the current states): warm-up in round 0, a few more steps for starts that failed
        frames, ended = game.play(states, random_play(rng, game.num, args.warmup, n_act))
        new_states = game.env.callmethod("get_state")
        states = [new_states[i] if todo[i] else s for i, s in enumerate(states)]
        pf = frames[:, -args.prompt_frames:]
        fresh = ended[:, -(args.prompt_frames - 1):].any(1) if args.prompt_frames > 1 else np.zeros(game.num, bool)
        prompts = pf if prompts is None else np.where(todo[:, None, None, None, None], pf, prompts)
        ok = ~fresh
        outs = {}
        for name, seq in seqs.items():
            outs[name], ended = game.play(states, np.broadcast_to(seq, (game.num, len(seq))))
            ok &= ~ended.any(1)
        real = outs if real is None else {k: np.where(todo[:, None, None, None, None], v, real[k])
                                          for k, v in outs.items()}
        todo &= ~ok
        if not todo.any():
            return states, prompts, real
        log(f"round {round_}: {int(todo.sum())} of {game.num} starts end an episode within a key sequence; "
            "playing them further")
    raise RuntimeError(f"{int(todo.sum())} starts still end an episode after {max_rounds} rounds")


# ---------------------------------------------------------------------------------------------- the model
def to_model_frames(images: np.ndarray, size: int) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, size, size) float in [0, 1] (area-resized if the game's size differs)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255)
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x.reshape(*lead, 3, size, size)


@torch.no_grad()
def model_rollouts(model: Genie, prompts: torch.Tensor, actions: torch.Tensor, seed: int, batch: int = 48,
                   maskgit_steps: int | None = None, temperature: float | None = None) -> torch.Tensor:
    """Prompts (R, T0, 3, H, W) and latent actions (R, T) -> frames (R, 1 + T, 3, H, W), the last prompt
    frame first. Chunk c samples with a generator seeded ``seed + c``."""
    outs = []
    for c, i in enumerate(range(0, prompts.shape[0], batch)):
        g = torch.Generator().manual_seed(seed + c)
        p = prompts[i: i + batch].transpose(1, 2)
        session = model.start(p, generator=g, maskgit_steps=maskgit_steps, temperature=temperature)
        frames = [p[:, :, -1]]
        for t in range(actions.shape[1]):
            frames.append(session.step(actions[i: i + batch, t]))
        outs.append(torch.stack(frames, 1).float())
    return torch.cat(outs)


def bank_prompt_frames(model: Genie) -> int:
    """How many frames Genie-v0's reset primes this model with: the length of its prompt bank's clips
    (1 for a bank of start frames or none), within the context window (`genie_env.env.prompt_clips`)."""
    bank = load_prompt_bank(model)
    frames = bank.shape[1] if bank is not None and bank.ndim == 5 else 1
    return min(frames, max_prompt_frames(model.config.context_frames))


def run_keydriven(model: Genie, args: KeyArgs, maskgit_steps: int | None = None, temperature: float | None = None,
                  log=print) -> dict:
    """Metric 7 of EVALUATION.md on the real game; returns the figures plus ``_real`` / ``_gen`` frames
    (N, K, 1 + steps, 3, H, W) and, with a long key sequence, ``_long_real`` / ``_long_gen``."""
    if args.starts < 1:
        raise ValueError(f"starts must be >= 1, got {args.starts}")
    if args.steps < 1:
        raise ValueError(f"steps must be >= 1, got {args.steps}")
    if not 1 <= args.prompt_frames <= model.config.context_frames - 1:
        raise ValueError(f"prompt_frames must be in [1, {model.config.context_frames - 1}] (the model's context "
                         f"leaves room for one generated frame), got {args.prompt_frames}")
    if args.long_keys and args.long_steps < 1:
        raise ValueError(f"long_steps must be >= 1 with a long key sequence, got {args.long_steps}")
    if args.warmup < args.prompt_frames:
        raise ValueError(f"warmup must be >= prompt_frames ({args.prompt_frames}), got {args.warmup}")
    amap = load_action_map(model)
    missing = [k for k in KEYS if k not in amap]
    if missing:
        raise ValueError(f"the checkpoint's action map lacks {missing} (has {sorted(amap)}): metric 7 needs a "
                         f"latent action for each of {', '.join(KEYS)} in action_map.json")
    long_seq = parse_key_sequence(args.long_keys)
    long_seq = [long_seq[i % len(long_seq)] for i in range(args.long_steps)] if long_seq else []
    t0 = time.time()
    game = RealGame(args, args.starts)
    seqs = {k: np.full(args.steps, combo_index(game.combos, k)) for k in KEYS}
    states, prompts, real = real_starts(game, args, seqs, log=log)
    size = model.config.image_size
    n, k = args.starts, len(KEYS)
    real_t = torch.stack([to_model_frames(real[key], size) for key in KEYS], 1)        # (n, k, 1 + T, 3, H, W)
    prompt_t = to_model_frames(prompts, size)                                          # (n, T0, 3, H, W)
    lat = torch.tensor([amap[key] for key in KEYS])
    actions = lat[None, :, None].expand(n, k, args.steps).reshape(n * k, args.steps)
    gen = model_rollouts(model, prompt_t.repeat_interleave(k, 0), actions, args.seed, args.batch,
                         maskgit_steps, temperature).view(n, k, args.steps + 1, 3, size, size)
    shift = min(args.max_shift * size // 64, size // 2 - 1)
    res = key_metrics(real_t, gen, KEYS, max_shift=shift)
    res["floors"] = check_floors(res)
    res.update(maskgit_steps=int(maskgit_steps or model.config.maskgit_steps),
               temperature=float(model.config.temperature if temperature is None else temperature),
               carry=resolve_carry(model.config, None),
               prompt_frames=args.prompt_frames, warmup=args.warmup, seed=args.seed,
               levels=f"{args.start_level}-{args.start_level + args.num_levels - 1}",
               distribution_mode=args.distribution_mode, action_map={key: amap[key] for key in KEYS})
    res["_real"], res["_gen"] = real_t, gen
    if long_seq:
        # the long rollout is shown from the first starts where the real game runs the whole sequence
        # without a death or the coin (holding RIGHT for long often meets an enemy or a pit)
        seq = np.array([combo_index(game.combos, k) for k in long_seq])
        frames, ended = game.play(states, np.broadcast_to(seq, (n, len(seq))))
        rows = np.flatnonzero(~ended.any(1))[: args.long_starts]
        if rows.size == 0:
            log(f"long rollout: every start ends an episode within {args.long_keys!r}; no long strip")
    if long_seq and rows.size:
        long_real = to_model_frames(frames[rows], size)
        long_act = torch.tensor([amap[key] for key in long_seq])[None].expand(rows.size, -1)
        long_gen = model_rollouts(model, prompt_t[torch.from_numpy(rows)], long_act, args.seed, args.batch,
                                  maskgit_steps, temperature)
        res["long_keys"] = f"{args.long_keys} to {args.long_steps} steps"
        res["long_starts"] = rows.tolist()
        res["long_psnr"] = {t: float(psnr(long_gen[:, t], long_real[:, t]).mean())
                            for t in (8, 16, 32, len(long_seq)) if t <= len(long_seq)}
        res["long_copy_psnr"] = {t: float(psnr(long_real[:, 0], long_real[:, t]).mean()) for t in res["long_psnr"]}
        res["_long_real"], res["_long_gen"] = long_real, long_gen
    res["seconds"] = round(time.time() - t0, 1)
    return res


# ---------------------------------------------------------------------------------------------- output
def format_table(res: dict) -> str:
    steps = res["steps"]
    lines = [f"key-driven fidelity (EVALUATION.md metric 7): {res['starts']} starts x {len(res['keys'])} keys, "
             f"keys held {steps} steps"]
    if "levels" in res:
        lines[0] += (f"; levels {res['levels']} ({res['distribution_mode']}), {res['prompt_frames']} prompt "
                     f"frame(s), MaskGIT {res['maskgit_steps']} steps, temperature {res['temperature']}, "
                     f"seed {res['seed']}")
    head = "t                " + "".join(f"{t:>7}" for t in range(1, steps + 1))
    lines += [head,
              "model vs real dB " + "".join(f"{v:7.2f}" for v in res["psnr"]),
              "copy vs real dB  " + "".join(f"{v:7.2f}" for v in res["copy_psnr"]),
              "gain dB          " + "".join(f"{m - c:7.2f}" for m, c in zip(res["psnr"], res["copy_psnr"]))]
    lines.append(f"PSNR@{steps} by key (model / copy): " + ", ".join(
        f"{key} {res['psnr_by_key'][key]:.2f} / {res['copy_psnr_by_key'][key]:.2f}" for key in res["keys"]))
    fl = res.get("floors") or check_floors(res)
    ok = lambda b: "yes" if b else "NO"  # noqa: E731
    lines.append(f"floor PSNR > copy at every t: {ok(fl['psnr_above_copy'])}; goal copy + 2 dB at t = {steps}: "
                 f"{ok(fl['psnr_goal_copy+2@last'])}")
    ci = lambda name: (f" (95% interval {res[name][0]:.3f}-{res[name][1]:.3f})"  # noqa: E731
                       if name in res else "")
    lines.append(f"key accuracy {res['key_accuracy']:.3f}{ci('key_accuracy_ci')} over {res['key_pairs']} ordered "
                 f"pairs   "
                 f"floor 0.85: {ok(fl['key_accuracy'])}, goal 0.95: {ok(fl['key_accuracy_goal'])}")
    if "scroll_ratio" in res:
        lines.append(f"scroll RIGHT - LEFT @{res['scroll_t']}: model {res['scroll_model_px']:.2f} px, real "
                     f"{res['scroll_real_px']:.2f} px, ratio {res['scroll_ratio']:.3f}{ci('scroll_ratio_ci')}, "
                     f"sign agreement "
                     f"{res['scroll_agreement']:.3f} ({res['scroll_agreement_where_real_moved']:.3f} over the "
                     f"{res['scroll_real_nonzero']} starts where the real view moved)   "
                     f"floor 0.8-1.25: {ok(fl['scroll_ratio'])}, goal 0.9-1.1: {ok(fl['scroll_ratio_goal'])}")
    if "jump_agreement" in res:
        lines.append(f"jump UP - NONE @{res['jump_t']}: model {res['jump_model_px']:.2f} px, real "
                     f"{res['jump_real_px']:.2f} px, ratio {res['jump_ratio']:.3f}, sign agreement "
                     f"{res['jump_agreement']:.3f}{ci('jump_agreement_ci')} "
                     f"({res['jump_agreement_where_real_moved']:.3f} over the "
                     f"{res['jump_real_nonzero']} starts where the real view moved)   "
                     f"floor 0.9: {ok(fl['jump_agreement'])}, goal 0.98: {ok(fl['jump_agreement_goal'])}")
    if "long_psnr" in res:
        lines.append(f"long rollout ({res['long_keys']}), model / copy dB: " + ", ".join(
            f"t={t} {v:.2f} / {res['long_copy_psnr'][t]:.2f}" for t, v in res["long_psnr"].items()))
    return "\n".join(lines)


def _grid(blocks: list[list[torch.Tensor]], gap: int = 2, big_gap: int = 8) -> np.ndarray:
    """Columns of row-pair blocks -> one uint8 image. ``blocks[c][r]`` is a (T, 3, H, W) row; rows are
    grouped in pairs (real, model) separated by ``gap``, columns by ``big_gap`` (white)."""
    cols = []
    for rows in blocks:
        parts = []
        for r, row in enumerate(rows):
            img = row.permute(2, 0, 3, 1).reshape(row.shape[2], -1, 3)  # (H, T*W, 3)
            parts.append(img)
            if r % 2 == 1 and r < len(rows) - 1:
                parts.append(torch.ones(gap, img.shape[1], 3))
        cols.append(torch.cat(parts, 0))
        cols.append(torch.ones(cols[-1].shape[0], big_gap, 3))
    grid = torch.cat(cols[:-1], 1)
    return (grid.clamp(0, 1) * 255).round().byte().numpy()


def save_png(img: np.ndarray, path: Path, scale: int = 1, colors: int = 0) -> Path:
    """Save a uint8 image; ``colors`` > 0 reduces it to that many palette colours (256 keeps a strip above
    40 dB of itself at about half the bytes, small enough for a model card)."""
    from PIL import Image

    im = Image.fromarray(img)
    if colors:
        im = im.quantize(colors, method=Image.Quantize.MEDIANCUT)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, optimize=True)
    return path


def save_strips(res: dict, path: Path, starts: int = 3, long_every: int = 8, colors: int = 0) -> list[Path]:
    """``path``: per start (side by side), per key a real row and a model row, t = 0..steps. With a long
    rollout also ``<path>-long.png``: per start a real row and a model row, every ``long_every``-th frame."""
    real, gen = res["_real"], res["_gen"]
    m = min(starts, real.shape[0])
    blocks = [[row for k in range(real.shape[1]) for row in (real[s, k], gen[s, k])] for s in range(m)]
    out = [save_png(_grid(blocks), path, colors=colors)]
    if "_long_real" in res:
        lr, lg = res["_long_real"], res["_long_gen"]
        idx = list(range(0, lr.shape[1], long_every))
        rows = [row for s in range(lr.shape[0]) for row in (lr[s, idx], lg[s, idx])]
        out.append(save_png(_grid([rows]), path.with_name(path.stem + "-long" + path.suffix), colors=colors))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate --keydriven N", description=__doc__.split("\n")[0])
    d = KeyArgs()
    p.add_argument("--keydriven", type=int, default=d.starts, metavar="N", help="real game starts (>= 48 to report)")
    p.add_argument("--checkpoint", default=None, help="release folder or hub repo id (default: shipped model)")
    p.add_argument("--steps", type=int, default=d.steps, help="steps each key is held")
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps of random play before a start")
    p.add_argument("--prompt-frames", type=int, default=None,
                   help="real frames priming the model, ending at the start frame (default: as many as "
                        "Genie-v0 primes with, the length of the checkpoint's prompt clips)")
    p.add_argument("--start-level", type=int, default=d.start_level)
    p.add_argument("--num-levels", type=int, default=d.num_levels)
    p.add_argument("--distribution-mode", default=d.distribution_mode)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch", type=int, default=d.batch, help="model rows per forward chunk")
    p.add_argument("--long-keys", default=d.long_keys,
                   help="key sequence of the long rollout (KEY*count,...), repeated to --long-steps; '' for none")
    p.add_argument("--long-steps", type=int, default=d.long_steps, help="steps of the long rollout")
    p.add_argument("--maskgit-steps", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--carry", action=argparse.BooleanOptionalAction, default=None,
                   help="carry unchanged tokens' patches over sharp (default: the model's config.carry_unchanged)")
    add_dtype_options(p)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--strip-starts", type=int, default=3, help="starts shown in the strips")
    p.add_argument("--strip-colors", type=int, default=0, help="palette colours of the strips (0 = full colour)")
    p.add_argument("--strip", type=Path, default=None,
                   help="PNG of real (upper) vs model (lower) rows per key for a few starts; the long rollout "
                        "goes beside it as <name>-long.png")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = Genie.from_pretrained(a.checkpoint).eval()
    prompt_frames = a.prompt_frames if a.prompt_frames is not None else bank_prompt_frames(model)
    args = KeyArgs(starts=a.keydriven, steps=a.steps, warmup=a.warmup, prompt_frames=prompt_frames,
                   start_level=a.start_level, num_levels=a.num_levels, distribution_mode=a.distribution_mode,
                   seed=a.seed, batch=a.batch, long_keys=a.long_keys,
                   long_steps=a.long_steps, long_starts=a.strip_starts)
    if a.carry is not None:
        model.config.carry_unchanged = a.carry
    a.dtype = dtype_from_options(a, model.device)
    model.autocast_dtype = autocast_dtype(a.dtype)
    try:
        res = run_keydriven(model, args, a.maskgit_steps, a.temperature, log=lambda s: print(s, file=sys.stderr))
    except ValueError as e:
        p.error(str(e))
    used = "bf16" if model.autocast_dtype == torch.bfloat16 else "fp32"   # the format the model ran in
    res.update(threads=torch.get_num_threads(), bf16=used == "bf16", dtype=used,
               checkpoint=str(a.checkpoint or "shipped default"))
    print(format_table(res))
    if a.strip is not None:
        for path in save_strips(res, a.strip, starts=a.strip_starts, colors=a.strip_colors):
            print(f"wrote {path}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
