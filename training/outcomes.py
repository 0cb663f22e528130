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
from genie_env.hub import stored_dtype
from genie_env.models.outcomes import EVENTS
from training.data import FrameCache, OutcomeSampler, to_tensor

__all__ = ["Strata", "batch_inputs", "compute_loss", "precision_recall", "real_transition_metrics",
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
    if "tokens" in batch:  # a FeaturePool batch: the inputs are ready
        features, action = batch["tokens"].to(genie.device), batch["actions"].to(genie.device)
    else:
        features, action = batch_inputs(genie, batch, action_map)
    dev = genie.device
    return genie.outcomes.loss(features, action, torch.from_numpy(batch["events"]).to(dev),
                               torch.from_numpy(batch["weight"]).to(dev), pos_weight)


class Strata:
    """Which transitions of one or more recordings the reward stage and metric 8 look at, and how many
    transitions of the game each stands for: every end transition (where every recorded event sits), the
    ``near`` transitions before each end inside its video (frames that look almost the same: the hard
    negatives) and ``inside`` other transitions drawn uniformly (all of them when ``inside`` is None).

    Recordings made with ``training.record --episode-ends N`` add ends and near transitions only: their
    frames are not the game's distribution. The weights make the union stand for the full recordings: each
    end counts ``ends in full recordings / ends in all`` transitions, each near one likewise, each drawn
    other ``others / drawn``. ``picks`` is a list of (source, transition numbers) in the order of ``weight``
    and ``is_end``.
    """

    def __init__(self, sources: list[OutcomeSampler], inside: int | None, near: int, rng: np.random.Generator
                 ) -> None:
        natural = [s.natural for s in sources]
        if not any(natural):
            raise ValueError("every recording given holds episode endings only (--episode-ends): add a full "
                             "recording (training.record without --episode-ends), whose frames are the game's")
        ends, nears, fars = [], [], []
        for s in sources:
            n_inside = int(s.cum[-1])
            ends.append(np.arange(n_inside, s.num_transitions))
            near_set: set[int] = set()
            for v in s.end_video:  # the last `near` transitions inside each video that ends an episode
                last = int(s.cum[v])  # one past this video's last inside transition
                near_set.update(range(max(int(s.cum[v - 1]) if v else 0, last - near), last))
            nears.append(np.array(sorted(near_set), dtype=np.int64))
            far_mask = np.zeros(n_inside, dtype=bool) if not s.natural else np.ones(n_inside, dtype=bool)
            far_mask[nears[-1]] = False
            fars.append(np.flatnonzero(far_mask))
        count = lambda xs, only_natural: sum(len(x) for x, n in zip(xs, natural) if n or not only_natural)  # noqa: E731
        w_end = count(ends, True) / max(1, count(ends, False))
        w_near = count(nears, True) / max(1, count(nears, False))
        n_far = count(fars, False)
        take = n_far if inside is None else min(inside, n_far)
        drawn = np.sort(rng.choice(n_far, take, replace=False)) if take < n_far else np.arange(n_far)
        bounds = np.cumsum([0] + [len(f) for f in fars])
        w_far = n_far / max(1, take)
        self.picks: list[tuple[int, np.ndarray]] = []
        weight, is_end, is_other = [], [], []
        for i in range(len(sources)):
            far = fars[i][drawn[(drawn >= bounds[i]) & (drawn < bounds[i + 1])] - bounds[i]]
            idx = np.concatenate([ends[i], nears[i], far]).astype(np.int64)
            self.picks.append((i, idx))
            weight.append(np.concatenate([np.full(len(ends[i]), w_end), np.full(len(nears[i]), w_near),
                                          np.full(len(far), w_far)]))
            is_end.append(np.arange(len(idx)) < len(ends[i]))
            is_other.append(np.arange(len(idx)) >= len(ends[i]) + len(nears[i]))
        self.weight = np.concatenate(weight).astype(np.float32)
        self.is_end = np.concatenate(is_end)
        self.is_other = np.concatenate(is_other)
        """Which picks are drawn from the ordinary transitions (neither an end nor near one)."""
        self.counts = {"ends": count(ends, False), "near": count(nears, False), "others": int(take)}

    def __len__(self) -> int:
        return len(self.weight)


class FeaturePool:
    """The reward stage's data with the frozen model's work done once: what the heads read (tokens of frame t
    and the inferred latent action a_t) for the transitions of `Strata` (every end, the ``near`` before each,
    ``inside`` others; ``extra`` episode-ends recordings add their ends and near transitions), with weights
    that make the pool's weighted distribution the recording's.

    A batch is ``end_fraction`` end transitions, ``inside_fraction`` ordinary ones (the ``inside`` others:
    nearly every transition of the game, where a head's false alarms cost the most), the rest drawn from
    everything that is not an end; its weights turn it back into the recording's distribution (importance
    weights), as `OutcomeSampler`'s do. Only the ``tokens`` input can be pooled: hidden states change with
    the context length drawn per batch.
    """

    def __init__(self, genie: Genie, sampler: OutcomeSampler, action_map: dict[str, int], inside: int = 16384,
                 near: int = 8, batch_size: int = 128, seed: int = 0, log=print, cache: Path | None = None,
                 extra: list[OutcomeSampler] = (), inside_fraction: float = 0.0) -> None:
        if genie.config.outcome_input != "tokens":
            raise ValueError("FeaturePool holds tokens: it needs outcome_input 'tokens'")
        if not 0 <= inside_fraction <= 1 - sampler.end_fraction:
            raise ValueError(f"inside_fraction must be in [0, 1 - end_fraction = {1 - sampler.end_fraction}]: "
                             f"both are shares of one batch, got {inside_fraction}")
        rng = np.random.default_rng([seed, 11])
        sources = [sampler, *extra]
        self.sampler, self.end_fraction, self.inside_fraction = sampler, sampler.end_fraction, float(inside_fraction)
        self.sources = sources
        self.rng = np.random.default_rng([seed, 13])
        key = {"videos": [(v.name, v.frames) for v in sampler.cache.videos], "inside": inside, "near": near,
               "seed": seed, "frozen": _frozen_hash(genie), "action_map": sorted(action_map.items()),
               "tokens": "float32"}  # frames coded in float32 (pools from before that rule held bf16 codes)
        if genie.config.outcome_frames != 1:
            key["frames"] = genie.config.outcome_frames
        if extra:
            key["extra"] = [[str(s.cache.data_dir), len(s.cache.videos), s.num_transitions] for s in extra]
        strata = Strata(sources, inside, near, rng)  # cheap: which transitions, not their inputs
        self.weight, self.is_end, self.is_other = strata.weight, strata.is_end, strata.is_other
        # what every batch draws from, found once
        self._ends, self._rest = np.flatnonzero(self.is_end), np.flatnonzero(~self.is_end)
        self._others, self._total = np.flatnonzero(self.is_other), self.weight.sum()
        if cache is not None and Path(cache).is_file():
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved["key"] == json.dumps(key) and np.array_equal(saved["weight"].numpy(), self.weight):
                self.tokens, self.actions, self.events = saved["tokens"], saved["actions"], saved["events"]
                log(f"stage reward: inputs of {len(self.tokens)} transitions read from {cache}")
                return
        k = genie.config.lam_context_frames
        gen = torch.Generator().manual_seed(seed)
        toks, acts, events = [], [], []
        t0 = time.time()
        genie.eval()
        with torch.no_grad(), genie._autocast():
            for src, idx in strata.picks:
                for i in range(0, len(idx), batch_size):
                    batch = sources[src].gather(idx[i: i + batch_size].tolist(), k)
                    f, a = batch_inputs(genie, batch, action_map, gen)
                    toks.append(f.cpu())
                    acts.append(a.cpu())
                    events.append(torch.from_numpy(batch["events"]))
        self.tokens, self.actions, self.events = torch.cat(toks), torch.cat(acts), torch.cat(events)
        c = strata.counts
        log(f"stage reward: inputs of {len(strata)} transitions computed once ({c['ends']} ends, {c['near']} just "
            f"before them, {c['others']} others; {len(sources)} recording(s)) in {time.time() - t0:.0f} s")
        if cache is not None:  # a resumed or repeated run reads them back (atomically written)
            from training.checkpoint import atomic_save

            atomic_save({"key": json.dumps(key), "tokens": self.tokens, "actions": self.actions,
                         "events": self.events, "weight": torch.from_numpy(self.weight),
                         "is_end": torch.from_numpy(self.is_end)}, Path(cache))

    def sample(self, batch: int, k: int = 0) -> dict:  # noqa: ARG002 - k: the context, fixed by the pool
        """A batch: inputs, events, importance weights (natural share / sampled share of each draw) and the
        pool's numbers of the transitions drawn (``index``)."""
        ends, rest, others = self._ends, self._rest, self._others
        n_end, f_end, f_in = len(ends), self.end_fraction, self.inside_fraction if len(others) else 0.0
        u = self.rng.random(batch)
        from_end = u < f_end
        idx = np.where(from_end, ends[self.rng.integers(0, n_end, batch)], rest[self.rng.integers(0, len(rest), batch)])
        # natural probability weight_i / total against the probability of drawing i: f / n_end for an end,
        # (1 - f - f_in) / len(rest) for the rest, plus f_in / len(others) for an ordinary one
        sampled = np.where(from_end, f_end / n_end, (1 - f_end - f_in) / len(rest))
        if f_in > 0:
            from_in = ~from_end & (u < f_end + f_in)
            idx = np.where(from_in, others[self.rng.integers(0, len(others), batch)], idx)
            sampled = sampled + self.is_other[idx] * (f_in / len(others))
        weight = (self.weight[idx] / self._total) / sampled
        return {"tokens": self.tokens[idx], "actions": self.actions[idx], "events": self.events[idx].numpy(),
                "weight": weight.astype(np.float32), "index": idx}

    def event_counts(self) -> dict[str, int]:
        """Transitions and events of the recordings the pool draws from (all of them)."""
        counts = [s.event_counts() for s in self.sources]
        return {k: sum(c[k] for c in counts) for k in counts[0]}

    @property
    def mean_event_reward(self) -> float:
        return self.sampler.mean_event_reward

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def _frozen_hash(genie: Genie) -> str:
    """A fingerprint of the frozen parts the pool's inputs come from (tokenizer, latent action model)."""
    import hashlib

    h = hashlib.sha1()
    for name, t in sorted(genie.state_dict().items()):
        if name.startswith(("tokenizer.", "latent_actions.")):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


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
def real_transition_metrics(genie: Genie, data_dir: str | Path | list, action_map: dict[str, int],
                            context: int | None = None, batch_size: int = 64, max_inside: int | None = None,
                            near: int = 8, seed: int = 0, log=print) -> dict:
    """Metric 8 on real transitions: every transition of the dataset, or (``max_inside``) every end
    transition, the ``near`` before each and ``max_inside`` random others, counted with weights that stand
    for all of them (`Strata`). ``data_dir`` may be a list of folders: episode-ends recordings among them
    add their ends and near transitions. ``context`` past frames (default: the most the dynamics attends
    to, ``context_frames - 1``, for hidden-state heads; the latent action model's ``lam_context_frames``,
    as the reward stage's pool, for token heads)."""
    if genie.outcomes is None:
        raise ValueError("the model has no reward / episode-end heads: train them with --stage reward")
    genie.eval()
    dirs = data_dir if isinstance(data_dir, list | tuple) else [data_dir]
    sources = [OutcomeSampler(FrameCache(d, genie.config.image_size, log=log)) for d in dirs]
    strata = Strata(sources, max_inside, near, np.random.default_rng(seed))
    cfg = genie.config  # tokens: the latent action model's context is all a transition needs
    k = context or (cfg.lam_context_frames if cfg.outcome_input == "tokens" else cfg.context_frames - 1)
    gen = torch.Generator().manual_seed(seed)
    probs, events = [], []
    t0 = time.time()
    for src, idx in strata.picks:
        for i in range(0, len(idx), batch_size):
            batch = sources[src].gather(idx[i : i + batch_size].tolist(), k)
            with genie._autocast():
                features, action = batch_inputs(genie, batch, action_map, gen)
                probs.append(genie.outcomes.probabilities(features, action).float().cpu().numpy())
            events.append(batch["events"])
    p, y = np.concatenate(probs), np.concatenate(events) > 0
    weight = strata.weight.astype(np.float64)
    fire = genie.outcomes.fire(torch.from_numpy(p)).numpy()
    out: dict = {"transitions": sum(s.num_transitions for s in sources if s.natural), "evaluated": len(strata),
                 "context_frames": k, "seconds": round(time.time() - t0, 1), **strata.counts}
    for j, name in enumerate(EVENTS):
        out[name] = precision_recall(fire[:, j], y[:, j], weight)
        out[name]["events_seen"] = int(y[:, j].sum())
    out["probabilities"], out["events"], out["weights"] = p, y, weight
    return out


def best_thresholds(probs: np.ndarray, events: np.ndarray, weights: np.ndarray, reward_terminates: bool = False
                    ) -> np.ndarray:
    """Per head, the probability threshold with the best F1 (weighted counts) on these transitions; with
    ``reward_terminates`` the termination threshold is chosen for the rule the model plays by (a
    termination also wherever the reward head fires at its chosen threshold)."""
    out = np.full(probs.shape[1], 0.5)
    for j in range(probs.shape[1]):
        also = (probs[:, 0] > out[0]) if (reward_terminates and j == 1) else np.zeros(len(probs), bool)
        best = -1.0
        for thr in np.unique(probs[:, j][events[:, j]]):  # candidate: just below a true event's probability
            pr = precision_recall((probs[:, j] >= thr) | also, events[:, j], weights)
            p, r = pr["precision"], pr["recall"]
            f1 = 0.0 if not (p + r > 0) else 2 * p * r / (p + r)
            if f1 > best:
                best, out[j] = f1, float(np.nextafter(thr, -1.0))
    return out


def calibrate(model: Genie, data_dir: str | Path | list, action_map: dict[str, int], max_inside: int | None = None,
              seed: int = 0, log=print) -> dict:
    """Set the heads' thresholds to the best F1 on ``data_dir``'s real transitions (a set that metric 8 is then
    not reported on) and return them with that set's figures."""
    m = real_transition_metrics(model, data_dir, action_map, max_inside=max_inside, seed=seed, log=log)
    assert model.outcomes is not None
    thr = best_thresholds(m["probabilities"], m["events"], m["weights"], model.outcomes.reward_terminates)
    model.outcomes.threshold.copy_(torch.from_numpy(thr).float())
    res = {"calibration_data": _name(data_dir), "threshold": thr.tolist()}
    fire = model.outcomes.fire(torch.from_numpy(m["probabilities"])).numpy()
    for j, name in enumerate(EVENTS):
        res[name] = precision_recall(fire[:, j], m["events"][:, j], m["weights"])
    return res


def real_event_rates(data_dir: str | Path | list) -> dict[str, float] | None:
    """Events per 1,000 steps of the real game under the recording's policy, from its dataset.json (of the
    first full recording in a list: an episode-ends recording has no natural rate); None for videos that
    `training.record` did not make (no dataset.json: no policy to give a rate for)."""
    dirs = data_dir if isinstance(data_dir, list | tuple) else [data_dir]
    summaries = [(d, json.loads((Path(d) / "dataset.json").read_text())) for d in dirs
                 if (Path(d) / "dataset.json").is_file()]
    if not summaries:
        return None
    full = [(d, s) for d, s in summaries if not s.get("episode_ends")]
    if not full:
        raise ValueError(f"{_name(data_dir)}: an episode-ends recording has no natural event rate: give a full "
                         "recording too")
    data_dir, summary = full[0]
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


def _name(data_dir: str | Path | list) -> str:
    dirs = data_dir if isinstance(data_dir, list | tuple) else [data_dir]
    return ",".join(str(d) for d in dirs)


def metric8(model: Genie, data: list, action_map: dict[str, int], max_inside: int | None = None,
            dream_steps: int = 0, num_envs: int = 32, seed: int = 0, log=print) -> dict:
    """EVALUATION.md metric 8: precision / recall on each dataset's real transitions, the real game's event
    rates, and (``dream_steps`` > 0) event rates in dreams under a uniformly random policy."""
    res: dict = {}
    for d in data:
        m = real_transition_metrics(model, d, action_map, max_inside=max_inside, seed=seed, log=log)
        for key in ("probabilities", "events", "weights"):
            m.pop(key)
        res[_name(d)] = {**m, "real_rates": real_event_rates(d)}
    if dream_steps:
        res["dreams"] = dream_event_rates(model, dream_steps, num_envs=num_envs, seed=seed)
    return res


def _folders(text: str) -> list[Path]:
    """``A,B``: the folders of one evaluation set."""
    return [Path(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from genie_env.env import load_action_map
    from genie_env.hub import EXTRA_FILES
    from genie_env.precision import autocast_dtype, resolve_dtype

    p = argparse.ArgumentParser(prog="python -m training.outcomes",
                                description="EVALUATION.md metric 8: reward and episode end")
    p.add_argument("--checkpoint", default=None, help="release folder (default: the shipped model)")
    p.add_argument("--data", type=_folders, action="append", required=True,
                   help="validation dataset (repeatable); DIR,ENDS adds an episode-ends recording of other "
                        "episodes (training.record --episode-ends) to DIR's ends")
    p.add_argument("--max-inside", type=int, default=None,
                   help="evaluate every end transition, the 8 before each, and this many others, weighted "
                        "(default: all)")
    p.add_argument("--dream-steps", type=int, default=0, help="env steps in dreams (>= 10000 for metric 8)")
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="number format (default: bf16 where the hardware runs it natively, else fp32)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--calibrate-on", type=_folders, default=None,
                   help="first set the heads' thresholds to the best F1 on this dataset and save them into "
                        "--checkpoint (report --data on other levels)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = Genie.from_pretrained(a.checkpoint)
    model.autocast_dtype = autocast_dtype(resolve_dtype(a.dtype, model.device))
    if model.outcomes is None:
        print("error: --checkpoint has no reward / episode-end heads (train them with --stage reward)",
              file=sys.stderr)
        return 2
    action_map = load_action_map(model)
    cal = None
    if a.calibrate_on is not None:
        if a.checkpoint is None:
            print("error: --calibrate-on writes into --checkpoint: name the release folder", file=sys.stderr)
            return 2
        cal = calibrate(model, a.calibrate_on, action_map, a.max_inside, a.seed)
        model.save_pretrained(a.checkpoint, dtype=stored_dtype(a.checkpoint),  # a float16 folder stays float16
                              extra_files={n: Path(a.checkpoint) / n for n in EXTRA_FILES
                                           if (Path(a.checkpoint) / n).is_file()})
        print(f"thresholds {cal['threshold']} (best F1 on {_name(a.calibrate_on)}) saved into {a.checkpoint}")
    res = metric8(model, a.data, action_map, a.max_inside, a.dream_steps, a.num_envs, a.seed)
    if cal is not None:
        res["calibration"] = cal
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
