"""`make bench`: the runner against the notebook's loop, side by side on this machine.

Each measurement is a separate process (so peak RSS is its own, from the OS via wait4), and the
baseline and the runner alternate. Modes:
  default        --steps 300, or 60 on a CPU without a native bf16 GEMM, where torch's bf16 runs
                 ~10x slower (after a warm-up run of each): bf16-true, bf16-mixed and fp32, the
                 runner with `train.kernels: hf` and `fast`, `fast` with its bf16 products on the
                 path this CPU does not take (LILGATSBY_BF16_GEMM forced: bf16_via_fp32), plus the
                 runner with recording off to measure the recording overhead
  --steps 10000  the full reference run, baseline vs runner (bf16)
  --sweep        an 8-seed sweep (--sweep-steps each) through `lilgatsby sweep` vs the baseline run
                 8 times one after another
  --packed       N = 1, 4, 8, 16 reference models trained as one stacked model (bench/packed.py, all
                 cores) vs today's sweep (`lilgatsby sweep`, one run per core), fp32 and bf16-true,
                 recording off on both sides: steps/s per seed and 10,000-step runs per hour
  --busy         the reference config on a busy machine: OpenMP's default wait against the project's,
                 quiet, beside spinning loops and other trainings, and in a one-CPU cgroup (bench/busy.py)
  --compact      full against compact recordings (record.format): speed per precision (--steps,
                 default 1000), bytes, reading rows back, the compression at the end (bench/compact.py)
  --live         live metrics and TensorBoard events (`record.live`) on vs off, alternating, on the
                 reference experiment (--steps, default 1000): one run on every core, and a sweep of
                 one run per core; with peak RSS at --steps and 3x as many steps
Prints the CPU and a table, and writes the results as JSON (bench/results/<mode>.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from runner.model.bf16_via_fp32 import FORCE_ENV, cpu_has_native_bf16_gemm  # noqa: E402
from runner.training.provenance import describe_cpu  # noqa: E402

LILGATSBY = [sys.executable, "-m", "runner.cli"]
# the bf16 GEMM path this CPU does not take by default, measured beside the one it does
OTHER_BF16_GEMM = "fp32" if cpu_has_native_bf16_gemm() else "native"


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict:
    """Run `cmd` in `cwd` (with `env` added to the environment); its wall seconds, its own peak
    RSS (MiB, from wait4) and its stdout."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: exec the command with stdout to a file
        out = open(cwd / "stdout.txt", "w")
        os.dup2(out.fileno(), 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        os.chdir(cwd)
        os.execvpe(cmd[0], cmd, {**os.environ, **(env or {})})
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"bench: {' '.join(cmd)} exited with {os.waitstatus_to_exitcode(status)}")
    return {"wall_s": time.perf_counter() - t0, "rss_mib": usage.ru_maxrss / 1024,
            "stdout": (cwd / "stdout.txt").read_text()}


def baseline(steps: int, precision: str, work: Path, seed: int = 42) -> dict:
    result = run_measured([sys.executable, str(REPO / "bench" / "notebook_loop.py"), "--steps", str(steps),
                           "--precision", precision, "--seed", str(seed), "--out", str(work / "baseline.safetensors")],
                          work)
    return {**json.loads(result["stdout"].splitlines()[-1]), "rss_mib": result["rss_mib"], "wall_s": result["wall_s"]}


def runner(steps: int, precision: str, work: Path, record: bool = True, kernels: str = "fast",
           bf16_gemm: str | None = None, live: bool = True) -> dict:
    out = work / f"run-{precision}-{record}-{kernels}-{bf16_gemm}-{live}"
    cmd = [*LILGATSBY, "train", str(REPO / "experiments" / "lil_gatsby.yaml"), "--out", str(out), "--force",
           "--quiet", "--set", f"train.steps={steps}", "--set", f"train.precision={precision}",
           "--set", f"train.kernels={kernels}", "--set", f"record.live={str(live).lower()}"]
    if not record:
        cmd += ["--set", "record.tensors=[]"]
    result = run_measured(cmd, work, {FORCE_ENV: bf16_gemm} if bf16_gemm else None)
    manifest = json.loads((out / "run.json").read_text())
    metrics = manifest["metrics"]
    return {"steps": steps, "steps_per_s": metrics["steps_per_s"], "train_s": metrics["train_s"],
            "rss_mib": result["rss_mib"], "wall_s": result["wall_s"],
            "live_cpu_s": manifest.get("live_metrics", {}).get("writer_cpu_s")}


def best(results: list[dict]) -> dict:
    """The fastest of repeated measurements (the least disturbed by the rest of the machine)."""
    return max(results, key=lambda r: r["steps_per_s"])


def steps_mode(steps: int, rounds: int, work: Path) -> dict:
    """Per runner precision: the notebook's loop in the matching precision (bf16 for both bf16
    modes), the runner with `train.kernels: hf` (transformers' own kernels: the runner before its
    fast CPU kernels), with the default `fast`, and in bf16 with `fast` on the other bf16 GEMM
    path, alternating."""
    rows = {}
    precisions = ("bf16-true",) if steps >= 5000 else ("bf16-true", "bf16-mixed", "fp32")
    for precision in precisions:
        notebook_precision = "fp32" if precision == "fp32" else "bf16"
        if steps < 5000:  # warm-up: page cache, lazy imports
            baseline(20, notebook_precision, work)
            runner(20, precision, work)
        forced = f"runner_bf16_gemm_{OTHER_BF16_GEMM}"
        measured: dict[str, list] = {"baseline": [], "runner_hf_kernels": [], "runner": []}
        for _ in range(rounds):
            measured["baseline"].append(baseline(steps, notebook_precision, work))
            measured["runner_hf_kernels"].append(runner(steps, precision, work, kernels="hf"))
            measured["runner"].append(runner(steps, precision, work))
            if precision != "fp32" and steps < 5000:
                measured.setdefault(forced, []).append(runner(steps, precision, work, bf16_gemm=OTHER_BF16_GEMM))
        rows[precision] = {name: best(results) for name, results in measured.items()}
    if steps < 5000:
        rows["bf16-true"]["runner_no_recording"] = best([runner(steps, "bf16-true", work, record=False)
                                                          for _ in range(rounds)])
    return rows


def reference_sweep(work: Path, name: str, settings: str) -> tuple[dict, list[dict]]:
    """`lilgatsby sweep` of the reference experiment with `settings` (YAML lines) added, timed; and
    the manifests of its runs."""
    exp = work / f"{name}.yaml"
    exp.write_text(f"include: {REPO / 'experiments' / 'lil_gatsby.yaml'}\nname: {name}\n{settings}")
    result = run_measured([*LILGATSBY, "sweep", str(exp), "--runs", str(work / "runs"), "--force", "--quiet"], work)
    return result, [json.loads(p.read_text()) for p in (work / "runs" / name).glob("*/run.json")]


def sweep_mode(steps: int, seeds: int, work: Path) -> dict:
    """The notebook's loop run `seeds` times in a row against `lilgatsby sweep` over as many seeds,
    once with each run on one CPU (two runs side by side on two cores) and once on all of them."""
    t0 = time.perf_counter()
    for seed in range(seeds):
        baseline(steps, "bf16", work, seed=seed)
    base_s = time.perf_counter() - t0
    results: dict = {"seeds": seeds, "steps": steps, "baseline_sequential_s": base_s, "sweeps": {}}
    for cpus in sorted({1, os.cpu_count() or 1}):
        result, runs = reference_sweep(work, f"bench_sweep_{cpus}", f"train: {{steps: {steps}}}\n"
                                       f"resources: {{cpus_per_run: {cpus}}}\n"
                                       f"grid: {{train.seed: {{range: [0, {seeds}]}}}}\n")
        results["sweeps"][cpus] = {"sweep_s": result["wall_s"], "speedup": base_s / result["wall_s"],
                                   "driver_rss_mib": result["rss_mib"],
                                   "run_steps_per_s": sum(r["metrics"]["steps_per_s"] for r in runs) / len(runs),
                                   "run_setup_s": sum(r["metrics"]["wall_s"] - r["metrics"]["train_s"]
                                                                 for r in runs) / len(runs)}
    return results


def live_mode(steps: int, rounds: int, work: Path) -> dict:
    """`record.live` off and on, alternating `rounds` times (the best of each kept): one reference
    run on every core, then a sweep of one run per core (steps/s averaged over its runs); then the
    peak RSS of a live run of 3x the steps, beside the one of `steps`."""
    cores = os.cpu_count() or 1
    single: dict[str, list] = {"off": [], "on": []}
    swept: dict[str, list] = {"off": [], "on": []}
    for _ in range(rounds):
        for state in ("off", "on"):
            single[state].append(runner(steps, "bf16-true", work, live=state == "on"))
    for _ in range(rounds):
        for state in ("off", "on"):
            result, runs = reference_sweep(work, f"bench_live_{state}", f"train: {{steps: {steps}}}\n"
                                           f"record: {{live: {str(state == 'on').lower()}}}\n"
                                           f"resources: {{cpus_per_run: 1}}\n"
                                           f"grid: {{train.seed: {{range: [0, {cores}]}}}}\n")
            swept[state].append({"steps": steps, "runs": len(runs), "sweep_s": result["wall_s"],
                                 "steps_per_s": sum(r["metrics"]["steps_per_s"] for r in runs) / len(runs),
                                 "live_cpu_s": max(r.get("live_metrics", {}).get("writer_cpu_s", 0) for r in runs),
                                 "train_s": max(r["metrics"]["train_s"] for r in runs)})
    longer = runner(3 * steps, "bf16-true", work, live=True)
    return {"single": {state: best(results) for state, results in single.items()},
            "sweep": {state: best(results) for state, results in swept.items()},
            "longer_live": longer}


PACKS = (1, 4, 8, 16)
REFERENCE_STEPS = 10_000  # runs per hour are of the reference experiment's length


def packed_mode(steps: int, work: Path) -> dict:
    """Per precision: a sweep of one seed per core through Ray (recording off), then each pack size,
    timed in processes of their own; runs/hour of 10,000-step runs, training time only."""
    cores, results = os.cpu_count() or 1, {}
    for precision in ("fp32", "bf16-true"):
        _, runs = reference_sweep(work, f"packed_baseline_{precision.replace('-', '_')}",
                                  f"train: {{steps: {steps}, precision: {precision}}}\n"
                                  f"record: {{tensors: [], model_steps: none}}\nresources: {{cpus_per_run: 1}}\n"
                                  f"grid: {{train.seed: {{range: [0, {cores}]}}}}\n")
        per_run = sum(r["metrics"]["steps_per_s"] for r in runs) / len(runs)
        rows = {"sweep": {"models": cores, "steps_per_s_per_seed": per_run,
                          "runs_per_hour": cores * per_run * 3600 / REFERENCE_STEPS}}
        for n in PACKS:
            out = run_measured([sys.executable, str(REPO / "bench" / "packed.py"), "--n", str(n), "--precision",
                                precision, "--steps", str(max(10, 3 * steps // (10 * n)))], work)
            pack = json.loads(out["stdout"].splitlines()[-1])
            rows[f"pack_{n}"] = {"models": n, "steps_per_s_per_seed": pack["steps_per_s"],
                                 "runs_per_hour": n * pack["steps_per_s"] * 3600 / REFERENCE_STEPS,
                                 "rss_mib": out["rss_mib"]}
        results[precision] = rows
    return results


def table(mode: str, results: dict) -> str:
    if mode == "live":
        lines = ["| what | live | steps | steps/s | live metrics' CPU s (% of training time) | peak RSS MiB | wall s |",
                 "|---|---|---|---|---|---|---|"]

        def cpu(r: dict) -> str:
            return f"{r['live_cpu_s']:.2f} ({100 * r['live_cpu_s'] / r['train_s']:.2f} %)" if r["live_cpu_s"] else ""

        for state, r in results["single"].items():
            lines.append(f"| one run, every core | {state} | {r['steps']} | {r['steps_per_s']:.2f} | {cpu(r)} | "
                         f"{r['rss_mib']:.0f} | {r['wall_s']:.1f} |")
        for state, r in results["sweep"].items():
            lines.append(f"| sweep of {r['runs']}, one core each | {state} | {r['steps']} | {r['steps_per_s']:.2f} "
                         f"per run | {cpu(r)} | | {r['sweep_s']:.1f} |")
        r = results["longer_live"]
        lines.append(f"| one run, every core | on | {r['steps']} | {r['steps_per_s']:.2f} | {cpu(r)} | "
                     f"{r['rss_mib']:.0f} | {r['wall_s']:.1f} |")
        for what in ("single", "sweep"):
            on, off = results[what]["on"]["steps_per_s"], results[what]["off"]["steps_per_s"]
            lines.append(f"\n{'one run' if what == 'single' else 'sweep'}: steps/s off / on = {off / on:.3f} "
                         f"(budget: on costs at most 3 % of step time, 1.030)")
        return "\n".join(lines)
    if mode == "packed":
        lines = ["| precision | trained as | models at once | steps/s per seed | 10,000-step runs/hour | "
                 "vs the sweep |", "|---|---|---|---|---|---|"]
        for precision, rows in results.items():
            base = rows["sweep"]["runs_per_hour"]
            for name, r in rows.items():
                how = "lilgatsby sweep, one run per core" if name == "sweep" else "one stacked model, all cores"
                lines.append(f"| {precision} | {how} | {r['models']} | {r['steps_per_s_per_seed']:.1f} | "
                             f"{r['runs_per_hour']:.1f} | {r['runs_per_hour'] / base:.2f}x |")
        return "\n".join(lines)
    if mode == "sweep":
        r = results
        lines = [f"{r['seeds']}-seed sweep, {r['steps']} steps each: the notebook's loop {r['seeds']} times in a row "
                 f"{r['baseline_sequential_s']:.1f} s", "| cpus_per_run | sweep s | speedup | steps/s per run | "
                 "per-run setup s (before step 1) | driver peak RSS MiB |", "|---|---|---|---|---|---|"]
        for cpus, s in r["sweeps"].items():
            lines.append(f"| {cpus} | {s['sweep_s']:.1f} | {s['speedup']:.2f}x | {s['run_steps_per_s']:.1f} | "
                         f"{s['run_setup_s']:.2f} | {s['driver_rss_mib']:.0f} |")
        return "\n".join(lines)
    lines = ["| precision | implementation | steps | steps/s | speedup | peak RSS MiB | wall s |",
             "|---|---|---|---|---|---|---|"]
    for precision, rows in results.items():
        base = rows["baseline"]["steps_per_s"]
        for name, r in rows.items():
            lines.append(f"| {precision} | {name} | {r['steps']} | {r['steps_per_s']:.1f} | "
                         f"{r['steps_per_s'] / base:.2f}x | {r['rss_mib']:.0f} | {r['wall_s']:.1f} |")
    if "fp32" in results:
        fp32 = results["fp32"]["runner"]["steps_per_s"]
        lines.append("\nbf16 against fp32, both the runner's default (`fast`): " + ", ".join(
            f"{p} {results[p]['runner']['steps_per_s'] / fp32:.2f}x" for p in results if p != "fp32"))
    bf16 = results.get("bf16-true", {})
    if "runner_no_recording" in bf16:
        on, off = bf16["runner"]["steps_per_s"], bf16["runner_no_recording"]["steps_per_s"]
        lines.append(f"\nrecording overhead: {(off / on - 1) * 100:.1f} % of step time")
    if bf16:
        ratio = bf16["runner"]["rss_mib"] / bf16["baseline"]["rss_mib"]
        lines.append(f"peak RSS runner / baseline (bf16-true): {ratio * 100:.0f} %")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300 if cpu_has_native_bf16_gemm() else 60)
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements of each (best is kept)")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--live", action="store_true")
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("--compact", action="store_true")
    parser.add_argument("--precisions", default="bf16-true,bf16-mixed,fp32", help="with --compact")
    parser.add_argument("--sweep-steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--json", type=Path, help="where to write the results (default bench/results/<mode>.json)")
    args = parser.parse_args()
    if not os.environ.get("LILGATSBY_CORPUS"):  # the children run in a scratch directory
        if not (REPO / "data" / "pg64317.txt").exists():
            sys.exit("bench: set LILGATSBY_CORPUS to the book (pg64317.txt)")
        os.environ["LILGATSBY_CORPUS"] = str(REPO / "data" / "pg64317.txt")
    if args.busy:
        import busy

        busy.main(args.steps if "--steps" in sys.argv else 150, args.rounds,
                  args.json or REPO / "bench" / "results" / "busy.json")
        return
    if args.compact:
        import compact

        with tempfile.TemporaryDirectory(prefix="lilgatsby-bench-") as tmp:
            compact.main(args.steps if "--steps" in sys.argv else 1000, args.rounds, args.precisions.split(","),
                         args.json or REPO / "bench" / "results" / "compact.json", Path(tmp))
        return
    mode = "sweep" if args.sweep else "packed" if args.packed else "live" if args.live else f"steps{args.steps}"
    with tempfile.TemporaryDirectory(prefix="lilgatsby-bench-") as tmp:
        work = Path(tmp)
        if args.sweep:
            results = sweep_mode(args.sweep_steps, args.seeds, work)
        elif args.packed:
            results = packed_mode(args.steps, work)
        elif args.live:
            results = live_mode(args.steps if "--steps" in sys.argv else 1000, args.rounds, work)
        else:
            results = steps_mode(args.steps, args.rounds, work)
    out = args.json or REPO / "bench" / "results" / f"{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mode": mode, "host_cpus": os.cpu_count(), "cpu": describe_cpu(), "results": results},
                              indent=2) + "\n")
    print(describe_cpu())
    print(table(mode if mode in ("sweep", "packed", "live") else "steps", results))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
