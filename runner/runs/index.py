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
from runner.errors import UserError
from runner.layout import INDEX_CSV, INDEX_JSONL, MANIFEST, RECORDING
from runner.runs.rundir import UnreadableManifest, read_manifest, recording_ok
from runner.storage.location import Location, at

UNREADABLE = "unreadable"  # the status of a run whose run.json does not parse
# Leading columns of the index, in order; the flattened config (dotted keys) follows them.
COLUMNS = ("run_id", "name", "status", "grid_point", "swept", "seed", "device", "host", "started_at", "ended_at",
           "duration_s", "steps_per_s", "final_loss", "mean_loss_last_100", "dead_tokens", "dead_token_ids",
           "dead_row_norm", "live_row_norm", "dead_cosine", "recording_path", "recording_bytes", "git_commit", "error")


def flatten_config(config: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys: {"train": {"seed": 1}} -> {"train.seed": 1}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def index_row(run_dir: Location, manifest: dict) -> dict:
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
        "dead_token_ids": manifest.get("corpus", {}).get("dead_tokens"),
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


def read_runs(experiment_dir: Location) -> list[tuple[Location, dict | None, dict]]:
    """(run directory, manifest, index row) of every run directory below `experiment_dir`, in grid
    order. A run.json that does not parse gives the row of an `unreadable` run and no manifest."""
    runs: list[tuple[Location, dict | None, dict]] = []
    for run_dir in experiment_dir.children():
        try:
            manifest = read_manifest(run_dir)
        except UnreadableManifest as e:
            runs.append((run_dir, None, {"run_id": run_dir.name, "status": UNREADABLE, "error": str(e)}))
            continue
        if manifest is not None:
            runs.append((run_dir, manifest, index_row(run_dir, manifest)))
    return sorted(runs, key=lambda run: grid_order(run[2]))


def rebuild_index(experiment_dir: Path | Location) -> list[dict]:
    """Rewrite index.jsonl and index.csv (atomically) from the run manifests below `experiment_dir`."""
    rows = [row for _, _, row in read_runs(at(experiment_dir))]
    write_index(at(experiment_dir), rows)
    return rows


def write_index(experiment_dir: Location, rows: list[dict]) -> None:
    (experiment_dir / INDEX_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    (experiment_dir / INDEX_CSV).write_text(buffer.getvalue())


def experiment_dirs(root: Location) -> list[Location]:
    """`root` itself if it holds run directories, else its subdirectories that do (from one listing)."""
    manifests = [key.split("/") for key in root.files() if key.endswith(f"/{MANIFEST}")]
    if any(len(parts) == 2 for parts in manifests):
        return [root]
    return [root / name for name in sorted({parts[0] for parts in manifests if len(parts) == 3})]


def load_index(path: str | Path) -> pd.DataFrame:
    """Rows of an index (index.jsonl, or an experiment directory holding one; local or
    `s3://bucket/prefix/<experiment>`) as a DataFrame."""
    given = at(path)
    where = given / INDEX_JSONL if given.is_dir() else given
    data = where.read_bytes()
    if data is None:
        experiment_dir = where.parent if where.name == INDEX_JSONL else where
        if not experiment_dir.is_dir():
            raise UserError(f"{experiment_dir}: no such experiment directory: no run of it has been trained here "
                            f"(train or sweep its experiment file; a bucket's runs root: s3://bucket/prefix/<name>)")
        raise UserError(f"{where}: no such index (`lilgatsby index {experiment_dir}` rebuilds it)")
    return pd.read_json(io.BytesIO(data), lines=True, dtype=False)
