"""Training throughput of each stage on this machine, bf16 autocast vs fp32.

    python -m training.throughput --config configs/coinrun-cpu.yaml --steps 10 --json throughput.json

Random frames of the configured size and each stage's batch settings; reports frames per second of
training (forward, backward and optimiser step), the median over ``--steps`` after two warm-up steps.
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


def measure(stage: str, config_path: Path, bf16: bool, steps: int) -> dict:
    config, stage_ov = load_run_config(config_path, [])
    cfg, extra = stage_config(config, stage_ov.get(stage, {}))
    torch.manual_seed(0)
    module = StageModule(Genie(config).train(), stage, cfg, extra["cotrain_lam"])
    params = module.trained_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.rand(cfg.batch_size, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    frames = cfg.batch_size * cfg.num_frames
    return {"stage": stage, "dtype": "bf16" if bf16 else "fp32", "batch": cfg.batch_size, "clip_frames": cfg.num_frames,
            "step_s": sec, "frames_per_s": frames / sec,
            "cotrain_lam": extra["cotrain_lam"] if stage == "dynamics" else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/coinrun-cpu.yaml"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for stage in a.stages.split(","):
        for bf16 in (True, False):
            r = measure(stage, a.config, bf16, a.steps)
            rows.append(r)
            print(f"{stage:<10} {r['dtype']:<5} batch {r['batch']} x {r['clip_frames']} frames: "
                  f"{r['frames_per_s']:7.1f} frames/s ({r['step_s'] * 1000:.0f} ms/step)", flush=True)
    out = {"threads": torch.get_num_threads(), "config": str(a.config), "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
