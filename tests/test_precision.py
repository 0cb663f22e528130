"""The number-format rule: bf16 only where the hardware runs it natively, else fp32; an explicit dtype wins
everywhere. The hardware check is mocked both ways, so these hold on either class of CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

from genie_env import precision
from genie_env.env import GenieEnv
from genie_env.vector_env import GenieVectorEnv


@pytest.fixture(params=[True, False], ids=["bf16-cpu", "avx2-cpu"])
def cpu_bf16(request, monkeypatch):
    """A CPU whose oneDNN backend and instruction set both say yes (or both no) to bf16."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(precision, "_onednn_bf16", lambda: request.param)
    monkeypatch.setattr(precision, "_cpu_bf16_instructions", lambda: request.param)
    return request.param


def test_rule_picks_bf16_only_where_native(cpu_bf16):
    want = "bf16" if cpu_bf16 else "fp32"
    assert precision.native_bf16("cpu") is cpu_bf16
    assert precision.default_dtype("cpu") == want
    assert precision.resolve_dtype(None, "cpu") == want
    for explicit in ("bf16", "fp32"):
        assert precision.resolve_dtype(explicit, "cpu") == explicit


def test_onednn_without_bf16_instructions_is_fp32(monkeypatch):
    """PyTorch's oneDNN check says yes on any AVX-512 CPU, where bf16 is emulated (and slower than fp32)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(precision, "_onednn_bf16", lambda: True)
    monkeypatch.setattr(precision, "_cpu_bf16_instructions", lambda: False)
    assert precision.default_dtype("cpu") == "fp32"


@pytest.mark.parametrize("isa, want", [("AVX2", "fp32"), ("avx512_core", "fp32"), ("AVX512_CORE_BF16", "bf16"),
                                       ("AVX512_CORE_AMX", "bf16"), ("ALL", "bf16")])
def test_a_capped_onednn_isa_is_respected(monkeypatch, isa, want):
    monkeypatch.setattr(precision, "_onednn_bf16", lambda: True)
    monkeypatch.setattr(precision, "_cpu_bf16_instructions", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert precision.default_dtype("cpu") == want


def test_real_check_under_an_avx2_cap_says_fp32():
    """Unmocked, in a fresh process: capping oneDNN at AVX2 (how this project emulates an AVX2-only CPU)
    gives fp32 on any x86 CPU."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "from genie_env.precision import default_dtype; print(default_dtype('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fp32"


@pytest.mark.parametrize("bf16_ok", [True, False])
def test_cuda_uses_torch_bf16_check(monkeypatch, bf16_ok):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert precision.default_dtype("cuda") == ("bf16" if bf16_ok else "fp32")
    assert precision.default_dtype("mps") == "fp32"


def test_bad_dtype_names_the_argument():
    with pytest.raises(ValueError, match="dtype must be one of"):
        precision.resolve_dtype("fp16", "cpu")


def test_env_and_vector_env_follow_the_rule_and_explicit_dtype_wins(cpu_bf16):
    model = tiny_model()
    rule = torch.bfloat16 if cpu_bf16 else None
    GenieEnv(model=model)
    assert model.autocast_dtype == rule
    GenieVectorEnv(2, model=model)
    assert model.autocast_dtype == rule
    for name, dt in (("fp32", None), ("bf16", torch.bfloat16)):
        GenieEnv(model=model, dtype=name)
        assert model.autocast_dtype == dt
        GenieVectorEnv(2, model=model, dtype=name)
        assert model.autocast_dtype == dt


def test_benchmark_measures_every_figure_in_the_format_it_names(cpu_bf16, tiny_checkpoint, tmp_path, monkeypatch):
    """--dtype reaches every line: the vector envs and the episode too (they once fell back to the default)."""
    from genie_env import benchmark
    from genie_env.models.genie import GenieSession

    for asked, want in (("fp32", None), ("bf16", torch.bfloat16), (None, torch.bfloat16 if cpu_bf16 else None)):
        seen: set = set()
        step = GenieSession.step

        def spy(self, action, step=step, seen=seen):
            seen.add(self.model.autocast_dtype)
            return step(self, action)

        monkeypatch.setattr(GenieSession, "step", spy)
        out = tmp_path / "bench.json"
        args = ["--checkpoint", str(tiny_checkpoint), "--batch-sizes", "2", "--episode-steps", "5", "--reps", "2",
                "--threads", "1", "--json", str(out)] + ([] if asked is None else ["--dtype", asked])
        assert benchmark.main(args) == 0
        assert seen == {want}, (asked, seen)
        assert json.loads(out.read_text())["dtype"] == str(want or torch.float32).replace("torch.", "")
