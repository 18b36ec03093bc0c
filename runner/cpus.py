"""The CPUs a run may use, and how its idle OpenMP threads wait for work.

torch's CPU kernels run on OpenMP; the pinned Linux wheels bring GNU's libgomp
(`torch.__config__.parallel_info()`: "ATen parallel backend: OpenMP", `torch/lib/libgomp.so.1`).
libgomp's idle threads spin before they sleep: 300,000 rounds of a pause instruction by default,
milliseconds on these CPUs, between every two of the few hundred parallel regions of a training
step. On a quiet machine that spinning is free; on a busy one (a browser, a notebook kernel,
another training, a shared login node) a spinning thread burns the time slice its team mate
needed, and a run lost 90-97 % of its speed. `GOMP_SPINCOUNT=3000` (some 40-150 us) keeps the
quiet speed, which spinning buys by catching the next region without a sleep, and lets the
thread sleep once the wait is longer than a region's imbalance; `OMP_WAIT_POLICY=PASSIVE` (no
spin at all) made the quiet machine 17 % slower. docs/speed.md has the measurements. How
threads wait changes no bit of what they compute.

libgomp reads its settings once, when torch loads it: `prepare_openmp` runs when the `runner`
package is imported, before any of its modules imports torch (the CLI, Ray workers, submitted
jobs and containers all start there). A wait policy the user set is left as it is.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

SPIN_COUNT_VAR, WAIT_POLICY_VAR = "GOMP_SPINCOUNT", "OMP_WAIT_POLICY"
SPIN_COUNT = "3000"  # chosen by `make bench BENCH_ARGS=--busy` (docs/speed.md)
_in_force = "not prepared"


def prepare_openmp(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Idle OpenMP threads spin briefly, then sleep; unless the user chose a wait policy, or torch
    is loaded already (too late: libgomp has read its settings)."""
    global _in_force
    chosen = {name: environ[name] for name in (WAIT_POLICY_VAR, SPIN_COUNT_VAR) if environ.get(name)}
    if chosen:
        _in_force = " ".join(f"{name}={value}" for name, value in chosen.items())
    elif "torch" in sys.modules:
        _in_force = "OpenMP's default (torch was loaded first)"
    else:
        environ[SPIN_COUNT_VAR] = SPIN_COUNT
        _in_force = f"{SPIN_COUNT_VAR}={SPIN_COUNT}"


def openmp_wait() -> str:
    """How this process's OpenMP threads wait, as `prepare_openmp` found or set it (run.json's
    environment)."""
    return _in_force


def granted_cpus(proc: Path = Path("/proc/self")) -> int:
    """How many CPUs this process may really use: its affinity mask (taskset, Slurm's cpusets),
    cut to its cgroup's CPU quota (`podman run --cpus`, Kubernetes limits, Slurm's cgroups), not
    the machine's core count. A quota of 1.5 CPUs gives 1: an OpenMP team waits at each region's
    end for its slowest thread, and a second thread that the quota throttles stalls them both."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc)
    return affinity if quota is None else max(1, min(affinity, math.floor(quota)))


def cgroup_cpu_quota(proc: Path = Path("/proc/self")) -> float | None:
    """CPUs per period allowed to this process by its cgroups (v2 `cpu.max`, v1
    `cpu.cfs_quota_us`/`cpu.cfs_period_us`), the tightest of its cgroup and their ancestors; None
    without a quota, or where the cgroup files cannot be read."""
    try:
        memberships = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    quotas = [quota for mount_dir, cgroup_dir, version in _cpu_cgroup_dirs(memberships, mounts)
              for quota in _quotas_up_from(mount_dir, cgroup_dir, version)]
    return min(quotas) if quotas else None


def _cpu_cgroup_dirs(memberships: list[str], mounts: list[str]) -> list[tuple[Path, Path, int]]:
    """(mount point, this process's cgroup directory under it, cgroup version) of each mounted
    hierarchy that holds the cpu controller and this process."""
    paths = {}  # version 2, or 1: the process's path in the hierarchy
    for line in memberships:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            paths[2] = path
        elif "cpu" in controllers.split(","):
            paths[1] = path
    found = []
    for line in mounts:  # mountinfo(5): ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS... - FSTYPE SOURCE SUPER_OPTIONS
        fields, _, tail = line.partition(" - ")
        parts, fs = fields.split(), tail.split()
        if len(parts) < 5 or len(fs) < 3:
            continue
        root, mount_point = parts[3], Path(parts[4])
        version = 2 if fs[0] == "cgroup2" else 1 if fs[0] == "cgroup" and "cpu" in fs[2].split(",") else None
        if version is None or version not in paths:
            continue
        inside = os.path.relpath(paths[version], root)  # a container's mount starts at its own cgroup
        if inside.startswith(".."):
            inside = "."
        found.append((mount_point, (mount_point / inside).resolve(), version))
    return found


def _quotas_up_from(mount_dir: Path, cgroup_dir: Path, version: int) -> list[float]:
    quotas = []
    directory = cgroup_dir
    while True:
        quota = _read_quota(directory, version)
        if quota is not None:
            quotas.append(quota)
        if directory == mount_dir or mount_dir not in directory.parents:
            return quotas
        directory = directory.parent


def _read_quota(directory: Path, version: int) -> float | None:
    try:
        if version == 2:
            limit, period = (directory / "cpu.max").read_text().split()[:2]
        else:
            limit = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
        if limit in ("max", "-1") or float(period) <= 0:
            return None
        return float(limit) / float(period)
    except (OSError, ValueError):
        return None
