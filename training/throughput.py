"""Training throughput of each stage on this machine, bf16 autocast vs fp32.

    python -m training.throughput --config configs/coinrun-cpu.yaml --steps 10 --json throughput.json
    python -m training.throughput --stages dynamics --from-tokens      # + the dynamics from a tokens file

Random frames of the configured size and each stage's batch settings; reports frames per second of
training (forward, backward and optimiser step), the median over ``--steps`` after two warm-up steps.
``--from-tokens`` adds a row per dtype for the dynamics stage fed tokens and latent actions, as from a
pre-tokenised file (`training.pretokenize`): no tokenizer or latent action pass per step; the two inputs'
steps are then alternated, so both see the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from genie_env import Genie
from training.train import STAGES, StageModule, load_run_config, stage_config


def _setup(stage: str, config_path: Path, bf16: bool, device: str, from_tokens: bool, overrides: list[str] | None):
    """One training step of the stage on random input as a function, and the row describing it."""
    config, stage_ov = load_run_config(config_path, overrides or [])
    cfg, extra = stage_config(config, stage_ov.get(stage, {}))
    if from_tokens and stage != "dynamics":
        raise ValueError(f"--from-tokens measures the dynamics stage only, not {stage}")
    dev = torch.device(device)
    torch.manual_seed(0)
    module = StageModule(Genie(config).to(dev).train(), stage, cfg, extra["cotrain_lam"] and not from_tokens)
    opt = torch.optim.AdamW(module.trained_parameters(), lr=1e-4)
    b, t = cfg.batch_size, cfg.num_frames
    if from_tokens:
        batch = {"tokens": torch.randint(0, cfg.tokenizer_vocab_size, (b, t, cfg.tokens_per_frame), device=dev),
                 "actions": torch.randint(0, cfg.action_vocab_size, (b, t - 1), device=dev)}
    else:
        batch = {"frames": torch.rand(b, 3, t, cfg.image_size, cfg.image_size, device=dev)}

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module(**batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    row = {"stage": stage, "input": "tokens" if from_tokens else "frames", "dtype": "bf16" if bf16 else "fp32",
           "device": str(dev), "batch": b, "clip_frames": t,
           "cotrain_lam": module.cotrain_lam if stage == "dynamics" else None}
    return step, row


def _finish(row: dict, times: list[float]) -> dict:
    sec = statistics.median(times)
    return {**row, "step_s": sec, "frames_per_s": row["batch"] * row["clip_frames"] / sec}


def measure(stage: str, config_path: Path, bf16: bool, steps: int, device: str = "cpu",
            from_tokens: bool = False, overrides: list[str] | None = None) -> dict:
    step, row = _setup(stage, config_path, bf16, device, from_tokens, overrides)
    times = [step() for _ in range(steps + 2)][2:]
    return _finish(row, times)


def measure_inputs(config_path: Path, bf16: bool, steps: int, device: str = "cpu",
                   overrides: list[str] | None = None) -> list[dict]:
    """The dynamics stage fed frames and fed tokens, their steps alternated: on a shared machine whose speed
    drifts over minutes, two measurements taken one after the other would compare two machines."""
    pairs = [_setup("dynamics", config_path, bf16, device, tokens, overrides) for tokens in (False, True)]
    times: list[list[float]] = [[], []]
    for i in range(steps + 2):
        for j, (step, _) in enumerate(pairs):
            dt = step()
            if i >= 2:
                times[j].append(dt)
    return [_finish(row, ts) for (_, row), ts in zip(pairs, times)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/coinrun-cpu.yaml"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--from-tokens", action="store_true",
                   help="also measure the dynamics stage fed tokens and actions (a pre-tokenised file)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtypes", default="bf16,fp32", help="bf16, fp32 or both")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for training.train")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for stage in a.stages.split(","):
        for dtype in a.dtypes.split(","):
            if dtype not in ("bf16", "fp32"):
                p.error(f"--dtypes takes bf16 and/or fp32, got {dtype!r}")
            if a.from_tokens and stage == "dynamics":
                new = measure_inputs(a.config, dtype == "bf16", a.steps, a.device, a.overrides)
            else:
                new = [measure(stage, a.config, dtype == "bf16", a.steps, a.device, False, a.overrides)]
            for r in new:
                rows.append(r)
                print(f"{stage:<10} {r['input']:<6} {r['dtype']:<5} batch {r['batch']} x {r['clip_frames']} frames: "
                      f"{r['frames_per_s']:7.1f} frames/s ({r['step_s'] * 1000:.0f} ms/step)", flush=True)
    out = {"threads": torch.get_num_threads(), "config": str(a.config), "device": a.device, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
