"""The process set-up for CPU training: glibc's malloc is told to keep freed memory.

What that buys (page faults and time per step) is a performance property and lives in
benchmarks/freed_memory.py; these tests check that the setting is applied.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bertforge.train import runtime

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: fake)
    runtime.keep_freed_memory.cache_clear()
    yield fake
    runtime.keep_freed_memory.cache_clear()


def test_keep_freed_memory_sets_both_glibc_options(libc, monkeypatch):
    monkeypatch.delenv(runtime.KEEP_FREED_MEMORY, raising=False)
    assert runtime.keep_freed_memory() is True
    assert sorted(libc.calls) == [(M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 2**31 - 1)]


def test_the_environment_opts_out(libc, monkeypatch):
    monkeypatch.setenv(runtime.KEEP_FREED_MEMORY, "0")
    assert runtime.keep_freed_memory() is False
    assert libc.calls == []


def test_configure_tunes_the_cpu_only(libc, monkeypatch):
    monkeypatch.delenv(runtime.KEEP_FREED_MEMORY, raising=False)
    assert runtime.configure(torch.device("meta")) == "meta"  # any device but the CPU
    assert libc.calls == []
    assert runtime.configure(torch.device("cpu")).startswith("cpu, ")
    assert len(libc.calls) == 2


# A 16 MB buffer, below the fixed 32 MB mmap threshold, comes from the heap (brk), not
# from a fresh mmap that would be faulted in again after every free.
_PROBE = """
import ctypes, torch
from bertforge.train.runtime import configure
configure(torch.device("cpu"))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
address = libc.malloc(16 << 20)
heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
low, high = (int(x, 16) for x in heap[0].split("-"))
print(low <= address < high)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_a_tuned_process_serves_large_buffers_from_the_heap():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018 (raises where glibc has none)
    except (OSError, AttributeError):
        pytest.skip("this Linux has no glibc malloc to tune")
    env = {k: v for k, v in os.environ.items() if k != runtime.KEEP_FREED_MEMORY}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    ).stdout.split()
    assert out == ["True"]


# ------------------------------------------------------------- the default micro-batch


def _free_memory(monkeypatch, free_bytes: float) -> None:
    """A CUDA device with `free_bytes` free, as torch.cuda.mem_get_info reports it."""
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device=None: (int(free_bytes), int(141e9))
    )


def test_the_gpu_micro_batch_is_the_whole_batch_where_it_fits(monkeypatch):
    # BERT-base at 128 tokens, 20 predictions a sequence
    fixed, per_sequence = runtime.training_memory(110_000_000, 12, 768, 12, 128, 30522, 20)
    assert 1.5e9 < fixed < 2.5e9 and 50e6 < per_sequence < 150e6
    cuda = torch.device("cuda", 0)
    _free_memory(monkeypatch, 140e9)  # an H200
    assert runtime.default_micro_batch(cuda, 256, fixed, per_sequence, 32) == 256
    _free_memory(monkeypatch, 22e9)  # a 24 GB card: the fewest equal micro-batches that fit
    micro = runtime.default_micro_batch(cuda, 256, fixed, per_sequence, 32)
    assert micro in (128, 86, 64) and (0.9 * 22e9 - fixed) >= micro * per_sequence
    _free_memory(monkeypatch, 1e9)  # not even the weights: one sequence at a time
    assert runtime.default_micro_batch(cuda, 256, fixed, per_sequence, 32) == 1


def test_the_cpu_micro_batch_default_is_unchanged(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a CPU run asked CUDA for its memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", forbidden)
    cpu = torch.device("cpu")
    assert runtime.default_micro_batch(cpu, 256, 0, 1, 32) == 32
    assert runtime.default_micro_batch(cpu, 16, 0, 1, 32) == 16


def test_pretraining_resolves_the_micro_batch_per_rank(monkeypatch):
    from bertforge.commands.pretrain import micro_batch_for
    from bertforge.config import DataConfig, RunConfig, TrainConfig, preset
    from bertforge.tasks.mlm import pretraining_model

    cfg = RunConfig(
        model=preset("mini"), data=DataConfig(seq_len=128), train=TrainConfig(batch_size=512)
    )
    assert cfg.train.micro_batch_size is None and cfg.train.accumulation_steps == 16
    model = pretraining_model(cfg.model, "mlm")
    _free_memory(monkeypatch, 140e9)
    assert micro_batch_for(cfg, model, torch.device("cuda", 0), world_size=2) == 256
    assert micro_batch_for(cfg, model, torch.device("cpu"), world_size=2) == 32
