"""`make bench-analysis`: the cost of analysing recordings, on a complete 10,000-step run.

Measures, each figure from its own process where memory matters (peak RSS from wait4):
  metrics      compute_metrics over the run's recording: seconds and peak RSS
  end of run   what a run adds after training: write_metrics + the final model snapshot, as a
               share of that run's training time (from its run.json)
  report       `lilgatsby report` of a 16-run sweep whose metrics are cached (16 run directories
               sharing the run's recording through symlinks, 2 precisions x 8 seeds)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.run import LILGATSBY, REPO, run_measured  # noqa: E402
from runner.analysis.metrics import write_metrics  # noqa: E402
from runner.config import build_experiment  # noqa: E402
from runner.layout import (  # noqa: E402
    MANIFEST,  # noqa: E402
    METRICS,
    METRICS_SOURCE,
    RECORDING,
)
from runner.runs.rundir import write_manifest  # noqa: E402

METRICS_CHILD = ("import sys, time; from runner.analysis.metrics import compute_metrics; t = time.perf_counter(); "
                 "compute_metrics(sys.argv[1]); print(time.perf_counter() - t)")


def metrics_cost(run_dir: Path, work: Path) -> dict:
    result = run_measured([sys.executable, "-c", METRICS_CHILD, str(run_dir / RECORDING)], work)
    return {"compute_s": float(result["stdout"].split()[-1]), "process_s": result["wall_s"],
            "peak_rss_mib": result["rss_mib"]}


def end_of_run_cost(run_dir: Path, work: Path) -> dict:
    # Imported here, after the measured children ran: a forked child's peak RSS counts the pages it
    # shared with this process before exec, and torch is ~240 MiB of them.
    from runner.model.gpt2 import build_model
    from runner.training.snapshots import Snapshots

    manifest = json.loads((run_dir / MANIFEST).read_text())
    exp = build_experiment({**manifest["config"], "record": {**manifest["config"]["record"], "model_steps": "final"}})
    model = build_model(exp.model, exp.train.seed)
    t0 = time.perf_counter()
    write_metrics(run_dir)
    t1 = time.perf_counter()
    Snapshots(work, exp).after_step(exp.train.steps, model)
    t2 = time.perf_counter()
    train_s = manifest["metrics"]["train_s"]
    return {"metrics_s": t1 - t0, "snapshot_s": t2 - t1, "run_train_s": train_s,
            "share_of_run": (t2 - t0) / train_s}


def fake_sweep(run_dir: Path, root: Path, seeds: int = 8) -> Path:
    """16 run directories (2 precisions x `seeds` seeds) sharing one recording and its cached metrics."""
    manifest = json.loads((run_dir / MANIFEST).read_text())
    exp_dir = root / "bench_report"
    for precision in ("bf16-true", "bf16-mixed"):
        for seed in range(seeds):
            run_id = f"{precision[5]}{seed:011d}"
            d = exp_dir / run_id
            d.mkdir(parents=True)
            (d / RECORDING).symlink_to(run_dir / RECORDING)
            for name in (METRICS, METRICS_SOURCE):
                (d / name).write_bytes((run_dir / name).read_bytes())
            config = json.loads(json.dumps(manifest["config"]))
            config["train"].update(seed=seed, precision=precision)
            write_manifest(d, {**manifest, "run_id": run_id, "config": config,
                               "overrides": {"train.seed": seed, "train.precision": precision},
                               "grid_point": {"train.seed": seed, "train.precision": precision}})
    return exp_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a complete run directory (default: the reference run of "
                                                 "`make run`, runs/lil_gatsby/<run id>)")
    args = parser.parse_args()
    run_dir = args.run or next((REPO / "runs" / "lil_gatsby").glob("*/recording.safetensors"), Path()).parent
    if not (run_dir / RECORDING).is_file():
        sys.exit("bench-analysis: no complete run found; `make run` first, or pass --run RUN_DIR")
    write_metrics(run_dir)  # the cache the report reads, and a warm page cache for every measurement
    with tempfile.TemporaryDirectory(prefix="lilgatsby-bench-") as tmp:
        work = Path(tmp)
        results = {"metrics": metrics_cost(run_dir, work)}
        report = run_measured([*LILGATSBY, "report", str(fake_sweep(run_dir, work))], REPO)
        results["report_16_runs"] = {"wall_s": report["wall_s"], "peak_rss_mib": report["rss_mib"]}
        results["end_of_run"] = end_of_run_cost(run_dir, work)
    out = REPO / "bench" / "results" / "analysis.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(run_dir), "results": results}, indent=2) + "\n")
    m, e, r = results["metrics"], results["end_of_run"], results["report_16_runs"]
    print(f"| measurement | figure | target |\n|---|---|---|\n"
          f"| metrics of {run_dir.name} (10,001 rows) | {m['compute_s']:.2f} s compute, {m['process_s']:.2f} s "
          f"with imports, peak RSS {m['peak_rss_mib']:.0f} MiB | <= 10 s, <= 300 MiB |\n"
          f"| end of run: metrics + final snapshot | {e['metrics_s']:.2f} s + {e['snapshot_s']:.2f} s = "
          f"{e['share_of_run'] * 100:.2f} % of the run's {e['run_train_s']:.0f} s of training | <= 2 % |\n"
          f"| report of a 16-run sweep, cached metrics | {r['wall_s']:.1f} s (peak RSS {r['peak_rss_mib']:.0f} MiB) "
          f"| <= 30 s |\n\nresults: {out}")


if __name__ == "__main__":
    main()
