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

from bertforge import runtime

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
from bertforge.runtime import configure
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
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("this Linux has no glibc malloc to tune")
    env = {k: v for k, v in os.environ.items() if k != runtime.KEEP_FREED_MEMORY}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env=env, check=True, timeout=120).stdout.split()
    assert out == ["True"]
