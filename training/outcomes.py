"""The reward and episode-end model off the play loop: the reward stage's batches and loss, and
EVALUATION.md metric 8 (precision and recall on real transitions; event rates in dreams).

A transition t -> t+1 is seen as the dynamics sees it when it generates frame t+1: the frames up to t
and the latent action a_t. Inside a video a_t is inferred from the frames (as for every other metric).
The transition out of a video's last frame, where every recorded event sits, has no frame t+1 to infer
it from: it gets the latent action that the checkpoint's action map gives the recorded game action's
group (the key a player of the env would press for it), and a uniformly random one where the map has
no such group.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from genie_env import Genie
from genie_env.models.outcomes import EVENTS
from training.data import FrameCache, OutcomeSampler, to_tensor

__all__ = ["batch_inputs", "compute_loss", "precision_recall", "real_transition_metrics",
           "dream_event_rates", "real_event_rates"]


def batch_inputs(genie: Genie, batch: dict, action_map: dict[str, int], generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """An `OutcomeSampler` batch -> (features the heads read, latent actions a_t (b,))."""
    dev = genie.device
    frames = to_tensor(batch["frames"]).to(dev)  # (b, 3, k+1, H, W)
    with torch.no_grad():
        actions = genie.latent_actions.infer(frames)  # (b, k): a_i from frame i to i+1
        n = genie.config.action_vocab_size
        for i in np.flatnonzero(batch["is_end"]):
            a = action_map.get(batch["group"][i])
            if a is None:
                a = int(torch.randint(0, n, (1,), generator=generator))
            actions[i, -1] = a
        features = genie.outcome_features(frames[:, :, :-1], actions)
    return features, actions[:, -1]


def compute_loss(genie: Genie, batch: dict, action_map: dict[str, int], pos_weight: float
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reward stage's loss on one `OutcomeSampler.sample` batch (the heads alone are trained)."""
    assert genie.outcomes is not None
    features, action = batch_inputs(genie, batch, action_map)
    dev = genie.device
    return genie.outcomes.loss(features, action, torch.from_numpy(batch["events"]).to(dev),
                               torch.from_numpy(batch["weight"]).to(dev), pos_weight)


def precision_recall(pred: np.ndarray, true: np.ndarray, weight: np.ndarray | None = None) -> dict[str, float]:
    """Precision and recall of predicted events against true ones (bool arrays), with the (weighted)
    number of true and predicted events. Precision is NaN when nothing was predicted, recall when
    nothing happened."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    w = np.ones(len(pred)) if weight is None else np.asarray(weight, float)
    tp, fp, fn = w[pred & true].sum(), w[pred & ~true].sum(), w[~pred & true].sum()
    return {"precision": float(tp / (tp + fp)) if tp + fp > 0 else math.nan,
            "recall": float(tp / (tp + fn)) if tp + fn > 0 else math.nan,
            "true_events": float(tp + fn), "predicted_events": float(tp + fp)}


@torch.no_grad()
def real_transition_metrics(genie: Genie, data_dir: str | Path, action_map: dict[str, int],
                            context: int | None = None, batch_size: int = 64, max_inside: int | None = None,
                            seed: int = 0, log=print) -> dict:
    """Metric 8 on real transitions: every transition of the dataset (or every end transition plus
    ``max_inside`` random others, counted with weights that stand for all of them), ``context`` past frames
    (default: the most the dynamics attends to, ``context_frames - 1``)."""
    if genie.outcomes is None:
        raise ValueError("the model has no reward / episode-end heads: train them with --stage reward")
    genie.eval()
    cache = FrameCache(data_dir, genie.config.image_size, log=log)
    sampler = OutcomeSampler(cache)
    k = context or genie.config.context_frames - 1
    n_inside = int(sampler.cum[-1])
    ends = list(range(n_inside, sampler.num_transitions))
    if max_inside is None or max_inside >= n_inside:
        inside, w_inside = list(range(n_inside)), 1.0
    else:
        inside = sorted(np.random.default_rng(seed).choice(n_inside, max_inside, replace=False).tolist())
        w_inside = n_inside / max_inside
    picks = inside + ends
    weight = np.array([w_inside] * len(inside) + [1.0] * len(ends))
    gen = torch.Generator().manual_seed(seed)
    probs, events = [], []
    t0 = time.time()
    for i in range(0, len(picks), batch_size):
        batch = sampler.gather(picks[i : i + batch_size], k)
        with genie._autocast():
            features, action = batch_inputs(genie, batch, action_map, gen)
            probs.append(genie.outcomes.probabilities(features, action).float().cpu().numpy())
        events.append(batch["events"])
    p, y = np.concatenate(probs), np.concatenate(events) > 0
    thr = genie.outcomes.threshold.cpu().numpy()
    out: dict = {"transitions": sampler.num_transitions, "evaluated": len(picks), "context_frames": k,
                 "seconds": round(time.time() - t0, 1)}
    for j, name in enumerate(EVENTS):
        out[name] = precision_recall(p[:, j] > thr[j], y[:, j], weight)
    out["probabilities"], out["events"], out["weights"] = p, y, weight
    return out


def real_event_rates(data_dir: str | Path) -> dict[str, float]:
    """Events per 1,000 steps of the real game under the recording's policy, from its dataset.json."""
    summary = json.loads((Path(data_dir) / "dataset.json").read_text())
    o = summary.get("outcomes")
    if not o:
        raise ValueError(f"{data_dir}/dataset.json has no outcomes: record the data with training.record")
    return {"reward_events_per_1000": 1000 * o["reward_events"] / o["transitions"],
            "terminations_per_1000": 1000 * o["terminations"] / o["transitions"],
            "transitions": o["transitions"], "hold": summary.get("hold", 1)}


def dream_event_rates(model: Genie, steps: int = 10_000, num_envs: int = 32, seed: int = 0,
                      max_episode_steps: int | None = 1000, log=print, **env_kwargs) -> dict[str, float]:
    """Events per 1,000 steps in the model's dreams: the vector env under a uniformly random policy over
    its latent actions for ``steps`` env steps in all (rows that end restart from a new prompt)."""
    from genie_env.vector_env import GenieVectorEnv

    envs = GenieVectorEnv(num_envs, model=model, max_episode_steps=max_episode_steps, **env_kwargs)
    rng = np.random.default_rng(seed)
    envs.reset(seed=seed)
    rewards = terms = counted = 0
    prev_done = np.zeros(num_envs, dtype=bool)
    t0 = time.time()
    while counted < steps:
        _, r, term, trunc, _ = envs.step(rng.integers(0, envs.single_action_space.n, num_envs))
        live = ~prev_done  # a row's step after its end only restarts it (autoreset): not a game step
        counted += int(live.sum())
        rewards += int((r[live] > 0).sum())
        terms += int(term[live].sum())
        prev_done = term | trunc
    envs.close()
    return {"steps": counted, "reward_events": rewards, "terminations": terms,
            "reward_events_per_1000": 1000 * rewards / counted, "terminations_per_1000": 1000 * terms / counted,
            "seconds": round(time.time() - t0, 1)}


def metric8(model: Genie, data: list[Path], action_map: dict[str, int], max_inside: int | None = None,
            dream_steps: int = 0, num_envs: int = 32, seed: int = 0, log=print) -> dict:
    """EVALUATION.md metric 8: precision / recall on each dataset's real transitions, the real game's event
    rates, and (``dream_steps`` > 0) event rates in dreams under a uniformly random policy."""
    res: dict = {}
    for d in data:
        m = real_transition_metrics(model, d, action_map, max_inside=max_inside, seed=seed, log=log)
        for key in ("probabilities", "events", "weights"):
            m.pop(key)
        res[str(d)] = {**m, "real_rates": real_event_rates(d)}
    if dream_steps:
        res["dreams"] = dream_event_rates(model, dream_steps, num_envs=num_envs, seed=seed)
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from genie_env.env import load_action_map

    p = argparse.ArgumentParser(prog="python -m training.outcomes",
                                description="EVALUATION.md metric 8: reward and episode end")
    p.add_argument("--checkpoint", default=None, help="release folder (default: the shipped model)")
    p.add_argument("--data", type=Path, action="append", required=True, help="validation dataset (repeatable)")
    p.add_argument("--max-inside", type=int, default=None,
                   help="evaluate every end transition and this many others, weighted (default: all)")
    p.add_argument("--dream-steps", type=int, default=0, help="env steps in dreams (>= 10000 for metric 8)")
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = Genie.from_pretrained(a.checkpoint)
    model.autocast_dtype = torch.bfloat16
    if model.outcomes is None:
        print("error: --checkpoint has no reward / episode-end heads (train them with --stage reward)",
              file=sys.stderr)
        return 2
    res = metric8(model, a.data, load_action_map(model), a.max_inside, a.dream_steps, a.num_envs, a.seed)
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
