"""Where and how tensors run: device choice, bf16 support, the process set-up per device.

The decisions that depend on the device live here (and the per-device kernels in
bertforge.model.ops), so the rest of the code only sees a `torch.device`, an autocast
context and `configure(device)`. A CPU run never creates a CUDA context: nothing here
touches CUDA unless the device is CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

from bertforge.errors import BertforgeError

KEEP_FREED_MEMORY = "BERTFORGE_KEEP_FREED_MEMORY"  # "0": leave glibc's malloc as it is


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
    # On CUDA, only native bf16 (Ampere and newer): emulated bf16 is slower than fp32.
    supported = (
        torch.cuda.is_bf16_supported(including_emulation=False)
        if device.type == "cuda"
        else cpu_has_bf16()
    )
    if precision == "bf16":
        if not supported:
            raise BertforgeError(f"precision 'bf16' is not supported on this {device.type}")
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast_off(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """Autocast disabled within an `autocast` block, which keeps the block's cast cache
    (autocast clears it only when its outermost block ends)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def configure(device: torch.device) -> str:
    """Set up this process to compute on `device`; returns a short description of it.

    CPU: every core does intra-op work unless the user set OMP_NUM_THREADS, and freed
    memory stays with the process (`keep_freed_memory`). CUDA: nothing to tune; the
    caching allocator already keeps freed memory. Either way the glibc and thread
    settings are CPU tuning, never applied to a GPU run.
    """
    if device.type == "cpu":
        keep_freed_memory()
        threads = configure_threads()
        return f"cpu, {threads} thread{'' if threads == 1 else 's'}"
    if device.type == "cuda":
        return f"{device}, {torch.cuda.get_device_name(device)}"
    return str(device)


def defer_host_reads(device: torch.device) -> bool:
    """Whether the training loop reads a step's figures only when it needs them (a GPU,
    which would otherwise drain every step) rather than every step (the CPU, where a
    read costs nothing)."""
    return device.type == "cuda"


def training_memory(
    params: int, layers: int, hidden: int, heads: int, seq_len: int, vocab: int, predictions: int
) -> tuple[int, int]:
    """Estimated bytes of a mixed-precision training step: (fixed, per sequence).

    Fixed: fp32 weights, gradients and AdamW's two moments, and a bf16 copy of the
    weights (18 bytes a parameter). Per sequence: an encoder layer's saved activations,
    34 T H + 5 A T^2 bytes with 16-bit activations (Korthikanti et al., 2022, as
    Megatron counts them), and the MLM logits of the `predictions` masked tokens in bf16
    and fp32 with their gradient (10 bytes each); half again on top for what the count
    leaves out (fp32 copies, the allocator's fragmentation).
    """
    layer = 34 * seq_len * hidden + 5 * heads * seq_len * seq_len
    per_sequence = layers * layer + 10 * predictions * vocab
    return 18 * params, int(1.5 * per_sequence)


def default_micro_batch(
    device: torch.device,
    per_rank_batch: int,
    fixed_bytes: int,
    bytes_per_sequence: int,
    fallback: int,
) -> int:
    """The micro-batch when none is given: on a GPU the whole per-rank batch when its
    estimated memory fits in 90% of what is free, else the fewest equal micro-batches
    that fit; `fallback` on the CPU, whose steps gain nothing from a larger one."""
    if device.type != "cuda":
        return min(fallback, per_rank_batch)
    free, _ = torch.cuda.mem_get_info(device)
    fits = int((0.9 * free - fixed_bytes) // max(bytes_per_sequence, 1))
    if fits < 1:
        return 1
    parts = -(-per_rank_batch // fits)  # micro-batches a step needs, at least 1
    return -(-per_rank_batch // parts)


def default_workers(device: torch.device) -> int:
    """Background processes that build batches ahead of the step: 2 on a GPU, whose
    step would otherwise wait for the host's masking; 0 on the CPU, where the cores
    the workers would take are the ones computing the step."""
    return 0 if device.type == "cpu" else 2


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    A training step frees and allocates the same large buffers (activations, gradients,
    bf16 copies of the weights) every step. By default glibc hands a freed heap top larger
    than its trim threshold (32 MB at most, adjusted at run time) back to the kernel, so
    the next step takes a page fault for every 4 KB it touches again: 75,000 faults and
    about a sixth of a mini training step here, and a fresh 37 MB logits buffer cost 10 ms
    to fault in against 27 ms for the matmul that fills it. With the mmap threshold fixed
    at its 32 MB maximum and trimming off, buffers up to 32 MB are reused from the heap
    and the resident size stays near its peak, as with PyTorch's CUDA caching allocator.
    Returns False, changing nothing, without glibc (macOS, musl) or when the environment
    sets BERTFORGE_KEEP_FREED_MEMORY=0.
    """
    if not sys.platform.startswith("linux") or os.environ.get(KEEP_FREED_MEMORY) == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 2**31 - 1))


def configure_threads() -> int:
    """Use every core for intra-op work unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        torch.set_num_threads(cores)
    return torch.get_num_threads()
