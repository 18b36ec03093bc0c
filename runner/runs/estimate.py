"""How long runs will take on this machine, from the speed of runs it has already trained.

`sweep --dry-run` quotes it. A run's speed depends on the model's shape, the batch, the precision,
the kernels, the device and the threads, so only complete runs that match the new run on those
keys and were trained on this host count; with none, the time is said to be unknown.
"""

from __future__ import annotations

import socket
import statistics

from runner.config import Experiment
from runner.runs.index import flatten_config
from runner.runs.rundir import UnreadableManifest, read_manifest
from runner.storage.location import Location

# The config keys that set a run's speed (beyond train.steps, which sets its length).
SPEED_KEYS = ("model.", "train.batch_size", "train.precision", "train.kernels", "train.device", "train.threads",
              "train.targets", "train.optimizer", "train.grad_clip", "record.every", "record.tensors")


def _speed_shape(config: dict) -> dict:
    return {k: v for k, v in flatten_config(config).items() if k.startswith(SPEED_KEYS)}


def measured_speeds(runs_root: Location, host: str | None = None) -> list[tuple[dict, float]]:
    """(speed shape, steps/s) of every complete run under a local `runs_root` trained on `host`
    (this one). Runs in a bucket were trained on the cluster's nodes: none is this host's."""
    host = host or socket.gethostname()
    found = []
    for manifest_dir in runs_root.local.glob("*/*/") if runs_root.local else ():
        try:
            manifest = read_manifest(manifest_dir)
        except UnreadableManifest:
            continue
        if (manifest and manifest.get("status") == "complete" and manifest.get("environment", {}).get("host") == host
                and manifest.get("metrics", {}).get("steps_per_s")):
            found.append((_speed_shape(manifest["config"]), float(manifest["metrics"]["steps_per_s"])))
    return found


def estimate_seconds(exp: Experiment, measured: list[tuple[dict, float]]) -> tuple[float, int] | None:
    """Training seconds of `exp` at the median speed of the measured runs of its shape, and how many
    runs that median is of; None when no run of its shape was measured."""
    shape = _speed_shape(exp.to_dict())
    speeds = [speed for other, speed in measured if other == shape]
    if not speeds:
        return None
    return exp.train.steps / statistics.median(speeds), len(speeds)
