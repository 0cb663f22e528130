"""Train a Genie from a folder of videos.

    python -m training.train --config configs/coinrun-cpu.yaml --data DATA --out RUN [key=value ...]
    python -m training.train --config ... --data DATA --out RUN --resume          # continue where it stopped
    torchrun --nproc_per_node 2 -m training.train --config ... --data DATA --out RUN   # several processes

Stages, in order (``--stage`` runs one): ``tokenizer`` (VQ-VAE on single frames; with
``tokenizer_context=1`` on pairs, or closed loop on longer clips), ``lam`` (the latent action model
alone), ``dynamics`` (the dynamics model on the frozen tokenizer's tokens and the latent actions, the
latent action model co-trained with it unless ``cotrain_lam: false``, as in the paper) and ``reward``
(the reward / episode-end heads on the frozen model, from the outcomes recorded beside the videos; runs
only when the config sets ``outcome_input``, e.g. ``outcome_input=hidden``).

The config YAML holds `GenieConfig` fields, plus optional ``stages: {tokenizer: {...}, lam: {...},
dynamics: {...}}`` with per-stage training settings (batch_size, learning_rate, max_steps, num_frames,
...). Overrides: ``key=value`` for a config field, ``stages.dynamics.max_steps=100`` for a stage.

Each stage writes to RUN/<stage>/: ``checkpoint.pt`` (resume state, atomic), ``release/`` (loadable with
``Genie.from_pretrained``), ``metrics.csv``, ``tb/`` (TensorBoard) and ``samples/`` (images to look at).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from genie_env import Genie, GenieConfig
from genie_env.config import ConfigError, load_yaml
from genie_env.hub import EXTRA_FILES, recover_interrupted_save
from training.checkpoint import CheckpointWriteError, RunLock, atomic_save, load_checkpoint
from training.data import DatasetError, FrameCache, KeyClipSampler, OutcomeSampler
from training.pretokenized import TokenFile, make_sampler, open_training_data, to_batch
from training.transplant import carry_dynamics

STAGES = ("tokenizer", "lam", "dynamics", "reward")
# Fields a stage may override: training settings only, never the architecture.
STAGE_FIELDS = {
    "batch_size", "learning_rate", "weight_decay", "warmup_steps", "max_steps", "epochs", "grad_clip",
    "num_frames", "bf16", "gradient_checkpointing", "mask_rate_min", "mask_rate_max", "context_noise",
    "lam_entropy_weight", "lam_beta", "lambda_action", "lambda_dynamics", "tokenizer_commitment",
    "outcome_end_fraction", "outcome_pos_weight", "outcome_inside", "outcome_inside_fraction",
}
STAGE_EXTRA = {"cotrain_lam": True, "key_actions": 0.0}


@dataclass
class TrainArgs:
    """Command-line arguments of `python -m training.train`."""

    config: Path
    """YAML config (GenieConfig fields + optional `stages:`)."""
    data: Path
    """Dataset folder (DATA/videos/*.mp4), or a file from `python -m training.pretokenize`: a frames file
    (any stage) or a tokens file (the dynamics stage, with cotrain_lam: false)."""
    out: Path
    """Run folder."""
    val_data: Path | None = None
    """Validation dataset (other levels); metrics of EVALUATION.md are computed on it."""
    stage: str = "all"
    """tokenizer, lam, dynamics, or all."""
    resume: bool = False
    """Continue from RUN/<stage>/checkpoint.pt."""
    init_from: Path | None = None
    """Release folder to start the stage's model from (default: the previous stage's release)."""
    ends_data: list[Path] = field(default_factory=list)
    """Reward stage: episode-ends recordings (``training.record --episode-ends N``, repeatable) whose
    endings join --data's; their weights keep the stage's data the game's distribution."""
    init_part: list[str] = field(default_factory=list)
    """PART=FOLDER (repeatable): take one part (tokenizer, latent_actions, dynamics) from this release
    folder instead, e.g. to fine-tune the dynamics on a retrained tokenizer."""
    checkpoint_every: int = 1000
    """Save a resume checkpoint every this many steps ..."""
    checkpoint_minutes: float = 10.0
    """... and at least every this many minutes."""
    log_every: int = 20
    """Write metrics every this many steps."""
    val_every: int = 2000
    """Validate every this many steps (0 = only at the end)."""
    val_clips: int = 32
    """Validation clips."""
    device: str = "auto"
    """cpu, cuda, or auto."""
    threads: int = 0
    """CPU threads (0 = all cores)."""
    progress: bool = True
    """Show a progress bar."""
    stop_after: int = 0
    """Stop (saving a checkpoint, as on SIGTERM) after this many steps of this invocation; 0 = never."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides."""


# ---------------------------------------------------------------------------------------------- config
def parse_value(text: str) -> Any:
    return load_yaml(text)


def load_run_config(path: Path, overrides: list[str]) -> tuple[GenieConfig, dict[str, dict[str, Any]]]:
    """The model config and per-stage settings from YAML + overrides; errors name the bad key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config fields")
    stages = data.pop("stages", None) or {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key=value")
        key, val = ov.split("=", 1)
        parts = key.split(".")
        if parts[0] == "stages":
            if len(parts) != 3:
                raise ConfigError(f"stage override {key!r} must look like stages.<stage>.<field>=value")
            stages.setdefault(parts[1], {})[parts[2]] = parse_value(val)
        else:
            data[key] = parse_value(val)
    config = GenieConfig.from_dict(data)
    out: dict[str, dict[str, Any]] = {}
    for name, ov in stages.items():
        if name not in STAGES:
            raise ConfigError(f"unknown stage {name!r} in stages: use {', '.join(STAGES)}")
        ov = dict(ov or {})
        bad = sorted(set(ov) - STAGE_FIELDS - set(STAGE_EXTRA))
        if bad:
            raise ConfigError(f"stages.{name} cannot set {', '.join(bad)}: a stage may only set "
                              f"{', '.join(sorted(STAGE_FIELDS | set(STAGE_EXTRA)))}")
        out[name] = ov
    for name in STAGES:
        out.setdefault(name, {})
        model_ov = {k: v for k, v in out[name].items() if k in STAGE_FIELDS}
        config.replace(**model_ov)  # validates the stage's values now, not hours later
    return config, out


def stage_config(config: GenieConfig, stage_ov: dict[str, Any]) -> tuple[GenieConfig, dict[str, Any]]:
    extra = {k: stage_ov.get(k, v) for k, v in STAGE_EXTRA.items()}
    return config.replace(**{k: v for k, v in stage_ov.items() if k in STAGE_FIELDS}), extra


# ---------------------------------------------------------------------------------------------- stages
class StageModule(nn.Module):
    """The loss of one stage as a module (what DistributedDataParallel wraps)."""

    def __init__(self, genie: Genie, stage: str, cfg: GenieConfig, cotrain_lam: bool,
                 action_map: dict[str, int] | None = None) -> None:
        super().__init__()
        self.genie = genie
        self.action_map = action_map or {}
        self.stage = stage
        self.cfg = cfg
        self.cotrain_lam = cotrain_lam
        for p in genie.parameters():
            p.requires_grad_(False)
        for p in self.trained_parameters():
            p.requires_grad_(True)

    def trained_parameters(self) -> list[nn.Parameter]:
        g = self.genie
        if self.stage == "tokenizer":
            return list(g.tokenizer.parameters())
        if self.stage == "lam":
            return list(g.latent_actions.parameters())
        if self.stage == "reward":
            assert g.outcomes is not None
            return list(g.outcomes.parameters())
        params = list(g.dynamics.parameters())
        if self.cotrain_lam:
            params += list(g.latent_actions.parameters())
        return params

    def forward(self, frames: torch.Tensor | dict | None = None, tokens: torch.Tensor | None = None,
                actions: torch.Tensor | None = None, key_actions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """frames (B, 3, T, H, W) in [0, 1] (for the reward stage: an `OutcomeSampler` or `FeaturePool`
        batch); or, for the dynamics stage from a tokens file, tokens (B, T, n) and latent actions (B, T-1)
        that the frozen tokenizer and latent action model gave for them. key_actions (B, T-1): the recorded
        keys' latent actions (`training.data.KeyClipSampler`), which replace the inferred ones where >= 0."""
        g, cfg = self.genie, self.cfg
        if self.stage == "reward":
            from training.outcomes import compute_loss

            return compute_loss(g, frames, self.action_map, cfg.outcome_pos_weight)
        if tokens is not None:
            if self.stage != "dynamics" or self.cotrain_lam:
                raise ValueError("tokens in place of frames train only the dynamics stage with cotrain_lam: false")
            ce, m = g.dynamics.loss(tokens, actions)
            return cfg.lambda_dynamics * ce, m
        if self.stage == "tokenizer":
            out = g.tokenizer(frames)
            return out.loss, {"recon_mse": out.recon_loss.detach(), "perplexity": out.perplexity.detach()}
        if self.stage == "lam":
            out = g.latent_actions(frames)
            return out.loss, {"lam_mse": out.recon_loss.detach(), "lam_perplexity": out.perplexity.detach()}
        with torch.no_grad():
            tokens = g.tokenizer.encode(frames).flatten(2)
        if self.cotrain_lam:
            lam = g.latent_actions(frames)
            actions = lam.actions.detach()
        else:
            with torch.no_grad():
                actions = g.latent_actions.infer(frames)
        if key_actions is not None:
            actions = torch.where(key_actions >= 0, key_actions, actions)
        ce, m = g.dynamics.loss(tokens, actions)
        loss = cfg.lambda_dynamics * ce
        if self.cotrain_lam:
            loss = loss + cfg.lambda_action * lam.loss
            m = {**m, "lam_mse": lam.recon_loss.detach(), "lam_perplexity": lam.perplexity.detach()}
        return loss, m


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on the matrices of linear and convolution layers only, as nanoGPT;
    never on norms, biases, embeddings, positional tables, time biases or codebooks, which decay would
    pull toward zero for no regularising gain."""
    decay, rest, seen = [], [], set()
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            matrix = name == "weight" and isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                            nn.ConvTranspose2d, nn.ConvTranspose3d))
            (decay if matrix else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def forget_restarted_codes(module: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Clear this step's gradient and Adam's moments for codebook rows the forward pass restarted: the
    moments belong to the old code, and the gradient would pull the new one back toward it."""
    from genie_env.models.quantizer import VectorQuantizer

    for vq in module.modules():
        if not isinstance(vq, VectorQuantizer) or vq.restarted is None or not isinstance(vq.embed, nn.Parameter):
            continue
        rows, vq.restarted = vq.restarted, None
        if not rows.any() or not vq.embed.requires_grad:
            continue
        if vq.embed.grad is not None:
            vq.embed.grad[rows] = 0
        for key in ("exp_avg", "exp_avg_sq"):
            buf = opt.state.get(vq.embed, {}).get(key)
            if buf is not None:
                buf[rows] = 0


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------------------------------------- runner
class Trainer:
    def __init__(self, args: TrainArgs, log=print) -> None:
        self.args = args
        self.log = log
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.is_main = self.rank == 0
        if args.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(args.device)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        elif self.world > 1 and self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        self.config, self.stage_ov = load_run_config(args.config, args.overrides)
        self.out = Path(args.out)
        self.stop_requested = False
        self.lock = RunLock(self.out) if self.is_main else None

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            if self.stop_requested:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log(f"\n{signal.Signals(signum).name} received: saving a checkpoint and stopping")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def run(self) -> int:
        if self.lock:
            self.lock.acquire()
        try:
            self._install_signals()
            stages = STAGES if self.args.stage == "all" else (self.args.stage,)
            if self.args.stage not in STAGES + ("all",):
                raise ConfigError(f"--stage must be one of {', '.join(STAGES)} or all, got {self.args.stage!r}")
            if self.config.outcome_input == "none":  # a model without reward / episode-end heads
                if self.args.stage == "reward":
                    raise ConfigError("--stage reward trains the reward / episode-end heads: set what they "
                                      "read, e.g. outcome_input=hidden (or tokens)")
                stages = tuple(s for s in stages if s != "reward")
            if self.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                import yaml

                (self.out / "config.yaml").write_text(yaml.safe_dump(
                    {**self.config.to_dict(), "stages": self.stage_ov}, sort_keys=False))
            for stage in stages:
                done = self.out / stage / "DONE"
                if self.args.stage == "all" and done.is_file():
                    self.log(f"stage {stage}: already finished ({done}), skipping")
                    continue
                status = self.run_stage(stage)
                if status != "done":
                    break
            if dist.is_initialized():  # every rank done before the group is torn down (gloo's threads)
                dist.barrier()
            return 0
        finally:
            if self.lock:
                self.lock.release()
            if dist.is_initialized():
                dist.destroy_process_group()

    def _initial_model(self, stage: str) -> Genie:
        """A fresh model whose already-trained parts come from earlier stages' releases (or --init-from):
        the tokenizer for the lam stage; the tokenizer and latent action model for the dynamics stage."""
        torch.manual_seed(self.config.seed)
        model = Genie(self.config)
        needed = {"tokenizer": (), "lam": ("tokenizer",), "dynamics": ("tokenizer", "latent_actions"),
                  "reward": ("tokenizer", "latent_actions", "dynamics")}[stage]
        chosen = {}
        body = None
        for item in self.args.init_part:
            part, sep, folder = item.partition("=")
            if not sep or part not in (*_PART.values(), BODY_PART):
                raise ConfigError(f"--init-part {item!r}: expected PART=FOLDER with PART one of "
                                  f"{', '.join((*_PART.values(), BODY_PART))}")
            if not (Path(folder) / "model.safetensors").is_file():
                raise ConfigError(f"--init-part {item!r}: {folder} is not a release folder (no model.safetensors)")
            if part == BODY_PART:
                if stage != "dynamics":
                    raise ConfigError(f"--init-part {item!r}: {BODY_PART} starts a dynamics stage; this is "
                                      f"the {stage} stage")
                body = Path(folder)
            else:
                chosen[part] = Path(folder)
        if self.args.init_from is not None:
            sources = {part: Path(self.args.init_from) for part in needed + (_PART[stage],)}
            if stage == "reward" and not _has_part(Path(self.args.init_from), "outcomes"):
                del sources["outcomes"]  # a release without heads: they start from scratch
            elif stage == "reward" and not _heads_match(Path(self.args.init_from), self.config):
                self.log(f"stage reward: the heads in {self.args.init_from} differ from the config's "
                         "(outcome_input / outcome_dim / outcome_frames): they start from scratch")
                del sources["outcomes"]
        elif stage == "reward":  # the model the dynamics stage finished, all parts of it
            rel = self.out / "dynamics" / "release"
            if not (rel / "model.safetensors").is_file():
                raise ConfigError(f"stage reward needs a trained model: none in {rel}; pass --init-from RELEASE")
            sources = {part: rel for part in needed if part not in chosen}
        else:
            sources = {}
            for part in needed:
                if part in chosen:
                    continue
                for prev in reversed(STAGES[: STAGES.index(stage)]):
                    rel = self.out / prev / "release"
                    if _PART[prev] == part and (rel / "model.safetensors").is_file():
                        sources[part] = rel
                        break
                else:
                    rel = self.out / "tokenizer" / "release"
                    if part == "latent_actions":
                        self.log(f"stage {stage}: no latent action model trained yet: co-train it or run --stage lam")
                    elif not (rel / "model.safetensors").is_file():
                        self.log(f"stage {stage}: no trained tokenizer found in {rel}; starting from random weights")
        sources.update(chosen)
        if body is not None and "dynamics" in sources:
            raise ConfigError(f"--init-part {BODY_PART}={body}: the dynamics also comes whole from "
                              f"{sources['dynamics']}; give one of the two")
        for part, src in sources.items():
            load_part(model, src, part)
            self.log(f"stage {stage}: {part} from {src}")
        if body is not None:
            skipped = load_dynamics_body(model, body)
            self.log(f"stage {stage}: dynamics from {body} but {', '.join(skipped)}, which are carried over "
                     "to this tokenizer's codebook")
            carry_dynamics(model, body, self.args.data, log=self.log)
        if stage == "reward":  # the release keeps the prompt bank and action map the env plays with
            src = sources.get("dynamics")
            model.extra_files = {name: src / name for name in EXTRA_FILES
                                 if src is not None and (src / name).is_file() and name != "README.md"}
        elif stage == "dynamics":  # the action map belongs to the latent action model (key_actions reads it)
            src = sources.get("latent_actions")
            if src is not None and (src / "action_map.json").is_file():
                model.extra_files = {"action_map.json": src / "action_map.json"}
        return model.train()

    def run_stage(self, stage: str) -> str:
        args = self.args
        cfg, extra = stage_config(self.config, self.stage_ov.get(stage, {}))
        if stage == "tokenizer" and cfg.tokenizer_context and cfg.num_frames < 2:
            raise ConfigError("tokenizer_context=1 trains on each frame against the one before: set "
                              "stages.tokenizer.num_frames=2 (against the real frame before) or more (closed "
                              "loop: later frames against the previous decoded frame)")
        sdir = self.out / stage
        ckpt_path = sdir / "checkpoint.pt"
        if self.is_main:
            (sdir / "samples").mkdir(parents=True, exist_ok=True)
            _remove_partial_writes(sdir)
        state = None
        if args.resume and ckpt_path.is_file():
            state = load_checkpoint(ckpt_path)
            self.log(f"stage {stage}: resuming from {ckpt_path} at step {state['step']}")
        elif args.resume and args.stage != "all":
            self.log(f"stage {stage}: no checkpoint at {ckpt_path}; starting the stage from its beginning")
        elif not args.resume and ckpt_path.is_file():
            raise RuntimeError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")

        genie = self._initial_model(stage) if state is None else Genie(self.config)
        if state is not None:
            genie.load_state_dict(state["model"])
            genie.extra_files = {k: Path(v) for k, v in state.get("extra_files", {}).items()}
        genie.to(self.device).train()
        action_map = _read_action_map(genie) if stage == "reward" else None
        module = StageModule(genie, stage, cfg, extra["cotrain_lam"], action_map)
        params = module.trained_parameters()
        opt = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.max_steps))
        wrapped: nn.Module = module
        if self.world > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        quiet = lambda *a: None  # noqa: E731
        cache = open_training_data(args.data, stage, cfg.image_size, log=self.log if self.is_main else quiet)
        if isinstance(cache, TokenFile):
            if extra["cotrain_lam"] and stage == "dynamics":
                raise ConfigError(f"--data {args.data} holds tokens and inferred actions, no frames to co-train the "
                                  "latent action model on: set stages.dynamics.cotrain_lam=false, or train from "
                                  "the videos")
            if stage == "reward":
                raise ConfigError(f"--data {args.data} is a tokens file: the reward stage reads the dataset folder "
                                  "(videos and their recorded outcomes)")
            cache.check_model(genie, bf16=cfg.bf16, log=self.log if self.is_main else quiet)
        if stage == "reward":
            if not isinstance(cache, FrameCache):
                raise ConfigError(f"--data {args.data}: the reward stage reads the dataset folder (videos and "
                                  "their recorded outcomes), not a frames file")
            sampler = OutcomeSampler(cache, cfg.outcome_end_fraction, seed=cfg.seed + STAGES.index(stage))
            extra = [OutcomeSampler(FrameCache(d, cfg.image_size, log=self.log if self.is_main else quiet))
                     for d in args.ends_data]
            if extra and cfg.outcome_input != "tokens":
                raise ConfigError("--ends-data joins the pool of the reward stage's inputs: it needs "
                                  "outcome_input=tokens")
            if cfg.outcome_input == "tokens":  # the frozen model's part of the inputs, computed once
                from training.outcomes import FeaturePool

                sampler = FeaturePool(genie, sampler, action_map or {}, inside=cfg.outcome_inside,
                                      seed=cfg.seed, log=self.log, cache=sdir / "feature_pool.pt", extra=extra,
                                      inside_fraction=cfg.outcome_inside_fraction)
                genie.train()
            counts = sampler.event_counts()
            self.log(f"stage reward: {counts} in {args.data}")
            open_ended = counts["reward_events"] - counts["reward_events_that_ended"]
            if cfg.outcome_reward_terminates and open_ended:
                raise ConfigError(
                    f"outcome_reward_terminates=true, but {open_ended} of the {counts['reward_events']} recorded "
                    "reward events did not end their episode: in this game a reward does not always end it; set "
                    "outcome_reward_terminates=false")
            if state is None:
                assert genie.outcomes is not None
                genie.outcomes.logit_offset.fill_(-math.log(cfg.outcome_pos_weight))
                genie.outcomes.event_reward.fill_(sampler.mean_event_reward)
        elif extra["key_actions"]:
            sampler = self._key_sampler(stage, genie, cache, cfg, extra)
        else:
            sampler = make_sampler(cache, cfg.num_frames, seed=cfg.seed + STAGES.index(stage), rank=self.rank,
                                   world_size=self.world)
        step = 0
        elapsed = 0.0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            sampler.load_state_dict(state["sampler"][self.rank] if isinstance(state["sampler"], list)
                                    else state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and self.device.type == "cuda":  # the mask draws run there
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            step, elapsed = state["step"], state.get("elapsed", 0.0)
        else:
            torch.manual_seed(cfg.seed * 1000 + STAGES.index(stage) * 100 + self.rank)

        val = self._val_clips(cfg, stage) if (self.is_main and args.val_data) else None
        writer = self._writer(sdir) if self.is_main else None
        csv_path = sdir / "metrics.csv"
        frames_per_step = cfg.batch_size * cfg.num_frames * self.world
        steps_per_epoch = max(1, cache.total_frames // frames_per_step)
        max_steps = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
        bar = None
        if self.is_main and args.progress:
            from tqdm import tqdm

            bar = tqdm(total=max_steps, initial=step, desc=stage, dynamic_ncols=True, mininterval=2.0)
        start_step = step
        if self.is_main:
            _truncate_csv(csv_path, step)
            _truncate_csv(sdir / "val_metrics.csv", step)
        last_ckpt_time = time.time()
        last_good = ckpt_path if ckpt_path.is_file() else None
        t_log = time.time()
        steps_since = 0
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        status = "done"
        saved = None
        while step < max_steps:
            if stage == "reward":
                batch = {"frames": sampler.sample(cfg.batch_size, _reward_context(cfg, sampler.rng))}
            else:
                batch = to_batch(sampler.sample(cfg.batch_size), self.device)
            with autocast:
                loss, metrics = wrapped(**batch)
            if not torch.isfinite(loss):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
                raise FloatingPointError(
                    f"stage {stage}: loss became {loss.item()} at step {step}; {where} "
                    "(lower the learning rate, then resume with --resume)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            forget_restarted_codes(module, opt)
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
            opt.step()
            sched.step()
            step += 1
            steps_since += 1
            if bar:
                bar.update(1)
            if self.is_main and (step % args.log_every == 0 or step == max_steps):
                now = time.time()
                dt = now - t_log
                elapsed += dt
                row = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                       "grad_norm": float(gnorm),
                       "frames_per_s": steps_since * frames_per_step / max(dt, 1e-9), "elapsed_s": elapsed,
                       **{k: float(v) for k, v in metrics.items()}}
                t_log, steps_since = now, 0
                self._log_row(csv_path, writer, row)
                if bar:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", fps=f"{row['frames_per_s']:.0f}")
            if self.is_main and val is not None and args.val_every and step % args.val_every == 0:
                self._validate(stage, genie, val, step, csv_path, writer, sdir)
                genie.train()
            if args.stop_after and step - start_step >= args.stop_after:
                self.stop_requested = True
            stop = self._agree_stop()
            due = (step % args.checkpoint_every == 0 or time.time() - last_ckpt_time > args.checkpoint_minutes * 60
                   or step == max_steps or stop)
            if self._agree(due):
                saved = self._save(stage, genie, opt, sched, sampler, step, elapsed, ckpt_path, sdir)
                if saved != "failed":
                    last_good = ckpt_path
                last_ckpt_time = time.time()
            if stop:
                status = "stopped"
                self.log(f"stage {stage}: stopped at step {step}; resume with --resume")
                break
        if bar:
            bar.close()
        # A run resumed at its last step (killed after the final checkpoint, before its release or DONE) has
        # a release one step behind; a final write that failed must not pass for a finished stage.
        if status == "done" and self._agree(saved != "saved"):
            saved = self._save(stage, genie, opt, sched, sampler, step, elapsed, ckpt_path, sdir)
            if saved != "saved":
                raise RuntimeError(
                    f"stage {stage}: reached step {step} but its final checkpoint and release could not be "
                    f"written (see the warnings above); the last good checkpoint is {last_good}: make room, "
                    "then run again with --resume")
        if status == "done" and self.is_main:
            if val is not None:
                self._validate(stage, genie, val, step, csv_path, writer, sdir)
            (sdir / "DONE").write_text(f"{step}\n")
            self.log(f"stage {stage}: finished at step {step}; release model in {sdir / 'release'}")
        if writer:
            writer.close()
        return status

    # ------------------------------------------------------------------ helpers
    def _key_sampler(self, stage: str, genie: Genie, cache, cfg: GenieConfig, extra: dict) -> KeyClipSampler:
        """Clips of which a share ``key_actions`` is driven by the recorded keys through the action map of
        the latent action model: its release's action_map.json, or else one made here the way training.export
        makes it, which the release keeps (and the export with it: the keys mean what the dynamics learned)."""
        share = extra["key_actions"]
        if stage != "dynamics":
            raise ConfigError(f"stages.{stage}.key_actions={share}: recorded keys drive only the dynamics stage")
        if not isinstance(cache, FrameCache):
            raise ConfigError(f"key_actions={share} reads the keys recorded beside the videos: --data must be the "
                              f"dataset folder, not a tokens or frames file ({self.args.data})")
        from genie_env.env import load_action_map

        amap = load_action_map(genie)
        if not amap:  # the map training.export would make, from the recorded keys of the training videos
            from training.export import action_map, infer_with_groups

            genie.eval()
            try:
                amap = action_map(*infer_with_groups(genie, cache.data_dir), cfg.action_vocab_size)["map"]
            except ValueError as e:
                raise ConfigError(f"key_actions={share}: {e}; record the videos with training.record, or set "
                                  "key_actions=0") from e
            finally:
                genie.train()
            path = self.out / stage / "action_map.json"
            if self.is_main:
                path.write_text(json.dumps(amap, indent=1) + "\n")
            genie.extra_files = {**genie.extra_files, "action_map.json": path}
            self.log(f"stage {stage}: the latent action model has no action_map.json; made one from the recorded "
                     f"keys of {cache.data_dir}, as training.export does, and kept with the release")
        sampler = KeyClipSampler(cache, cfg.num_frames, amap, share, seed=cfg.seed + STAGES.index(stage),
                                 rank=self.rank, world_size=self.world)
        self.log(f"stage {stage}: {share:.0%} of the clips driven by their recorded keys through {amap} "
                 f"({sampler.keyed_videos} of {len(cache.videos)} videos record them)")
        return sampler

    def _agree_stop(self) -> bool:
        """All ranks stop together when any received a stop signal."""
        if self.world == 1:
            return self.stop_requested
        t = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _agree(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _save(self, stage, genie, opt, sched, sampler, step, elapsed, ckpt_path, sdir) -> str:
        """Write the resume checkpoint, then the release folder. Returns "saved", "checkpoint" (the release
        could not be written) or "failed" (the checkpoint could not be written; the previous one is intact)."""
        samplers = [sampler.state_dict()]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, sampler.state_dict())
            samplers = gathered
        if not self.is_main:
            return "saved"
        state = {
            "stage": stage, "step": step, "elapsed": elapsed, "model": genie.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "sampler": samplers if self.world > 1 else samplers[0], "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "config": self.config.to_dict(), "extra_files": {k: str(v) for k, v in genie.extra_files.items()},
        }
        try:
            atomic_save(state, ckpt_path)
            genie.save_pretrained(sdir / "release")
        except CheckpointWriteError as e:
            self.log(f"warning: {e}")
            return "failed"
        except OSError as e:
            self.log(f"warning: writing the release folder failed ({e}); the checkpoint {ckpt_path} is intact")
            return "checkpoint"
        return "saved"

    def _writer(self, sdir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("TensorBoard is not installed (pip install tensorboard): logging to metrics.csv only")
            return None
        return SummaryWriter(str(sdir / "tb"))

    def _log_row(self, csv_path: Path, writer, row: dict[str, float]) -> None:
        new = not csv_path.is_file()
        keys = list(row)
        if not new:
            with open(csv_path) as f:
                header = f.readline().strip().split(",")
            if header != keys:
                keys = header + [k for k in keys if k not in header]
        with open(csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if writer:
            for k, v in row.items():
                if k != "step":
                    writer.add_scalar(k, v, row["step"])

    def _val_clips(self, cfg: GenieConfig, stage: str):
        from training.evaluate import load_eval_clips

        if stage == "reward":  # real transitions, read by metric 8 at each validation
            return {"outcomes_data": self.args.val_data}
        return load_eval_clips(self.args.val_data, cfg.image_size, num_clips=self.args.val_clips,
                               clip_frames=16, log=self.log)

    @torch.no_grad()
    def _validate(self, stage, genie, val, step, csv_path, writer, sdir) -> None:
        from training.evaluate import evaluate_stage

        genie.eval()
        if stage == "reward":
            from training.outcomes import real_transition_metrics

            # every event of the validation set, and 2,000 other transitions standing for all of them
            m8 = real_transition_metrics(genie, val["outcomes_data"], _read_action_map(genie),
                                         max_inside=2000, log=lambda *a: None)
            res = {f"{ev}_{k}": m8[ev][k] for ev in ("reward", "terminated") for k in ("precision", "recall")}
        else:
            res = evaluate_stage(genie, stage, val, samples_to=sdir / "samples" / f"step_{step:07d}")
        self.log(f"stage {stage} step {step} validation: " + ", ".join(
            f"{k}={v:.4g}" for k, v in res.items() if isinstance(v, (int, float))))
        self._log_row(sdir / "val_metrics.csv", writer,
                      {"step": step, **{f"val_{k}": float(v) for k, v in res.items() if isinstance(v, (int, float))}})


def _truncate_csv(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from, or all of them when it starts from step 0
    (they will be logged again). Rewritten atomically: a kill here must not lose the rows kept."""
    if not path.is_file():
        return
    if step == 0:  # (a run killed before its first checkpoint may even have left half a header)
        path.unlink()
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.endswith("\n") and ln.split(",", 1)[0].isdigit()
                        and int(ln.split(",", 1)[0]) <= step]
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _remove_partial_writes(sdir: Path) -> None:
    """Delete what writes interrupted by a kill left behind (the checkpoint and release they were replacing
    are intact): checkpoint temp files and release temp folders. Called under the run lock."""
    for tmp in sdir.glob("checkpoint.pt.tmp*"):
        tmp.unlink(missing_ok=True)
    recover_interrupted_save(sdir / "release")


def _reward_context(cfg: GenieConfig, rng: np.random.Generator) -> int:
    """Past frames a reward-stage sample carries. Hidden states depend on the whole context: lengths 1 ..
    context_frames - 1, as after a reset and later. Tokens of frame t need only what the latent action
    model reads to infer a_t (its context frames up to x_t)."""
    if cfg.outcome_input == "tokens":
        return cfg.lam_context_frames
    return int(rng.integers(1, max(2, cfg.context_frames)))


_PART = {"tokenizer": "tokenizer", "lam": "latent_actions", "dynamics": "dynamics", "reward": "outcomes"}


def _heads_match(folder: Path, config: GenieConfig) -> bool:
    """Whether the release's reward / episode-end heads have the tensors (names and shapes) of the config's."""
    from genie_env.hub import WEIGHTS_NAME, read_safetensors_header
    from genie_env.models.outcomes import OutcomeModel

    theirs = {k[len("outcomes."):]: tuple(v["shape"]) for k, v in read_safetensors_header(folder / WEIGHTS_NAME).items()
              if k.startswith("outcomes.")}
    mine = {k: tuple(v.shape) for k, v in OutcomeModel(config).state_dict().items()}
    return theirs == mine


def _has_part(folder: Path, part: str) -> bool:
    from genie_env.hub import WEIGHTS_NAME, read_safetensors_header

    return any(k.startswith(part + ".") for k in read_safetensors_header(folder / WEIGHTS_NAME))


def _read_action_map(genie: Genie) -> dict[str, int]:
    """Group -> latent action from the model's action_map.json; without one, end transitions get random
    latent actions (see training.outcomes)."""
    from genie_env.env import load_action_map

    amap = load_action_map(genie)
    if not amap:
        print("warning: the model ships no action_map.json: the transitions out of a video's last frame get "
              "random latent actions", file=sys.stderr)
    return amap


def load_part(model: Genie, folder: Path, part: str, leave_out: tuple[str, ...] = ()) -> None:
    """Load one component (tokenizer, latent_actions or dynamics) of a release folder into ``model``; the
    component's tensors must be the same in name and shape on both sides, but those named in ``leave_out``,
    which keep the model's own values."""
    from safetensors.torch import load_file

    from genie_env.hub import WEIGHTS_NAME

    state = load_file(str(Path(folder) / WEIGHTS_NAME))
    prefix = part + "."
    mine = {k: v for k, v in model.state_dict().items() if k.startswith(prefix) and k not in leave_out}
    theirs = {k: v for k, v in state.items() if k.startswith(prefix) and k not in leave_out}
    bad = sorted(k for k in mine if k not in theirs or tuple(theirs[k].shape) != tuple(mine[k].shape))
    bad += sorted(set(theirs) - set(mine))
    if bad:
        beyond = " beyond the vocabulary-sized tensors left out" if leave_out else ""
        raise ConfigError(f"{folder}: its {part} does not match the config{beyond} ({', '.join(bad[:5])} ...); "
                          "was it trained with another architecture?")
    model.load_state_dict({k: theirs[k].to(mine[k].dtype) for k in mine}, strict=False)


BODY_PART = "dynamics-body"
_VOCAB_SIZED = ("dynamics.token_emb.weight", "dynamics.head.weight", "dynamics.head.bias")


def load_dynamics_body(model: Genie, folder: Path) -> list[str]:
    """A release's dynamics but the tensors sized by the tokenizer's vocabulary (token embedding, output
    layer), which keep the model's own values: the start of a dynamics for a tokenizer with another
    codebook (`training.transplant.carry_dynamics` then fills them). Returns the names left out."""
    load_part(model, folder, "dynamics", leave_out=_VOCAB_SIZED)
    return [k[len("dynamics."):] for k in _VOCAB_SIZED]


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    for f in fields(TrainArgs):
        if f.name == "overrides":
            continue
        if f.name == "ends_data":
            p.add_argument("--ends-data", action="append", type=Path, default=[], metavar="DIR",
                           help="reward stage: an episode-ends recording whose endings join --data's (repeatable)")
            continue
        if f.name == "init_part":
            p.add_argument("--init-part", action="append", default=[], metavar="PART=FOLDER",
                           help="take one part from this release folder (repeatable); dynamics-body=FOLDER: its "
                                "dynamics carried over to a tokenizer with another codebook (training.transplant)")
            continue
        flag = "--" + f.name.replace("_", "-")
        helptext = (f.metadata or {}).get("help")
        if f.type in ("bool",):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
        elif f.name in ("config", "data", "out"):
            p.add_argument(flag, type=Path, required=True)
        elif "Path" in str(f.type):
            p.add_argument(flag, type=Path, default=f.default)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    ns = p.parse_args(argv)
    return TrainArgs(**vars(ns))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return Trainer(args).run()
    except (ConfigError, DatasetError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
