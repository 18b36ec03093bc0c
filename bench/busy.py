"""`make bench BENCH_ARGS=--busy`: the reference config's speed on a busy machine, today's OpenMP
wait (libgomp's default: idle threads spin 300,000 rounds) against the project's (`runner.cpus`:
a short spin, then sleep), side by side in one run.

- quiet: each precision, today's wait against the fix, alternating `--rounds` times (best kept:
  the least disturbed by the rest of the machine);
- busy (`--rounds` rounds, best kept, as for quiet): beside K = 1 and 2 pure-Python spinning
  loops, and beside K = 1 and 2 other trainings of the reference config (with the same wait as
  the measured run: the fix applies to every run), the default thread count and
  `train.threads=1`, today's wait against the fix;
- one CPU: the default run in a cgroup with a quota of one CPU (what `podman run --cpus 1` sets),
  against `train.threads=1` outside it (needs root and a writable cgroup v1 cpu or v2 hierarchy).

Every measured run is `lilgatsby train` in a process of its own; steps/s is run.json's (training
time, after imports and setup).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from runner.cpus import SPIN_COUNT, SPIN_COUNT_VAR, WAIT_POLICY_VAR  # noqa: E402
from runner.training.provenance import describe_cpu  # noqa: E402

LILGATSBY = [sys.executable, "-m", "runner.cli"]
EXPERIMENT = REPO / "experiments" / "lil_gatsby.yaml"
WAITS = {"today": {SPIN_COUNT_VAR: "300000"}, "fix": {}}  # 300,000: libgomp's own default, made explicit
SPINNER = [sys.executable, "-c", "while True: pass"]
PRECISIONS = ("bf16-true", "bf16-mixed", "fp32")


def environment(wait: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in (SPIN_COUNT_VAR, WAIT_POLICY_VAR)}
    return {**clean, **WAITS[wait]}


def train(work: Path, steps: int, wait: str, settings: list[str], prefix: list[str] | None = None) -> float:
    """steps/s of one `lilgatsby train` of the reference config with `settings` (KEY=VALUE)."""
    out = work / "measured"
    cmd = [*LILGATSBY, "train", str(EXPERIMENT), "--out", str(out), "--force", "--quiet",
           "--set", f"train.steps={steps}"] + [arg for s in settings for arg in ("--set", s)]
    subprocess.run([*(prefix or []), *cmd], env=environment(wait), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return json.loads((out / "run.json").read_text())["metrics"]["steps_per_s"]


def read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@contextlib.contextmanager
def load(kind: str, count: int, wait: str, work: Path) -> Iterator[None]:
    """`count` busy processes for the duration: spinning loops, or trainings of the reference
    config (started, and given time to import and reach their steps, before the measurement)."""
    procs = []
    try:
        for i in range(count):
            if kind == "spin":
                procs.append(subprocess.Popen(SPINNER))
            else:
                cmd = [*LILGATSBY, "train", str(EXPERIMENT), "--out", str(work / f"load-{i}"), "--force", "--quiet",
                       "--set", "train.steps=1000000", "--set", "record.tensors=[]"]
                procs.append(subprocess.Popen(cmd, env=environment(wait), stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
        if kind == "train":  # train.log says the run's thread count as its steps begin
            deadline = time.monotonic() + 120
            while not all(" thread" in read(work / f"load-{i}" / "train.log") for i in range(count)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the load trainings did not start within 120 s")
                time.sleep(0.5)
            time.sleep(2)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def one_cpu_cgroup() -> Iterator[list[str] | None]:
    """A command prefix that runs a command in a new cgroup with a quota of one CPU per period
    (removed afterwards), or None where this process cannot make one."""
    for parent, files in ((Path("/sys/fs/cgroup/cpu"), ("cpu.cfs_quota_us", "cpu.cfs_period_us")),
                          (Path("/sys/fs/cgroup"), ("cpu.max",))):
        group = parent / f"lilgatsby-bench-{os.getpid()}"
        try:
            group.mkdir()
            if len(files) == 1:
                (group / "cpu.max").write_text("100000 100000")
            else:
                (group / files[0]).write_text((group / files[1]).read_text().strip())
        except OSError:
            with contextlib.suppress(OSError):
                group.rmdir()
            continue
        try:
            yield ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh"]
        finally:
            group.rmdir()  # its processes have ended
        return
    yield None


def busy_mode(steps: int, rounds: int, work: Path) -> dict:
    """`rounds` alternating measurements of each, quiet and busy (best kept); one CPU: one each."""
    results: dict = {"steps": steps, "spin_count": SPIN_COUNT, "quiet": {}, "busy": {}, "one_cpu": None}
    for precision in PRECISIONS:
        train(work, 20, "fix", [f"train.precision={precision}"])  # warm-up: page cache, lazy imports
        measured: dict[str, list[float]] = {wait: [] for wait in WAITS}
        for _ in range(rounds):
            for wait in WAITS:
                measured[wait].append(train(work, steps, wait, [f"train.precision={precision}"]))
        results["quiet"][precision] = {wait: max(speeds) for wait, speeds in measured.items()}
    for kind in ("spin", "train"):
        for count in (1, 2):
            row: dict[str, float] = {}
            for _ in range(rounds):
                for threads in ("default", "1"):
                    for wait in WAITS:
                        with load(kind, count, wait, work):
                            speed = train(work, steps, wait, [] if threads == "default" else ["train.threads=1"])
                        row[f"{threads}/{wait}"] = max(speed, row.get(f"{threads}/{wait}", 0.0))
            results["busy"][f"{count} {kind}"] = row
    with one_cpu_cgroup() as prefix:
        if prefix:
            inside = train(work, steps, "fix", [], prefix=prefix)
            threads_inside = json.loads((work / "measured" / "run.json").read_text())["threads"]
            results["one_cpu"] = {"inside": inside, "threads_inside": threads_inside,
                                  "outside_threads_1": train(work, steps, "fix", ["train.threads=1"])}
    return results


def table(results: dict) -> str:
    quiet = results["quiet"]["bf16-true"]["fix"]
    lines = [f"quiet machine, {results['steps']} steps, steps/s (today: {SPIN_COUNT_VAR}=300000, libgomp's default; "
             f"fix: {SPIN_COUNT_VAR}={results['spin_count']}):", "| precision | today | fix | fix / today |",
             "|---|---|---|---|"]
    for precision, r in results["quiet"].items():
        lines.append(f"| {precision} | {r['today']:.1f} | {r['fix']:.1f} | {r['fix'] / r['today']:.3f} |")
    lines += ["", f"bf16-true beside busy processes, steps/s (% of the quiet default run with the fix, {quiet:.1f}):",
              "| beside | default threads, today | default threads, fix | threads=1, today | threads=1, fix |",
              "|---|---|---|---|---|"]
    for load_name, row in results["busy"].items():
        cells = [f"{row[key]:.1f} ({100 * row[key] / quiet:.0f} %)"
                 for key in ("default/today", "default/fix", "1/today", "1/fix")]
        what = load_name.replace("spin", "spinning loop(s)").replace("train", "training(s)")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    one = results["one_cpu"]
    if one:
        lines += ["", f"a cgroup with a quota of 1 CPU: default run {one['inside']:.1f} steps/s on "
                      f"{one['threads_inside']} thread(s), train.threads=1 outside it {one['outside_threads_1']:.1f} "
                      f"({one['inside'] / one['outside_threads_1']:.3f})"]
    else:
        lines += ["", "a cgroup with a quota of 1 CPU: not measured (needs root and a writable cgroup hierarchy)"]
    return "\n".join(lines)


def main(steps: int, rounds: int, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="lilgatsby-bench-busy-") as tmp:
        results = busy_mode(steps, rounds, Path(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mode": "busy", "cpu": describe_cpu(), "results": results}, indent=2) + "\n")
    print(describe_cpu())
    print(table(results))
    print(f"\nresults: {out}")
