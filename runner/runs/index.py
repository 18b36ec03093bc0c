"""The per-experiment index, built from the run manifests (which stay the source of truth).

`<runs root>/<experiment>/index.jsonl` and `index.csv` hold one row per run directory
`<runs root>/<experiment>/<run id>/`. Analysis starts with `load_index(path)`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from runner.config import point_label
from runner.files import write_atomic
from runner.recording.format import RECORDING
from runner.runs.rundir import MANIFEST, read_manifest, recording_ok

INDEX_JSONL, INDEX_CSV = "index.jsonl", "index.csv"
# Leading columns of the index, in order; the flattened config (dotted keys) follows them.
COLUMNS = ("run_id", "name", "status", "grid_point", "swept", "seed", "device", "host", "started_at", "ended_at",
           "duration_s", "steps_per_s", "final_loss", "mean_loss_last_100", "dead_tokens", "dead_row_norm",
           "live_row_norm", "dead_cosine", "recording_path", "recording_bytes", "git_commit", "error")


def flatten_config(config: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys: {"train": {"seed": 1}} -> {"train.seed": 1}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def index_row(run_dir: Path, manifest: dict) -> dict:
    metrics = manifest.get("metrics", {})
    recording = manifest.get("recording", {})
    status = manifest.get("status")
    if status == "complete" and not recording_ok(run_dir / recording.get("path", RECORDING)):
        status = "invalid"  # the manifest says complete but the recording does not check out
    point = manifest.get("grid_point", manifest.get("overrides", {}))  # before grid_point: the same
    row = {
        "run_id": manifest.get("run_id", run_dir.name),
        "name": manifest.get("name"),
        "status": status,
        "grid_point": point_label(point),
        "swept": ",".join(point),
        "seed": manifest.get("config", {}).get("train", {}).get("seed"),
        "device": manifest.get("device"),
        "host": manifest.get("environment", {}).get("host"),
        "started_at": manifest.get("started_at"),
        "ended_at": manifest.get("ended_at"),
        "duration_s": metrics.get("wall_s"),
        "steps_per_s": metrics.get("steps_per_s"),
        "final_loss": metrics.get("final_loss"),
        "mean_loss_last_100": metrics.get("mean_loss_last_100"),
        **{k: manifest.get("dead_token_summary", {}).get(k) for k in
           ("dead_tokens", "dead_row_norm", "live_row_norm", "dead_cosine")},
        "recording_path": str(run_dir / recording["path"]) if recording.get("path") else None,
        "recording_bytes": recording.get("bytes"),
        "git_commit": manifest.get("environment", {}).get("git_commit"),
        "error": manifest.get("error"),
    }
    row.update(flatten_config(manifest.get("config", {})))
    return row


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def value_order(value: Any) -> tuple:
    """A sort key for config values: numbers by value (0.001 < 0.003 < 0.01), the rest by their text."""
    if is_number(value):
        return (0, value, "")
    return (1, 0, json.dumps(value))


def grid_order(row: dict) -> tuple:
    """Index rows in grid order: by experiment, then by the values of their grid keys in grid order."""
    keys = [k for k in (row.get("swept") or "").split(",") if k]
    return (row.get("name") or "", tuple(value_order(row.get(k)) for k in keys), row["run_id"])


def read_runs(experiment_dir: Path) -> list[tuple[Path, dict, dict]]:
    """(run directory, manifest, index row) of every run directory below `experiment_dir`, in grid order."""
    runs = [(d, m, index_row(d, m)) for d in experiment_dir.iterdir() if d.is_dir() and (m := read_manifest(d))]
    return sorted(runs, key=lambda run: grid_order(run[2]))


def rebuild_index(experiment_dir: Path) -> list[dict]:
    """Rewrite index.jsonl and index.csv (atomically) from the run manifests below `experiment_dir`."""
    rows = [row for _, _, row in read_runs(experiment_dir)]
    write_index(experiment_dir, rows)
    return rows


def write_index(experiment_dir: Path, rows: list[dict]) -> None:
    write_atomic(experiment_dir / INDEX_JSONL, "".join(json.dumps(r) + "\n" for r in rows))
    columns = list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    write_atomic(experiment_dir / INDEX_CSV, buffer.getvalue())


def experiment_dirs(root: Path) -> list[Path]:
    """`root` itself if it holds run directories, else its subdirectories that do."""
    def holds_runs(d: Path) -> bool:
        return any((p / MANIFEST).exists() for p in d.iterdir() if p.is_dir())
    if holds_runs(root):
        return [root]
    return [d for d in sorted(root.iterdir()) if d.is_dir() and holds_runs(d)]


def load_index(path: str | Path) -> pd.DataFrame:
    """Rows of an index (index.jsonl, or an experiment directory holding one) as a DataFrame."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_JSONL
    return pd.read_json(path, lines=True, dtype=False)
