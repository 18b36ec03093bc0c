"""What produced a run: package versions, host and code revision, for run.json and the recording."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
from importlib import metadata as pkg_metadata
from pathlib import Path

import torch

from runner.cpus import granted_cpus, openmp_wait
from runner.model.bf16_via_fp32 import cpu_has_native_bf16_gemm


def environment(device: torch.device) -> dict:
    """Versions, host, processor and code revision, so a recording says what produced it. The
    processor matters to the bits: torch dispatches to kernels for its instruction set."""
    packages = ("torch", "transformers", "tokenizers", "safetensors", "ray", "pyyaml", "tqdm")
    versions = {}
    for name in packages:
        with contextlib.suppress(pkg_metadata.PackageNotFoundError):
            versions[name] = pkg_metadata.version(name)
    return {"python": platform.python_version(), "packages": versions, "host": socket.gethostname(), "pid": os.getpid(),
            "platform": platform.platform(), "git_commit": git_commit(),
            "image": os.environ.get("LILGATSBY_IMAGE"), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16_gemm": cpu_has_native_bf16_gemm(), "openmp_wait": openmp_wait(),
            "granted_cpus": granted_cpus(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """The processor as speed figures need it named: model, torch's kernels for it, bf16 GEMM."""
    native = "yes" if cpu_has_native_bf16_gemm() else "no (bf16 products through fp32 GEMMs)"
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores ({granted_cpus()} granted), torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, native bf16 GEMM: {native}, OpenMP: {openmp_wait()}")


def git_commit() -> str:
    if os.environ.get("LILGATSBY_GIT_COMMIT"):
        return os.environ["LILGATSBY_GIT_COMMIT"]  # baked into container images
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
