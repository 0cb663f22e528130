"""scripts/gpu_check.py, the GPU measurement run, smoke-run on the CPU with a tiny model and data: every
phase that can run without CUDA runs and writes its figures (none of them is asserted: they are this
machine's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def gpu_check(*args, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_run_writes_every_phase(tmp_path):
    r = gpu_check("--device", "cpu", "--tiny", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    ph = res["phases"]
    assert ph["info"]["device"] == "cpu" and ph["matmul"]["bf16_tflops"] > 0
    for n in ("2", "4"):
        row = ph["vector_env"]["sizes"][n]
        assert row["env"]["env_steps_per_s"] > 0 and row["device_step_eager"]["env_steps_per_s"] > 0, row
    rows = ph["train_throughput"]["rows"]
    assert {(x["stage"], x["input"]) for x in rows} >= {("tokenizer", "frames"), ("lam", "frames"),
                                                        ("dynamics", "frames"), ("dynamics", "tokens")}
    assert all("error" not in x for x in rows), rows
    assert ph["train"]["returncode"] == 0 and ph["train"]["steps"] >= 1, ph["train"]
    assert (tmp_path / "metrics.csv").is_file()
    from safetensors.torch import load_file

    dyn = load_file(str(tmp_path / "dynamics_bf16.safetensors"))
    assert dyn and all(k.startswith("dynamics.") for k in dyn)
    assert {v.dtype for v in dyn.values() if v.is_floating_point()} == {torch.bfloat16}
    assert set(ph["quality"]) >= {"shipped", "trained"}
    assert "error" not in json.dumps(ph), ph


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = gpu_check("--out", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr
