"""`make bench-slurm`: a sweep submitted with `--slurm` to a real Slurm on this machine
(tests/slurm_cluster.py: Slurm 22.05, two nodes in network namespaces of their own, sharing this
machine's CPUs). Needs root and Debian's slurm-wlm and munge.

For the smoke sweep (4 runs of `--steps` steps, default 1000), each configuration in a fresh runs root:
  - submit -> the job running, submit -> the first training step (the first progress.json of a
    run at step >= 1), submit -> the submitter's exit: seconds;
  - on one node with one CPU per task (a run at a time), one node with two CPUs (two at a time) and
    two nodes with one CPU each (two at a time, a Ray worker node joining the head).
The two nodes share this machine's cores, so two nodes cannot be faster than one node with their
CPUs: the comparison measures what Ray across nodes costs, not what more machines give.
Writes bench/results/slurm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]
from slurm_cluster import SlurmCluster, missing  # noqa: E402

CONFIGS = {"1 node x 1 CPU": ["--nodes", "1"], "1 node x 2 CPUs": ["--nodes", "1", "--sbatch=--cpus-per-task=2"],
           "2 nodes x 1 CPU": ["--nodes", "2"]}


def submit_and_time(cluster: SlurmCluster, runs: Path, args: list[str], steps: int) -> dict:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}, **cluster.env}
    start = time.monotonic()
    command = [str(Path(sys.executable).parent / "lilgatsby"), "sweep", str(REPO / "experiments" / "smoke_sweep.yaml"),
               "--runs", str(runs), "--slurm", "--set", f"train.steps={steps}", *args]
    proc = subprocess.Popen(command,
                            env=env, cwd=cluster.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = first_step = None
    while proc.poll() is None:
        now = time.monotonic() - start
        if running is None and "RUNNING" in subprocess.run(["squeue", "-h", "-o", "%T"], env=env, capture_output=True,
                                                           text=True).stdout:
            running = now
        if first_step is None and any(_step(p) >= 1 for p in runs.glob("smoke_sweep/*/progress.json")):
            first_step = now
        time.sleep(0.1)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed (exit code {proc.returncode}):\n{out}")
    return {"submit_to_running_s": _round(running), "submit_to_first_step_s": _round(first_step),
            "wall_s": _round(time.monotonic() - start)}


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _step(progress: Path) -> int:
    try:
        return int(json.loads(progress.read_text()).get("step", 0))
    except (OSError, ValueError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps of each run (default 1000)")
    args = parser.parse_args()
    why = missing()
    if why:
        raise SystemExit(f"bench-slurm: {why}")
    if not os.environ.get("LILGATSBY_CORPUS"):
        raise SystemExit("bench-slurm: set LILGATSBY_CORPUS to the book (pg64317.txt)")
    cluster = SlurmCluster().start()
    try:
        results: dict[str, dict] = {}
        for name, options in CONFIGS.items():
            results[name] = submit_and_time(cluster, cluster.base / f"runs-{len(results)}", options, args.steps)
            print(f"{name}: {results[name]}", flush=True)
    finally:
        cluster.stop()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    out = REPO / "bench" / "results" / "slurm.json"
    out.write_text(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg(),
                               "sweep": f"smoke_sweep (4 runs x {args.steps} steps)", "results": results},
                              indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
