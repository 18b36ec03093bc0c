"""The CPUs a run is granted (affinity and cgroup quotas) and OpenMP's wait policy (runner.cpus)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import cpus
from runner.analysis.compare import compare
from runner.storage.location import at
from runner.training.host import thread_count

from conftest import REPO


def fake_proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("\n".join(mounts) + "\n")
    return proc


def write(path: Path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, value in (line.split("=", 1) for line in text.split(";")):
        (path / name).write_text(value + "\n")


def test_cgroup_v2_quota_is_the_tightest_of_the_cgroup_and_its_ancestors(tmp_path):
    root = tmp_path / "cg2"
    write(root / "user.slice", "cpu.max=250000 100000")
    write(root / "user.slice" / "job", "cpu.max=max 100000")
    proc = fake_proc(tmp_path, "0::/user.slice/job\n",
                     [f"30 22 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"])
    assert cpus.cgroup_cpu_quota(proc) == 2.5
    write(root / "user.slice" / "job", "cpu.max=150000 100000")
    assert cpus.cgroup_cpu_quota(proc) == 1.5


def test_cgroup_v1_quota_and_a_containers_mount_at_its_own_cgroup(tmp_path):
    """In a container the hierarchy is mounted from the container's own cgroup: mountinfo's root
    field names it, and /proc/self/cgroup's path is relative to the same hierarchy."""
    mount = tmp_path / "cpu,cpuacct"
    write(mount, "cpu.cfs_quota_us=100000;cpu.cfs_period_us=100000")
    proc = fake_proc(tmp_path, "5:memory:/pod1\n4:cpu,cpuacct:/pod1/ctr\n",
                     [f"40 30 0:30 /pod1/ctr {mount} ro - cgroup cgroup rw,cpu,cpuacct",
                      f"41 30 0:31 /pod1 {tmp_path / 'memory'} ro - cgroup cgroup rw,memory"])
    assert cpus.cgroup_cpu_quota(proc) == 1.0
    write(mount, "cpu.cfs_quota_us=-1")
    assert cpus.cgroup_cpu_quota(proc) is None


def test_no_quota_or_unreadable_cgroups_leave_the_affinity(tmp_path, monkeypatch):
    assert cpus.cgroup_cpu_quota(tmp_path / "nowhere") is None
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda proc: None)
    assert cpus.granted_cpus() == 4
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda proc: 1.5)  # a throttled second thread stalls the team
    assert cpus.granted_cpus() == 1
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda proc: 0.2)
    assert cpus.granted_cpus() == 1
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda proc: 8.0)
    assert cpus.granted_cpus() == 4


def test_a_runs_default_thread_count_is_the_granted_cpus(monkeypatch):
    monkeypatch.setattr("runner.training.host.granted_cpus", lambda: 3)
    assert thread_count(None, None) == 3
    assert thread_count(None, 1) == 1  # what Ray assigned
    assert thread_count(2, 1) == 2  # train.threads


def test_openmp_threads_spin_briefly_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr(cpus, "_in_force", cpus._in_force)  # this process's, restored after
    monkeypatch.delitem(sys.modules, "torch")  # as in a process that has not loaded it yet
    env: dict[str, str] = {}
    cpus.prepare_openmp(env)
    assert env == {"GOMP_SPINCOUNT": cpus.SPIN_COUNT} and cpus.openmp_wait() == f"GOMP_SPINCOUNT={cpus.SPIN_COUNT}"
    for chosen in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(chosen)
        cpus.prepare_openmp(env)
        assert env == chosen and cpus.openmp_wait() == " ".join(f"{k}={v}" for k, v in chosen.items())


def test_too_late_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401

    monkeypatch.setattr(cpus, "_in_force", cpus._in_force)

    env: dict[str, str] = {}
    cpus.prepare_openmp(env)
    assert env == {} and "torch was loaded first" in cpus.openmp_wait()


def lilgatsby_train(out: Path, book: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-m", "runner.cli", "train", str(REPO / "experiments" / "smoke.yaml"),
                           "--out", str(out), "--corpus", str(book), "--quiet", "--set", "train.steps=12"],
                          env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env}, capture_output=True, text=True,
                          timeout=300, check=True)


@pytest.mark.slow
def test_the_wait_policy_reaches_libgomp_and_changes_no_bit(tmp_path, small_book):
    """A `lilgatsby train` process: libgomp reads the short spin (it prints what it read), and the
    recording equals one trained with libgomp's own default (spinning 300,000 rounds) bit for bit."""
    ours = lilgatsby_train(tmp_path / "ours", small_book, {})
    default = lilgatsby_train(tmp_path / "default", small_book, {"GOMP_SPINCOUNT": "300000"})
    assert f"GOMP_SPINCOUNT = '{cpus.SPIN_COUNT}'" in ours.stderr
    assert "GOMP_SPINCOUNT = '300000'" in default.stderr
    manifests = [json.loads((tmp_path / d / "run.json").read_text()) for d in ("ours", "default")]
    assert [m["environment"]["openmp_wait"] for m in manifests] == [f"GOMP_SPINCOUNT={cpus.SPIN_COUNT}",
                                                                    "GOMP_SPINCOUNT=300000"]
    assert manifests[0]["threads"] == manifests[1]["threads"] == cpus.granted_cpus()
    lines, identical = compare(at(tmp_path / "ours"), at(tmp_path / "default"))
    assert identical, lines


def cpu_cgroup_v1() -> Path | None:
    path = Path("/sys/fs/cgroup/cpu")
    return path if os.geteuid() == 0 and (path / "cpu.cfs_quota_us").exists() else None


@pytest.mark.slow
@pytest.mark.skipif(cpu_cgroup_v1() is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs root, a cgroup v1 cpu hierarchy and two CPUs (as on this project's machines)")
def test_a_run_in_a_one_cpu_cgroup_trains_on_one_thread(tmp_path, small_book):
    """What `podman run --cpus 1` does: a CFS quota of one CPU per period on the process's cgroup."""
    group = cpu_cgroup_v1() / f"lilgatsby-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text(str(int((group / "cpu.cfs_period_us").read_text())))
        script = (f"echo $$ > {group / 'cgroup.procs'} && exec {sys.executable} -m runner.cli train "
                  f"{REPO / 'experiments' / 'smoke.yaml'} --out {tmp_path / 'run'} --corpus {small_book} --quiet "
                  f"--set train.steps=4")
        subprocess.run(["sh", "-c", script], check=True, timeout=300, capture_output=True)
    finally:
        group.rmdir()
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["threads"] == 1 and manifest["environment"]["granted_cpus"] == 1
