"""Kill training at random instants and check that nothing is lost.

    python scripts/kill_harness.py --kills 50                 # a few minutes on two CPU cores
    python scripts/kill_harness.py --kills 200 --seed 7 --json kills.json --keep runs/kills

Trains a tiny Genie (all three stages, a checkpoint after every step so that writes are frequent) on
synthetic videos twice: once uninterrupted, and once under SIGKILL at random instants: most while it
trains (a random delay after it wrote a checkpoint, so many land inside the next checkpoint write),
some while it starts up or resumes. After every kill it checks that

* every stage's newest ``checkpoint.pt`` loads with ``torch.load(weights_only=True)``, and its step
  never goes back (a kill never loses a checkpoint that was written);
* every ``release/`` folder loads with ``Genie.from_pretrained``;
* the next ``--resume`` says it resumes from that checkpoint's step;

and at the end that the killed run's ``metrics.csv`` equals the uninterrupted run's row for row (every
column but the two timing ones), that its final weights are bitwise equal, and that no temporary file of
an interrupted write is left behind. Exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokenizer", "lam", "dynamics")
TIMING_COLUMNS = {"frames_per_s", "elapsed_s"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}

# The tiny model of the test suite: a step takes a few tens of milliseconds on one CPU thread.
TINY = dict(
    image_size=16, num_frames=4, tokenizer_vocab_size=32, tokenizer_patch_size=4, tokenizer_channels=8,
    tokenizer_latent_dim=8, action_vocab_size=8, lam_channels=8, lam_latent_dim=8, dynamics_dim=32,
    dynamics_depth=2, dynamics_num_heads=2, context_frames=4, maskgit_steps=2, temperature=1.0,
    batch_size=2, warmup_steps=2, max_steps=10, bf16=False, seed=1,
)


class HarnessError(AssertionError):
    """A check failed: something a kill should never cause happened."""


# ---------------------------------------------------------------------------------------------- inputs
def synthetic_videos(folder: Path, n: int = 4, frames: int = 16, size: int = 16, seed: int = 0) -> Path:
    """A dataset of squares moving left or right (lossless mp4, as `training.record` writes them)."""
    from genie_env.media import write_video

    rng = np.random.default_rng(seed)
    vdir = folder / "videos"
    vdir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x, y = rng.integers(0, size - 4, 2)
        out = []
        for _ in range(frames):
            f = np.full((size, size, 3), 40, np.uint8)
            f[y : y + 4, x : x + 4] = (250, 200, 30)
            out.append(f)
            x = int(np.clip(x + rng.integers(-1, 2) * 2, 0, size - 4))
        write_video(vdir / f"video_{i:03d}.mp4", np.stack(out))
    return folder


def tiny_config(path: Path, steps: dict[str, int]) -> Path:
    import yaml

    cfg = {**TINY, "stages": {
        "tokenizer": {"num_frames": 1, "batch_size": 4, "max_steps": steps["tokenizer"]},
        "lam": {"num_frames": 4, "batch_size": 2, "max_steps": steps["lam"]},
        "dynamics": {"num_frames": 4, "batch_size": 2, "max_steps": steps["dynamics"]},
    }}
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_command(cfg: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.train", "--config", str(cfg), "--data", str(data), "--out", str(out),
            "--no-progress", "--log-every", "1", "--threads", "1", "--checkpoint-every", "1", *extra]


# ---------------------------------------------------------------------------------------------- reading runs
def csv_rows(path: Path) -> list[dict[str, str]]:
    """metrics.csv rows without the timing columns (which differ from run to run)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def checkpoint_stamps(out: Path) -> dict[str, int]:
    """Modification time of each stage's checkpoint.pt: changes whenever one is written."""
    return {s: (out / s / "checkpoint.pt").stat().st_mtime_ns for s in STAGES if (out / s / "checkpoint.pt").is_file()}


def partial_writes(out: Path) -> dict[str, list[str]]:
    """What an interrupted write leaves: checkpoint temp files, release temp folders."""
    found: dict[str, list[str]] = {"checkpoint": [], "release": []}
    for s in STAGES:
        found["checkpoint"] += [str(p) for p in (out / s).glob("checkpoint.pt.tmp*")]
        found["release"] += [str(p) for p in (out / s).glob(".release.tmp-*")]
    return found


def state_equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_run(out: Path, last_steps: dict[str, int]) -> dict[str, object]:
    """The checks after a kill: each checkpoint loads (weights only) and never went back; each release loads.
    Returns the checkpoint steps and whether each release equals its checkpoint (or lags it by a step)."""
    import torch

    from genie_env import Genie

    steps: dict[str, int] = {}
    lagging: list[str] = []
    for s in STAGES:
        ckpt = out / s / "checkpoint.pt"
        if not ckpt.is_file():
            if s in last_steps:
                raise HarnessError(f"{ckpt} disappeared (it was at step {last_steps[s]})")
            continue
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise HarnessError(f"{ckpt} does not load after a kill: {type(e).__name__}: {e}") from e
        steps[s] = int(state["step"])
        if steps[s] < last_steps.get(s, 0):
            raise HarnessError(f"{ckpt} went back from step {last_steps[s]} to {steps[s]}")
        release = out / s / "release"
        if not release.is_dir():
            if steps[s] > 1:  # only the first checkpoint of a stage may be on disk before its release
                raise HarnessError(f"{release} is missing while {ckpt} is at step {steps[s]}")
            lagging.append(s)
            continue
        try:
            model = Genie.from_pretrained(release)
        except Exception as e:
            raise HarnessError(f"{release} does not load after a kill: {type(e).__name__}: {e}") from e
        if not state_equal(model.state_dict(), state["model"]):
            lagging.append(s)
    return {"steps": steps, "release_lagging": lagging}


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Report:
    kills: int = 0
    kills_while_training: int = 0
    kills_during_startup: int = 0
    kills_mid_checkpoint_write: int = 0
    """Kills after which a checkpoint temp file was left: the kill landed inside torch.save / fsync."""
    kills_mid_release_write: int = 0
    """Kills after which a release temp folder was left: the kill landed inside save_pretrained."""
    kills_with_release_lagging: int = 0
    """Kills between a checkpoint write and the release write of the same step."""
    resumes_checked: int = 0
    steps: dict[str, int] = field(default_factory=dict)
    rows_compared: int = 0
    seconds: float = 0.0


def run_uninterrupted(cfg: Path, data: Path, out: Path, timeout: float = 600) -> dict[str, float]:
    """The reference run; returns how long it took to write its first checkpoint and per step after that."""
    t0 = time.time()
    p = subprocess.Popen(train_command(cfg, data, out), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    first = None
    while p.poll() is None:
        if first is None and checkpoint_stamps(out):
            first = time.time() - t0
        if time.time() - t0 > timeout:
            p.kill()
            raise HarnessError(f"the uninterrupted run took longer than {timeout} s")
        time.sleep(0.005)
    log = p.stdout.read()
    if p.returncode != 0:
        raise HarnessError(f"the uninterrupted run failed ({p.returncode}):\n{log}")
    total = time.time() - t0
    steps = sum(len(csv_rows(out / s / "metrics.csv")) for s in STAGES)
    first = first or total
    return {"startup_s": first, "step_s": max(total - first, 1e-3) / max(steps, 1)}


def run_with_kills(cfg: Path, data: Path, out: Path, kills: int, seed: int = 0, startup_s: float = 4.0,
                   step_s: float = 0.05, startup_fraction: float = 0.2, log=print, timeout: float = 300
                   ) -> Report:
    """Launch `--resume` runs into ``out`` and SIGKILL each at a random instant, ``kills`` times, checking
    after every kill; then let the last one finish."""
    rng = random.Random(seed)
    report = Report()
    last_steps: dict[str, int] = {}
    t_start = time.time()
    logs = out.parent / (out.name + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    attempt = 0
    seen: set[str] = set()
    while True:
        attempt += 1
        before = checkpoint_stamps(out)
        expect = next(((s, last_steps[s]) for s in STAGES if s in last_steps and not (out / s / "DONE").is_file()),
                      None)
        log_path = logs / f"run_{attempt:04d}.log"
        with open(log_path, "w") as log_file:
            p = subprocess.Popen(train_command(cfg, data, out, "--resume"), cwd=ROOT, env=ENV, stdout=log_file,
                                 stderr=subprocess.STDOUT)
        try:
            killed, mode = False, None
            if report.kills < kills:
                mode = "startup" if rng.random() < startup_fraction else "training"
                t0 = time.time()
                if mode == "startup":
                    deadline = t0 + rng.uniform(0, startup_s)
                    while p.poll() is None and time.time() < deadline:
                        time.sleep(0.002)
                else:  # wait for this process to write a checkpoint, then a random fraction of a few steps
                    while p.poll() is None and checkpoint_stamps(out) == before:
                        if time.time() - t0 > timeout:
                            raise HarnessError(f"run {attempt} wrote no checkpoint in {timeout} s: see {log_path}")
                        time.sleep(0.001)
                    deadline = time.time() + rng.uniform(0, 3 * step_s)
                    while p.poll() is None and time.time() < deadline:
                        time.sleep(0.0005)
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    killed = True
            p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        text = log_path.read_text()
        if not killed and p.returncode != 0:
            raise HarnessError(f"run {attempt} failed ({p.returncode}) without being killed:\n{text}")
        # the run resumed from the checkpoint the previous kill left, when it got as far as saying so
        if expect is not None and checkpoint_stamps(out).get(expect[0]) != before.get(expect[0]):
            stage, step = expect
            if f"stage {stage}: resuming from {out / stage / 'checkpoint.pt'} at step {step}" not in text:
                raise HarnessError(f"run {attempt} did not resume {stage} from step {step}:\n{text}")
            report.resumes_checked += 1
        if not killed:
            break
        report.kills += 1
        if mode == "startup" and checkpoint_stamps(out) == before:
            report.kills_during_startup += 1
        else:
            report.kills_while_training += 1
        left = {k: set(v) - seen for k, v in partial_writes(out).items()}  # left by this kill
        seen.update(*left.values())
        report.kills_mid_checkpoint_write += bool(left["checkpoint"])
        report.kills_mid_release_write += bool(left["release"])
        state = check_run(out, last_steps)
        last_steps = state["steps"]
        report.kills_with_release_lagging += bool(state["release_lagging"])
        if report.kills % 10 == 0 or report.kills == kills:
            log(f"{report.kills} kills: checkpoints at {last_steps}, {time.time() - t_start:.0f} s")
    report.steps = last_steps
    report.seconds = time.time() - t_start
    return report


def compare_runs(reference: Path, killed: Path, stages=STAGES) -> int:
    """The killed run ended exactly where the uninterrupted one did. Returns the number of rows compared."""
    import torch

    from genie_env import Genie

    rows = 0
    for s in stages:
        if not (killed / s / "DONE").is_file():
            raise HarnessError(f"stage {s} of the killed run did not finish")
        ref, got = csv_rows(reference / s / "metrics.csv"), csv_rows(killed / s / "metrics.csv")
        if got != ref:
            steps = lambda rows: [r["step"] for r in rows]  # noqa: E731
            bad = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
            raise HarnessError(f"{killed / s / 'metrics.csv'} differs from the uninterrupted run's at row {bad + 1}: "
                               f"steps {steps(got)[:bad + 3]} vs {steps(ref)[:bad + 3]}; "
                               f"{got[bad] if bad < len(got) else None} vs {ref[bad] if bad < len(ref) else None}")
        rows += len(got)
        a = torch.load(reference / s / "checkpoint.pt", map_location="cpu", weights_only=True)
        b = torch.load(killed / s / "checkpoint.pt", map_location="cpu", weights_only=True)
        if a["step"] != b["step"] or not state_equal(a["model"], b["model"]):
            raise HarnessError(f"stage {s}: the final weights differ from the uninterrupted run's")
        if not state_equal(Genie.from_pretrained(killed / s / "release").state_dict(), b["model"]):
            raise HarnessError(f"stage {s}: the finished release does not hold the final weights")
    left = partial_writes(killed)
    if left["checkpoint"] or left["release"]:
        raise HarnessError(f"temporary files of interrupted writes were left behind: {left}")
    return rows


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=50, help="SIGKILLs to send")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill instants")
    p.add_argument("--steps", type=int, default=0,
                   help="training steps per stage (default: enough that the kills land before the end)")
    p.add_argument("--startup-fraction", type=float, default=0.2,
                   help="share of kills at a random instant of start-up / resuming rather than of training")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder (default: a temp folder)")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kill-harness-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    per_stage = args.steps or max(6, math.ceil(args.kills * 2.5 / len(STAGES)))
    try:
        data = synthetic_videos(work / "data")
        shutil.copytree(data / "videos", work / "data-killed" / "videos")  # its frame cache is built under kills
        cfg = tiny_config(work / "config.yaml", dict.fromkeys(STAGES, per_stage))
        print(f"uninterrupted run: 3 stages x {per_stage} steps in {work / 'reference'}")
        timing = run_uninterrupted(cfg, data, work / "reference")
        print(f"  start-up {timing['startup_s']:.1f} s, {timing['step_s'] * 1000:.0f} ms per step")
        print(f"run under {args.kills} kills in {work / 'killed'}")
        report = run_with_kills(cfg, work / "data-killed", work / "killed", args.kills, seed=args.seed,
                                startup_s=timing["startup_s"], step_s=timing["step_s"],
                                startup_fraction=args.startup_fraction)
        report.rows_compared = compare_runs(work / "reference", work / "killed")
    except HarnessError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        print(f"runs kept in {work}", file=sys.stderr)
        return 1
    summary = asdict(report)
    print(json.dumps(summary, indent=2))
    print(f"survived {report.kills} SIGKILLs ({report.kills_mid_checkpoint_write} inside a checkpoint write, "
          f"{report.kills_mid_release_write} inside a release write, {report.kills_during_startup} during start-up); "
          f"{report.resumes_checked} resumes checked; metrics.csv equal to the uninterrupted run's on all "
          f"{report.rows_compared} rows, final weights bitwise equal")
    if args.json:
        args.json.write_text(json.dumps({**summary, "steps_per_stage": per_stage, "seed": args.seed}, indent=2))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
