"""The process a run trains in: its device, its thread count and its allocator."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import socket
import sys
from collections.abc import Iterator

import torch

from runner.cpus import granted_cpus
from runner.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` = cuda, else mps, else cpu; an explicit device must exist."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available[name]:
        raise ConfigError(f"train.device: {name} is not available on {socket.gethostname()} (got {name!r})")
    return torch.device(name)


def thread_count(configured: int | None, offered: int | None) -> int:
    """torch's intra-op threads for a new run: `train.threads` when set, else the CPUs the caller
    offers (a sweep: what Ray assigned), else the CPUs this process is granted (its affinity and
    cgroup quota: `runner.cpus.granted_cpus`; torch's own default counts the affinity alone). A
    resumed run keeps the count it started with instead (`training.loop`)."""
    return configured or offered or granted_cpus()


@contextlib.contextmanager
def torch_threads_restored() -> Iterator[None]:
    """torch's intra-op thread count as it was, once a run ends: the run's count (`train.threads`,
    a sweep's CPUs, its checkpoint's) is the run's, not that of what its process does next (a
    notebook's own work, the next run of a test suite or a reused Ray worker, which would train
    with it where `train.threads` is unset, and to other bits)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory_mapped() -> str:
    """Stop glibc from handing each step's freed activations back to the OS. Its default thresholds
    adapt at run time and let it trim the heap after most steps, so the next step page-faults
    ~2 MiB back in (~460 faults per step); fixed thresholds keep the memory (3-5 % faster on the
    reference config, peak RSS unchanged; see docs/speed.md). Returns the setting for the run's
    metadata; a no-op off glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "default"
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(M_TRIM_THRESHOLD, 256 << 20) and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return "glibc: trim 256 MiB, mmap 32 MiB" if ok else "default"
