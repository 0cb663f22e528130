"""The number format the model runs in: one rule, used by the env, the vector env, the viewer, the
benchmark, evaluation and the examples.

bf16 only where the hardware runs it natively, else fp32. Emulated bf16 is not a small loss: on a CPU
with AVX2 but no bf16 instructions a bf16 matmul ran at about 2 GFLOP/s against 95 GFLOP/s in fp32,
and on AVX-512 without AVX512_BF16 at 38 against 94 (oneDNN limited to AVX512_CORE on a Zen 4 core).

    >>> from genie_env.precision import resolve_dtype
    >>> resolve_dtype(None, "cpu")      # "bf16" on a CPU with AVX512_BF16 or AMX, else "fp32"
"""

from __future__ import annotations

import argparse
import os

import torch

__all__ = ["DTYPES", "native_bf16", "default_dtype", "resolve_dtype", "autocast_dtype", "describe",
           "add_dtype_options", "dtype_from_options"]

DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp32": None}
"""Name -> the autocast dtype it means (None = no autocast, plain fp32)."""

# oneDNN's ISA names below AVX512_CORE_BF16: a user who caps oneDNN at one of these asked for no bf16
# instructions, and PyTorch's own check still says yes under AVX512_CORE.
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def _onednn_bf16() -> bool:
    """PyTorch's own check that its oneDNN backend does bf16 here (true on any AVX-512 CPU, false when
    ``ONEDNN_MAX_CPU_ISA`` caps it below AVX512_CORE)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _cpu_bf16_instructions() -> bool:
    """AVX512_BF16 or AMX on this CPU (cpuinfo, as PyTorch reads it)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [c for c in checks if c is not None]
    if checks:
        return any(c() for c in checks)
    try:  # an older PyTorch without those helpers: the kernel's flags (Linux)
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` runs bf16 matmuls natively.

    CPU: PyTorch's oneDNN backend has bf16 support, the CPU has AVX512_BF16 or AMX instructions, and
    ``ONEDNN_MAX_CPU_ISA`` (when set) allows them. CUDA: ``torch.cuda.is_bf16_supported()``. Other
    devices: no.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _NO_BF16_ISAS:
        return False
    return _onednn_bf16() and _cpu_bf16_instructions()


def default_dtype(device: str | torch.device = "cpu") -> str:
    """"bf16" where ``device`` runs it natively, else "fp32"."""
    return "bf16" if native_bf16(device) else "fp32"


def resolve_dtype(dtype: str | None, device: str | torch.device = "cpu") -> str:
    """An explicit ``dtype`` ("bf16" or "fp32") as given, checked; None = `default_dtype` of ``device``."""
    if dtype is None:
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None (None = bf16 where the hardware runs "
                         f"it natively, else fp32), got {dtype!r}")
    return dtype


def add_dtype_options(parser: argparse.ArgumentParser) -> None:
    """A command's ``--dtype`` and its older spelling ``--bf16`` / ``--no-bf16``; read them back with
    `dtype_from_options`."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="number format (default: bf16 where the hardware runs it natively, else fp32)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="the same as --dtype bf16 (--no-bf16: --dtype fp32)")


def dtype_from_options(args: argparse.Namespace, device: str | torch.device = "cpu") -> str:
    """The dtype name that `add_dtype_options`' ``--dtype`` / ``--bf16`` ask for on ``device``."""
    dtype = args.dtype
    if dtype is None and args.bf16 is not None:
        dtype = "bf16" if args.bf16 else "fp32"
    return resolve_dtype(dtype, device)


def autocast_dtype(dtype: str) -> torch.dtype | None:
    """The `Genie.autocast_dtype` for a dtype name."""
    return DTYPES[dtype]


def describe(device: str | torch.device, dtype: str) -> str:
    """One line for users: where the model runs and in what format, e.g. "cpu (2 threads), fp32"."""
    device = torch.device(device)
    n = torch.get_num_threads()
    where = f"cpu ({n} thread{'s' if n != 1 else ''})" if device.type == "cpu" else str(device)
    why = ""
    if device.type == "cpu" and not native_bf16(device):
        why = " (no native bf16 on this CPU)" if dtype == "fp32" else " (emulated: this CPU has no native bf16)"
    return f"{where}, {dtype}{why}"
