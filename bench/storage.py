"""`make bench-storage`: a runs root on a local S3 server (SeaweedFS `weed mini`) against local disk.

Measured side by side on this machine:
  - publishing a recording-sized file (default 943 MiB, the reference run's) with the runner's
    client (64 MiB parts, 4 in parallel) and reading it back: MiB/s each way;
  - a sweep of `--seeds` seeds of the reference model for `--steps` steps (`lilgatsby sweep`, its
    local Ray, one CPU per run) into a local runs root and into the bucket: wall time, and the
    bytes the server received for the sweep's bucket (its own counter) over the recordings' size;
  - one such run with `lilgatsby train` into each, in a process of its own: peak RSS (wait4).
The issue's targets: an 8-seed, 1,000-step sweep within 10 % of local disk (`--seeds 8 --steps 1000`),
>= 100 MiB/s up on a 2-core machine, upload volume <= 2.2x the recording, peak RSS +<= 50 MiB.
Writes bench/results/storage.json.
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
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]
from run import run_measured  # noqa: E402

from runner.storage import s3  # noqa: E402
from runner.storage.uri import S3Uri  # noqa: E402
from runner.training.provenance import describe_cpu  # noqa: E402

from s3_server import ADMIN, SeaweedFS  # noqa: E402

REFERENCE = REPO / "experiments" / "lil_gatsby.yaml"


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


def sweep_seconds(work: Path, root: str, seeds: int, steps: int, checkpoint_every: int | None) -> float:
    experiment = work / "bench_sweep.yaml"
    experiment.write_text(f"name: bench_sweep\ninclude: {REFERENCE}\n"
                          f"grid:\n  train.seed: {list(range(seeds))}\n")
    cadence = ["--set", f"train.checkpoint_every={checkpoint_every}"] if checkpoint_every else []
    command = [sys.executable, "-m", "runner.cli", "sweep", str(experiment), "--runs", root,
               "--set", f"train.steps={steps}", *cadence, "--quiet"]
    return run_measured(command, work, {"PYTHONPATH": str(REPO)})["wall_s"]


def peak_rss_mib(work: Path, root: str, steps: int) -> float:
    command = [sys.executable, "-m", "runner.cli", "train", str(REFERENCE), "--runs", root,
               "--set", f"train.steps={steps}", "--quiet"]
    return run_measured(command, work, {"PYTHONPATH": str(REPO)})["rss_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mib", type=int, default=943)
    parser.add_argument("--checkpoint-every", type=int, help="the sweep's train.checkpoint_every (default: the "
                        "config's, 1,000 steps); each checkpoint ships the recording's new rows")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "storage.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lilgatsby-bench-") as tmp:
        work = Path(tmp)
        server = SeaweedFS(work / "server")
        server.start()
        try:
            os.environ.update({**ADMIN, "AWS_ENDPOINT_URL": server.endpoint,
                               "LILGATSBY_SCRATCH": str(work / "scratch")})
            for bucket in ("bench", "sweep"):
                s3.store().client.create_bucket(Bucket=bucket)
            rates = transfer_rates(work, args.mib)
            local_s = sweep_seconds(work, str(work / "runs"), args.seeds, args.steps, args.checkpoint_every)
            remote_s = sweep_seconds(work, "s3://sweep/runs", args.seeds, args.steps, args.checkpoint_every)
            uploaded = server.received_bytes("sweep")
            recordings = sum(size for key, size in s3.store().objects(S3Uri("sweep", "runs")).items()
                             if key.endswith("/recording.safetensors"))
            local_rss = peak_rss_mib(work, str(work / "rss"), args.steps)
            remote_rss = peak_rss_mib(work, "s3://bench/rss", args.steps)
        finally:
            server.stop()
    result = {"cpu": describe_cpu(), "seeds": args.seeds, "steps": args.steps,
              "checkpoint_every": args.checkpoint_every, **rates,
              "local_sweep_s": local_s, "s3_sweep_s": remote_s, "s3_over_local": remote_s / local_s,
              "uploaded_bytes": uploaded, "recording_bytes": recordings, "upload_over_recording": uploaded / recordings,
              "local_rss_mib": local_rss, "s3_rss_mib": remote_rss}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["cpu"])
    print(f"publish {args.mib} MiB: {rates['upload_mib_s']:.0f} MiB/s up, {rates['download_mib_s']:.0f} MiB/s down")
    cadence = f", checkpoint every {args.checkpoint_every}" if args.checkpoint_every else ""
    print(f"sweep of {args.seeds} seeds x {args.steps} steps{cadence}: local {local_s:.1f} s, S3 {remote_s:.1f} s "
          f"({result['s3_over_local']:.3f}x); uploaded {uploaded / 2**20:,.1f} MiB for {recordings / 2**20:,.1f} MiB "
          f"of recordings ({result['upload_over_recording']:.2f}x)")
    print(f"peak RSS of one run: local {local_rss:.0f} MiB, S3 {remote_rss:.0f} MiB (+{remote_rss - local_rss:.0f})")


if __name__ == "__main__":
    main()
