"""Where and how tensors run: device choice, bf16 support, CPU threads.

All device-specific decisions live here so the rest of the code only sees a
`torch.device` and an autocast context.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from bertforge.errors import BertforgeError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BertforgeError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BertforgeError(f"device {name!r} requested but CUDA is not available")
    return device


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX-512 BF16 or AMX).

    Without them PyTorch emulates bf16 on the CPU, which is slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype to train in, or None for plain fp32."""
    if precision == "fp32":
        return None
    supported = (torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16())
    if precision == "bf16":
        if not supported:
            raise BertforgeError(f"precision 'bf16' is not supported on this {device.type}")
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_threads() -> int:
    """Use every core for intra-op work unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        torch.set_num_threads(cores)
    return torch.get_num_threads()
