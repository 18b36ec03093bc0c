"""`make bench BENCH_ARGS=--compact`: compact recordings against full ones, side by side in one run.

- speed: `lilgatsby train` of the reference config (--steps, default 1000) in each precision, full
  and compact alternating `--rounds` times (best kept), steps/s from run.json;
- size: each recording's bytes, and the reference run's (10,000 steps) from the layout;
- reading the compact recording of the first precision: one row of W at random steps (each from a
  fresh reader: replayed from its keyframe), and all rows of W, momentum and variance in chunks
  of 256 rows, against the same reads of the full recording;
- compression: how much smaller the compact file is than its tensors uncompressed, and what the
  compression took when the run completed (run.json).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from runner.config import load_runs  # noqa: E402
from runner.recording.format import recording_size  # noqa: E402
from runner.recording.rows import RowReader  # noqa: E402
from runner.training.provenance import describe_cpu  # noqa: E402

LILGATSBY = [sys.executable, "-m", "runner.cli"]
EXPERIMENT = REPO / "experiments" / "lil_gatsby.yaml"
FORMATS = ("full", "compact")


def train(out: Path, steps: int, precision: str, fmt: str) -> dict:
    cmd = [*LILGATSBY, "train", str(EXPERIMENT), "--out", str(out), "--force", "--quiet", "--set",
           f"train.steps={steps}", "--set", f"train.precision={precision}", "--set", f"record.format={fmt}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = json.loads((out / "run.json").read_text())
    return {"steps_per_s": manifest["metrics"]["steps_per_s"], "bytes": manifest["recording"]["bytes"]}


def reads(path: Path, samples: int = 20) -> dict:
    """Milliseconds to read one row of W at random steps (fresh reader each), seconds for all rows of
    W, momentum and variance."""
    with RowReader(path) as f:
        rows = f.tensors["W"]["shape"][0]
    one = []
    rng = random.Random(0)
    for row in (rng.randrange(rows) for _ in range(samples)):
        t = time.perf_counter()
        with RowReader(path) as f:
            f.rows("W", row, row + 1)
        one.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    with RowReader(path) as f:
        for start in range(0, rows, 256):
            for name in ("W", "momentum", "variance"):
                f.rows(name, start, min(start + 256, rows))
    return {"one_row_ms_median": statistics.median(one), "one_row_ms_max": max(one),
            "all_rows_s": time.perf_counter() - t, "rows": rows}


def compression(run_dir: Path) -> dict:
    """A compact run's compression (done when it completed): its file against the same tensors
    uncompressed, and the seconds it took, from run.json."""
    recording = json.loads((run_dir / "run.json").read_text())["recording"]
    ratio = recording["uncompressed_bytes"] / recording["bytes"]
    return {"ratio": ratio, "compress_s": recording["compress_s"],
            "mb_per_s": recording["uncompressed_bytes"] / recording["compress_s"] / 1e6}


def main(steps: int, rounds: int, precisions: list[str], out_json: Path, work: Path) -> None:
    results: dict = {"steps": steps, "speed": {}, "bytes": {}, "reference_bytes": {}}
    for precision in precisions:
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for fmt in FORMATS:
                got = train(work / f"{precision}-{fmt}", steps, precision, fmt)
                if fmt not in best or got["steps_per_s"] > best[fmt]["steps_per_s"]:
                    best[fmt] = got
        results["speed"][precision] = {fmt: best[fmt]["steps_per_s"] for fmt in FORMATS}
        results["bytes"][precision] = {fmt: best[fmt]["bytes"] for fmt in FORMATS}
        exp = load_runs(EXPERIMENT, [f"train.precision={precision}"])[0].experiment
        results["reference_bytes"][precision] = {fmt: recording_size(exp, fmt) for fmt in FORMATS}
    first = precisions[0]
    results["reads"] = {fmt: reads(work / f"{first}-{fmt}" / "recording.safetensors") for fmt in FORMATS}
    results["compression"] = {p: compression(work / f"{p}-compact") for p in precisions}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"mode": "compact", "cpu": describe_cpu(), "results": results}, indent=2) + "\n")
    print(describe_cpu())
    print(f"{steps} steps, best of {rounds}")
    for precision in precisions:
        speed, size, ref = (results[k][precision] for k in ("speed", "bytes", "reference_bytes"))
        ratio = results["compression"][precision]["ratio"] * 2**20
        print(f"{precision:<11} steps/s full {speed['full']:.1f} compact {speed['compact']:.1f} "
              f"({speed['compact'] / speed['full']:.3f}x); bytes {size['full'] / 2**20:.1f} -> "
              f"{size['compact'] / 2**20:.1f} MiB ({size['full'] / size['compact']:.2f}x smaller); reference run "
              f"{ref['full'] / 2**20:.1f} -> {ref['compact'] / 2**20:.1f} MiB uncompressed, "
              f"~{ref['compact'] / ratio:.1f} MiB at this run's compression")
    for fmt, r in results["reads"].items():
        print(f"read {fmt:<8} ({first}, {r['rows']} rows): one row of W median {r['one_row_ms_median']:.1f} ms, "
              f"max {r['one_row_ms_max']:.1f} ms; all rows of W, momentum, variance {r['all_rows_s']:.2f} s")
    for precision, c in results["compression"].items():
        print(f"compression of {precision}'s compact recording: {c['ratio']:.3f}x smaller than uncompressed, "
              f"{c['compress_s']:.2f} s at the end of the run ({c['mb_per_s']:.0f} MB/s)")
    print(f"\nresults: {out_json}")
