"""How fast the world model steps on this machine.

    python -m genie_env.benchmark                       # the shipped model, default sampling settings
    python -m genie_env.benchmark --checkpoint DIR --maskgit-steps 4 --json bench.json
    python -m genie_env.benchmark --device cuda --batch-sizes 32,256,1024,4096 --episode-steps 200

Measures, with the prompt already encoded: per-step latency at batch 1 (MaskGIT sampling + decoding the
new frame) and its split between the dynamics (per MaskGIT step) and the decoder; steps per second of
the vector environment at 1 / 8 / 32 / 128 envs; the cost of a step at step 10 vs step 1000 of one
episode; resident memory over a long episode; and the achieved GFLOP/s against this machine's matmul
peak measured in the same run. Every figure is measured in the one number format it prints (--dtype;
default: bf16 where the hardware runs it natively, else fp32). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genie_env import Genie
from genie_env.precision import DTYPES, autocast_dtype, native_bf16, resolve_dtype


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; falls back to peak RSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work: GPU calls return before their kernels finish."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, n: int | None = None, seconds: float = 1.0, device: str | torch.device = "cpu"
                ) -> float:
    """GFLOP/s of square matmuls in this dtype (n: 1024 on a CPU, 8192 on a GPU, which small ones leave idle)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if reps % 10 == 0:
            sync(device)
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def _timeit(fn, reps: int, device: torch.device | str = "cpu") -> float:
    """Median seconds of fn() over reps runs (after one warm-up), its device work included."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_flops(model: Genie, steps: int) -> float:
    """FLOPs of one environment step at batch 1 (counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = model.device
    prompt = torch.rand(1, 3, model.config.image_size, model.config.image_size, device=dev)
    s = model.start(prompt, generator=torch.Generator(device=dev).manual_seed(0), maskgit_steps=steps)
    with FlopCounterMode(display=False) as fc:
        s.step(torch.zeros(1, dtype=torch.long, device=dev))
    return float(fc.get_total_flops())


@torch.inference_mode()
def run(model: Genie, steps: int, temperature: float | None, batch_sizes: list[int], episode_steps: int,
        reps: int = 20, log=print) -> dict:
    """Measure ``model`` in its ``autocast_dtype`` (every part: the vector envs are told the same)."""
    cfg = model.config
    size = cfg.image_size
    dtype = next(name for name, dt in DTYPES.items() if dt == model.autocast_dtype)
    dev = model.device
    res: dict = {
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_name(),
        "native_bf16": native_bf16(model.device),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(model.autocast_dtype or torch.float32).replace("torch.", ""),
        "maskgit_steps": steps,
        "temperature": cfg.temperature if temperature is None else temperature,
        "tokens_per_frame": cfg.tokens_per_frame,
        "parameters": model.num_parameters(),
    }
    log("measuring matmul peak ...")
    res["matmul_peak_gflops"] = {"fp32": matmul_peak(torch.float32, device=dev),
                                 "bf16": matmul_peak(torch.bfloat16, device=dev)}

    gen = torch.Generator(device=dev).manual_seed(0)
    prompt = torch.rand(1, 3, size, size, generator=gen, device=dev)
    session = model.start(prompt, generator=gen, maskgit_steps=steps, temperature=temperature)
    a = torch.zeros(1, dtype=torch.long, device=dev)
    for _ in range(cfg.context_frames):  # fill the cache: steady state
        session.step(a)
    log("measuring batch-1 latency ...")
    res["step_ms_batch1"] = 1000 * _timeit(lambda: session.step(a), reps, dev)
    dyn = model.dynamics
    toks = torch.full((1, cfg.tokens_per_frame), dyn.mask_id, device=dev)

    def one_dynamics_pass():
        with model._autocast():
            dyn.step(session.cache, toks, a)

    def decode():
        with model._autocast():
            model.tokenizer.decode(session.last_tokens.view(1, 1, cfg.token_grid, cfg.token_grid))

    res["dynamics_pass_ms"] = 1000 * _timeit(one_dynamics_pass, reps, dev)
    res["decode_ms"] = 1000 * _timeit(decode, reps, dev)
    res["env_steps_per_s_batch1"] = 1000 / res["step_ms_batch1"]
    flops = step_flops(model, steps)
    res["gflop_per_step"] = flops / 1e9
    res["achieved_gflops_batch1"] = flops / 1e9 / (res["step_ms_batch1"] / 1000)

    log("measuring the vector environment ...")
    res["vector_env_steps_per_s"] = {}
    res["vector_env_achieved_gflops"] = {}
    from genie_env.vector_env import GenieVectorEnv

    for n in batch_sizes:
        env = GenieVectorEnv(num_envs=n, model=model, dtype=dtype, maskgit_steps=steps, temperature=temperature)
        # A training release has no prompt bank: start from random frames (the cost does not depend on them).
        start = None if env.prompt_bank is not None else {
            "prompt": np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)}
        env.reset(seed=0, options=start)
        acts = env.action_space.sample()
        env.step(acts)
        k = max(2, min(reps, 200 // n))
        t = _timeit(lambda env=env, acts=acts: env.step(acts), k)
        res["vector_env_steps_per_s"][str(n)] = n / t
        res["vector_env_achieved_gflops"][str(n)] = n * flops / 1e9 / t
        env.close()
        log(f"  {n} envs: {n / t:.1f} steps/s")

    log(f"running one {episode_steps}-step episode ...")
    session = model.start(prompt, generator=gen, maskgit_steps=steps, temperature=temperature)
    per_step, mem = [], []
    for i in range(1, episode_steps + 1):
        t0 = time.perf_counter()
        session.step(a)
        sync(dev)
        per_step.append(time.perf_counter() - t0)
        if i % max(1, episode_steps // 20) == 0 or i == 1:
            mem.append((i, rss_mb()))
    # step 10 vs the end of the episode, measured by alternating a step of a fresh session with a step
    # of the long one, so that both see the same machine (on a shared CPU the speed of the whole
    # machine drifts by tens of percent over minutes, which timing them minutes apart would report)
    fresh = model.start(prompt, generator=gen, maskgit_steps=steps, temperature=temperature)
    for _ in range(9):
        fresh.step(a)
    at_10, at_end = [], []
    for _ in range(reps):
        for sess, out in ((fresh, at_10), (session, at_end)):
            t0 = time.perf_counter()
            sess.step(a)
            sync(dev)
            out.append(time.perf_counter() - t0)
    res["step_ms_at_10"] = 1000 * statistics.median(at_10)
    res["step_ms_at_end"] = 1000 * statistics.median(at_end)
    res["step_ms_ratio_end_vs_10"] = res["step_ms_at_end"] / res["step_ms_at_10"]
    res["step_ms_episode_median"] = 1000 * statistics.median(per_step)
    res["episode_steps"] = episode_steps
    res["rss_mb_curve"] = mem
    res["rss_mb_start"], res["rss_mb_end"] = mem[0][1], mem[-1][1]
    res["peak_rss_mb"] = max(m for _, m in mem)
    assert model.autocast_dtype == DTYPES[dtype], "the number format changed during the benchmark"
    if dev.type == "cuda":
        res["gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return res


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(res: dict) -> None:
    peak = res["matmul_peak_gflops"]["bf16" if res["dtype"] == "bfloat16" else "fp32"]
    rows = [
        ("machine / device / threads / dtype",
         f"{res['machine']} / {res.get('device', 'cpu')} / {res['threads']} / {res['dtype']}"),
        ("cpu, native bf16", f"{res['cpu']}, {'yes' if res['native_bf16'] else 'no'}"),
        ("MaskGIT steps, temperature", f"{res['maskgit_steps']}, {res['temperature']}"),
        ("matmul peak fp32 / bf16", f"{res['matmul_peak_gflops']['fp32']:.3g} / "
                                    f"{res['matmul_peak_gflops']['bf16']:.3g} GFLOP/s"),
        ("step at batch 1", f"{res['step_ms_batch1']:.1f} ms ({res['env_steps_per_s_batch1']:.1f} steps/s)"),
        ("  one dynamics pass", f"{res['dynamics_pass_ms']:.2f} ms"),
        ("  decode new frame", f"{res['decode_ms']:.2f} ms"),
        ("GFLOP per step / achieved", f"{res['gflop_per_step']:.2f} / {res['achieved_gflops_batch1']:.0f} GFLOP/s"),
    ]
    for n, v in res["vector_env_steps_per_s"].items():
        g = res["vector_env_achieved_gflops"][n]
        rows.append((f"vector env, {n} envs", f"{v:.1f} steps/s ({g:.0f} GFLOP/s, {100 * g / peak:.0f}% of "
                                              f"{res['dtype']} peak)"))
    rows.append((f"step at 10 / at {res['episode_steps']}",
                 f"{res['step_ms_at_10']:.1f} / {res['step_ms_at_end']:.1f} ms (x"
                 f"{res['step_ms_ratio_end_vs_10']:.2f}, interleaved)"))
    rows.append((f"RSS over {res['episode_steps']} steps", f"{res['rss_mb_start']:.0f} -> {res['rss_mb_end']:.0f} MB "
                                                          f"(peak {res['peak_rss_mb']:.0f})"))
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m genie_env.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="folder or hub repo id (default: the shipped model)")
    p.add_argument("--maskgit-steps", type=int, default=None, help="default: the model's setting")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="number format of every figure (default: bf16 where the hardware runs it natively, else fp32)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--batch-sizes", default="1,8,32,128")
    p.add_argument("--episode-steps", type=int, default=10000)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", type=Path, default=Path("benchmark.json"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    model = Genie.from_pretrained(a.checkpoint, device=device)
    model.autocast_dtype = autocast_dtype(resolve_dtype(a.dtype, model.device))
    steps = a.maskgit_steps or model.config.maskgit_steps
    res = run(model, steps, a.temperature, [int(x) for x in a.batch_sizes.split(",")], a.episode_steps, a.reps,
              log=lambda m: print(m, file=sys.stderr))
    res["checkpoint"] = str(a.checkpoint or "shipped default")
    res["omp_num_threads_env"] = os.environ.get("OMP_NUM_THREADS")
    print_table(res)
    a.json.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
