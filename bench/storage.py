"""`make bench-storage`: a runs root on a local S3 server (SeaweedFS `weed mini`) against local disk.

Measured side by side on this machine, each training a separate process (peak RSS from wait4):
  - publishing a recording-sized file (default 943 MiB, the reference run's) with the runner's
    client (64 MiB parts, 4 in parallel) and reading it back: MiB/s each way;
  - `--seeds` runs of `--steps` steps of the reference model, trained one after another into a local
    runs root and into the bucket: wall time and peak RSS per run, and their ratios.
The issue's targets: an 8-seed, 1,000-step sweep within 10 % of local disk (`--seeds 8 --steps 1000`),
>= 100 MiB/s up on a 2-core machine, peak RSS +<= 50 MiB. Writes bench/results/storage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]
from run import run_measured  # noqa: E402
from s3_server import ADMIN, SeaweedFS  # noqa: E402

from runner.storage import s3  # noqa: E402
from runner.storage.uri import S3Uri  # noqa: E402
from runner.training.provenance import describe_cpu  # noqa: E402


def transfer_rates(work: Path, mib: int) -> dict:
    path = work / "blob"
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    target = S3Uri("bench", "blob")
    t0 = time.perf_counter()
    s3.store().upload(path, target)
    up = time.perf_counter() - t0
    path.unlink()
    t0 = time.perf_counter()
    s3.store().download(target, path)
    down = time.perf_counter() - t0
    path.unlink()
    return {"mib": mib, "upload_mib_s": mib / up, "download_mib_s": mib / down}


def trainings(work: Path, root: str, seeds: int, steps: int) -> list[dict]:
    results = []
    for seed in range(seeds):
        experiment = str(REPO / "experiments" / "lil_gatsby.yaml")
        result = run_measured([sys.executable, "-m", "runner.cli", "train", experiment, "--runs", root,
                               "--set", f"train.steps={steps}", "--set", f"train.seed={seed}", "--quiet"],
                              work, {"PYTHONPATH": str(REPO)})
        results.append({"wall_s": result["wall_s"], "rss_mib": result["rss_mib"]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mib", type=int, default=943)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "storage.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lilgatsby-bench-") as tmp:
        work = Path(tmp)
        server = SeaweedFS(work / "server")
        server.start()
        try:
            os.environ.update({**ADMIN, "AWS_ENDPOINT_URL": server.endpoint,
                               "LILGATSBY_SCRATCH": str(work / "scratch")})
            s3.store().client.create_bucket(Bucket="bench")
            rates = transfer_rates(work, args.mib)
            local = trainings(work, str(work / "runs"), args.seeds, args.steps)
            remote = trainings(work, "s3://bench/runs", args.seeds, args.steps)
        finally:
            server.stop()
    local_s, remote_s = (sum(r["wall_s"] for r in runs) for runs in (local, remote))
    result = {"cpu": describe_cpu(), "seeds": args.seeds, "steps": args.steps, **rates,
              "local_wall_s": local_s, "s3_wall_s": remote_s, "s3_over_local": remote_s / local_s,
              "local_rss_mib": statistics.median(r["rss_mib"] for r in local),
              "s3_rss_mib": statistics.median(r["rss_mib"] for r in remote)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["cpu"])
    print(f"publish {args.mib} MiB: {rates['upload_mib_s']:.0f} MiB/s up, {rates['download_mib_s']:.0f} MiB/s down")
    print(f"{args.seeds} runs x {args.steps} steps, one after another: local {local_s:.1f} s, S3 {remote_s:.1f} s "
          f"({result['s3_over_local']:.3f}x); peak RSS per run (median) local {result['local_rss_mib']:.0f} MiB, "
          f"S3 {result['s3_rss_mib']:.0f} MiB (+{result['s3_rss_mib'] - result['local_rss_mib']:.0f})")


if __name__ == "__main__":
    main()
