"""GPU check, in one run of under 10 minutes: what this model does on a GPU (issue 17, parts 2 and 4).

How to carry gymnasium and the tokens files to a machine without them: docs/experiments.md, "GPU check".

    PYTHONPATH=. python3 scripts/gpu_check.py --tokens gpu-data/train.tokens.safetensors \\
        --val-tokens gpu-data/val.tokens.safetensors --out $OUT --minutes 3
    python scripts/gpu_check.py --device cpu --tiny --out /tmp/gpu-check      # the CPU-runnable parts, tiny

Phases, each timed and written to OUT/gpu_check.json as soon as it ends (a phase that fails records its
error and the run goes on; one that would overrun ``--budget-s`` is skipped):

1. ``info``: the GPU, its memory, torch and CUDA versions;
2. ``matmul``: bf16 and fp32 matmul peak (8192^3 on a GPU);
3. ``tests``: ``pytest tests/test_devices.py -k cuda`` (every path on the GPU), unless ``--no-tests``;
4. ``vector_env``: env steps/s of the shipped model at ``--envs`` (32, 256, 1024, 4096): the vector env as
   shipped (observations copied to the host every step), its device step alone (eager, no host copy),
   the same step captured once in a CUDA graph and replayed (static shapes, preallocated cache; with and
   without the uint8 host copy), and ``torch.compile(mode="reduce-overhead")`` of that step at
   ``--compile-envs``;
5. ``train_throughput``: frames/s of each training stage at the CPU batch sizes and larger ones, bf16, the
   dynamics fed frames (tokenizer + latent action pass) and fed tokens (a pre-tokenised file);
6. ``train``: the dynamics stage from random weights (tokenizer and latent action model from the shipped
   release), trained from ``--tokens`` for ``--minutes`` at ``--batch``, LR schedule sized to the
   measured speed; OUT gets its metrics.csv and its dynamics weights in bf16 (under the 16 MiB a file
   that comes back from the device machine may have);
7. ``quality``: masked-token cross-entropy and accuracy on ``--val-tokens`` (held-out levels) of the
   trained dynamics and of the shipped one, same clips and masks.

``--tiny`` replaces the shipped model and the data with a tiny random model and random frames made in a
temp folder, and shrinks every size: a smoke run of the script on a CPU (its test does that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    image_size=16, num_frames=4, tokenizer_vocab_size=32, tokenizer_patch_size=4, tokenizer_channels=8,
    tokenizer_latent_dim=8, action_vocab_size=8, lam_channels=8, lam_latent_dim=8, dynamics_dim=32,
    dynamics_depth=2, dynamics_num_heads=2, context_frames=4, maskgit_steps=2, temperature=1.0,
)


class Report:
    """The JSON of figures, rewritten after every phase so a run cut short keeps what it measured."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.t0 = time.time()
        self.budget_s = budget_s
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": {}}

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def phase(self, name: str, need_s: float, fn):
        if self.left() < need_s:
            self.data["phases"][name] = {"skipped": f"{self.left():.0f} s left of the budget, needs ~{need_s:.0f}"}
            print(f"[{name}] skipped: {self.data['phases'][name]['skipped']}", flush=True)
            self.save()
            return None
        print(f"[{name}] ...", flush=True)
        t = time.time()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - one failed phase must not lose the others' figures
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(f"[{name}] failed: {res['error']}", flush=True)
        res = dict(res or {})
        res["seconds"] = round(time.time() - t, 1)
        self.data["phases"][name] = res
        self.save()
        print(f"[{name}] {json.dumps(res, default=str)[:1500]}", flush=True)
        return res

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.out / "gpu_check.json.part"
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, n_envs: int, device: torch.device, min_s: float = 1.0, min_reps: int = 3) -> dict:
    """Env steps per second of fn() (one step of n_envs envs), after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_s:
        fn()
        reps += 1
        if device.type == "cuda" and reps % 8 == 0:
            sync(device)
    sync(device)
    dt = time.perf_counter() - t0
    return {"env_steps_per_s": n_envs * reps / dt, "ms_per_step": 1000 * dt / reps, "reps": reps}


# ---------------------------------------------------------------------------------------------- phases
def info(device: torch.device) -> dict:
    res = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        res.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    return res


def matmul(device: torch.device, tiny: bool) -> dict:
    from genie_env.benchmark import matmul_peak

    n = 256 if tiny else None
    return {"bf16_tflops": matmul_peak(torch.bfloat16, n=n, device=device) / 1000,
            "fp32_tflops": matmul_peak(torch.float32, n=n, device=device) / 1000}


def run_tests(timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "tests/test_devices.py", "-q", "-p", "no:cacheprovider", "-k", "cuda"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy"})
        return {"returncode": r.returncode, "summary": (r.stdout + r.stderr).strip().splitlines()[-1:],
                "tail": (r.stdout + r.stderr)[-4000:]}
    except subprocess.TimeoutExpired as e:
        return {"returncode": None, "timeout_s": timeout, "tail": str(e.stdout or "")[-2000:]}


def device_step(model, cache, action: torch.Tensor, steps: int):
    """One step of every env on the device, no host sync, no validation: MaskGIT sampling, writing the
    new frame to the cache, decoding it. Draws from the device's default generator (a CUDA graph can
    replay those). Returns frames (B, 3, H, W)."""
    cfg = model.config
    dyn = model.dynamics
    # autocast's cache of cast weights cannot live across a CUDA graph's capture: cast inside the step
    dt = model.autocast_dtype
    with torch.autocast(model.device.type, dtype=dt or torch.bfloat16, enabled=dt is not None, cache_enabled=False):
        tokens = dyn.sample_frame(cache, action, steps, cfg.temperature, cfg.top_k, cfg.maskgit_schedule, None)
        dyn.step(cache, tokens, action, commit=True)
        g = cfg.token_grid
        return model.tokenizer.decode(tokens.view(-1, 1, g, g))[:, :, 0].float()


def to_host_images(frames: torch.Tensor, host: torch.Tensor) -> None:
    """(B, 3, H, W) floats -> the pinned (B, H, W, 3) uint8 host buffer (one copy, as the env does)."""
    host.copy_((frames.clamp(0, 1) * 255).round_().to(torch.uint8).permute(0, 2, 3, 1), non_blocking=True)


@torch.inference_mode()
def vector_env(weights: Path, device: torch.device, envs: list[int], compile_envs: list[int], report: Report,
               min_s: float) -> dict:
    from genie_env import Genie
    from genie_env.vector_env import GenieVectorEnv

    model = Genie.from_pretrained(weights, device=device).eval()
    model.autocast_dtype = torch.bfloat16  # as the env picks where the device supports it

    steps = model.config.maskgit_steps
    size = model.config.image_size
    res: dict = {"maskgit_steps": steps, "dtype": str(model.autocast_dtype), "sizes": {}}
    for n in envs:
        row: dict = {}
        res["sizes"][str(n)] = row
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            env = GenieVectorEnv(num_envs=n, model=model)
            start = None if env.prompt_bank is not None else {
                "prompt": np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)}
            env.reset(seed=0, options=start)
            acts = np.random.default_rng(0).integers(0, env.single_action_space.n, n)
            row["env"] = rate(lambda env=env, acts=acts: env.step(acts), n, device, min_s)
            session = env.session
            action = torch.from_numpy(acts).to(device)
            row["device_step_eager"] = rate(lambda s=session, act=action: device_step(model, s.cache, act, steps),
                                            n, device, min_s)
            host = torch.empty(n, size, size, 3, dtype=torch.uint8, pin_memory=device.type == "cuda")
            if device.type == "cuda":
                row["cuda_graph"] = cuda_graph(model, session.cache, action, steps, host, n, device, min_s)
                if n in compile_envs and report.left() > 150:
                    row["compile_reduce_overhead"] = compiled(model, session.cache, action, steps, n, device, min_s)
            if device.type == "cuda":
                row["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            env.close()
            env = session = None
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest size: keep the others
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
        print(f"  {n} envs: {json.dumps(row, default=str)[:600]}", flush=True)
        report.save()
        if report.left() < 120:
            res["stopped_early"] = f"budget: {report.left():.0f} s left"
            break
    return res


def cuda_graph(model, cache, action, steps, host, n, device, min_s) -> dict:
    """The device step captured in one CUDA graph (static shapes: the cache, the action and the frame live
    at fixed addresses), replayed; with and without the uint8 copy to the host."""
    out: dict = {}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                device_step(model, cache, action, steps)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            frame = device_step(model, cache, action, steps)
        out["replay"] = rate(graph.replay, n, device, min_s)

        def with_copy():
            graph.replay()
            to_host_images(frame, host)
            torch.cuda.current_stream().synchronize()  # the host needs the observations now

        out["replay_with_host_copy"] = rate(with_copy, n, device, min_s)
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    return out


def compiled(model, cache, action, steps, n, device, min_s) -> dict:
    out: dict = {}
    try:
        fn = torch.compile(lambda: device_step(model, cache, action, steps), mode="reduce-overhead")
        t = time.time()
        fn()
        fn()
        sync(device)
        out["compile_s"] = round(time.time() - t, 1)
        out.update(rate(fn, n, device, min_s))
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    return out


def train_throughput(config: Path, device: torch.device, tiny: bool) -> dict:
    from training.throughput import measure

    plan = ([("tokenizer", False, 4), ("lam", False, 2), ("dynamics", False, 2), ("dynamics", True, 2),
             ("dynamics", True, 8)] if tiny else
            [("tokenizer", False, 32), ("tokenizer", False, 256), ("lam", False, 8), ("lam", False, 64),
             ("dynamics", False, 8), ("dynamics", False, 64), ("dynamics", True, 8), ("dynamics", True, 64),
             ("dynamics", True, 256)])
    rows = []
    for stage, tokens, bs in plan:
        try:
            r = measure(stage, config, True, 3 if tiny else 8, str(device), tokens, [f"stages.{stage}.batch_size={bs}"])
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch
            r = {"stage": stage, "input": "tokens" if tokens else "frames", "batch": bs,
                 "error": f"{type(e).__name__}: {e}"[:500]}
        rows.append(r)
        print(f"  {stage} {r.get('input')} batch {bs}: {r.get('frames_per_s', r.get('error'))}", flush=True)
    return {"rows": rows}


def train(config: Path, weights: Path, tokens: Path, out: Path, run_dir: Path, device: torch.device,
          minutes: float, batch: int, lr: float, fps: float | None, tiny: bool) -> dict:
    """The dynamics stage from random weights for a fixed time; its schedule sized to the measured speed."""
    clip = 8 if not tiny else 4
    steps_per_s = (fps / (batch * clip)) if fps else 1.0
    max_steps = max(10, int(minutes * 60 * steps_per_s * 0.9))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "training.train", "--config", str(config), "--data", str(tokens), "--out",
           str(run_dir), "--stage", "dynamics", "--init-part", f"tokenizer={weights}",
           "--init-part", f"latent_actions={weights}", "--device", str(device), "--no-progress",
           "--val-every", "0", "--log-every", "2" if tiny else "50", "--checkpoint-minutes", "1000",
           "--checkpoint-every", "100000000", f"stages.dynamics.batch_size={batch}",
           f"stages.dynamics.max_steps={max_steps}", "stages.dynamics.cotrain_lam=false",
           f"stages.dynamics.learning_rate={lr}", f"stages.dynamics.warmup_steps={max(2, min(300, max_steps // 20))}"]
    if tiny:
        cmd += ["--threads", "1"]
    log = open(out / "train.log", "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=minutes * 60)
        stopped = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the trainer saves its checkpoint and release, then exits
        stopped = True
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()
    res = {"returncode": proc.returncode, "stopped_by_time": stopped, "wall_s": round(time.time() - t0, 1),
           "batch": batch, "clip_frames": clip, "lr": lr, "max_steps": max_steps, "minutes": minutes,
           "log_tail": (out / "train.log").read_text()[-1500:]}
    sdir = run_dir / "dynamics"
    if (sdir / "metrics.csv").is_file():
        shutil.copy(sdir / "metrics.csv", out / "metrics.csv")
        import csv

        rows = list(csv.DictReader(open(sdir / "metrics.csv")))
        if rows:
            res["steps"] = int(rows[-1]["step"])
            res["final_loss"] = float(rows[-1]["loss"])
            res["frames_per_s_last"] = float(rows[-1]["frames_per_s"])
            res["train_frames"] = res["steps"] * batch * clip
    release = sdir / "release"
    if (release / "model.safetensors").is_file():
        from safetensors.torch import load_file, save_file

        state = load_file(str(release / "model.safetensors"))
        dyn = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()
               if k.startswith("dynamics.")}
        save_file(dyn, str(out / "dynamics_bf16.safetensors"))
        res["release"] = str(release)
    return res


@torch.inference_mode()
def quality(weights: Path, release: Path | None, val_tokens: Path, device: torch.device, tiny: bool) -> dict:
    """Masked-token cross-entropy / accuracy on held-out tokens: the trained dynamics vs the shipped one."""
    from genie_env import Genie
    from training.pretokenized import TokenClipSampler, TokenFile, to_batch

    tf = TokenFile(val_tokens)
    res: dict = {"val_frames": tf.total_frames}
    models = {"shipped": weights} | ({"trained": release} if release else {})
    clip = 4 if tiny else 8
    for name, path in models.items():
        model = Genie.from_pretrained(path, device=device).eval()
        model.config.mask_rate_min = 0.5  # the same masks for both: the paper's U(0.5, 1)
        model.config.mask_rate_max = 1.0
        sampler = TokenClipSampler(tf, clip, seed=123)
        torch.manual_seed(0)
        ces, accs = [], []
        for _ in range(4 if tiny else 32):
            b = to_batch(sampler.sample(8 if tiny else 64), device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                ce, m = model.dynamics.loss(b["tokens"], b["actions"])
            ces.append(float(ce))
            accs.append(float(m["dyn_acc"]))
        res[name] = {"val_dyn_ce": float(np.mean(ces)), "val_dyn_acc": float(np.mean(accs))}
    return res


# ---------------------------------------------------------------------------------------------- tiny data
def make_tiny(folder: Path) -> tuple[Path, Path, Path, Path]:
    """A tiny random release, its config YAML, and tokens files of random frames made with it."""
    import yaml

    from genie_env import Genie, GenieConfig
    from training.pretokenized import ArraySource, write_tokens_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Genie(GenieConfig(**TINY, bf16=True)).eval()
    weights = folder / "release"
    model.save_pretrained(weights)
    rng = np.random.default_rng(0)
    rel = {"dynamics": {"num_frames": 4, "batch_size": 2}, "tokenizer": {"num_frames": 1, "batch_size": 4},
           "lam": {"num_frames": 4, "batch_size": 2}}
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "bf16": True, "stages": rel}))
    files = []
    for name, n in (("train", 6), ("val", 3)):
        src = ArraySource([rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8) for _ in range(n)], folder)
        files.append(write_tokens_file(model, src, folder / f"{name}.tokens.safetensors", source=str(weights)))
    return weights, config, files[0], files[1]


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=Path, default=None, help="pre-tokenised training file (training.pretokenize)")
    p.add_argument("--val-tokens", type=Path, default=None, help="pre-tokenised held-out file, for quality")
    p.add_argument("--weights", type=Path, default=ROOT / "weights", help="the release the tokens were made with")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "coinrun-cpu.yaml")
    p.add_argument("--envs", default="32,256,1024,4096")
    p.add_argument("--compile-envs", default="1024", help="sizes to also try torch.compile at ('' = none)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time of the dynamics stage")
    p.add_argument("--batch", type=int, default=64, help="dynamics training batch (clips of 8 frames)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--budget-s", type=float, default=540, help="stop starting phases past this")
    p.add_argument("--tests", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tiny", action="store_true", help="a tiny random model and data: a smoke run on any device")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device: run on a GPU machine, or pass --device cpu --tiny")
    a.out.mkdir(parents=True, exist_ok=True)
    report = Report(a.out, a.budget_s)
    report.data["args"] = {k: str(v) for k, v in vars(a).items()}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if a.tiny:
        weights, config, tokens, val_tokens = make_tiny(tmp / "tiny")
        envs, compile_envs, minutes, batch, min_s = [2, 4], [], min(a.minutes, 0.5), 2, 0.2
    else:
        if a.tokens is None:
            p.error("--tokens FILE is needed (python -m training.pretokenize --checkpoint weights ...), or --tiny")
        weights, config, tokens, val_tokens = a.weights, a.config, a.tokens, a.val_tokens
        envs = [int(x) for x in a.envs.split(",") if x]
        compile_envs = [int(x) for x in a.compile_envs.split(",") if x]
        minutes, batch, min_s = a.minutes, a.batch, 1.5

    report.phase("info", 0, lambda: info(device))
    report.phase("matmul", 10, lambda: matmul(device, a.tiny))
    if a.tests and device.type == "cuda":
        report.phase("tests", 60 + 60 * minutes, lambda: run_tests(timeout=int(min(150, report.left() - 60 * minutes))))

    report.phase("vector_env", 60, lambda: vector_env(weights, device, envs, compile_envs, report, min_s))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    thr = report.phase("train_throughput", 40 + 60 * minutes, lambda: train_throughput(config, device, a.tiny))
    fps = None
    for r in (thr or {}).get("rows", []):
        if r.get("input") == "tokens" and r.get("batch") == batch and "frames_per_s" in r:
            fps = r["frames_per_s"]
    minutes = min(minutes, max(0.2, (report.left() - 60) / 60))
    tr = report.phase("train", 30 + 60 * minutes, lambda: train(config, weights, tokens, a.out, tmp / "run", device,
                                                                 minutes, batch, a.lr, fps, a.tiny))
    if val_tokens is not None:
        release = Path(tr["release"]) if tr and tr.get("release") else None
        report.phase("quality", 15, lambda: quality(weights, release, val_tokens, device, a.tiny))
    report.save()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {a.out / 'gpu_check.json'} ({report.data['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
