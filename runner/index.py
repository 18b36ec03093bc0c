"""Run directories: their manifests (run.json, the source of truth), their lock, and the
per-experiment index built from them. No model code here: a sweep's driver uses this module only.

`<runs root>/<experiment>/index.jsonl` and `index.csv` hold one row per run directory
`<runs root>/<experiment>/<run id>/`. Analysis starts with `load_index(path)`.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from runner.config import Experiment, UserError
from runner.record import RECORDING
from runner.verify import verify

MANIFEST = "run.json"
INDEX_JSONL, INDEX_CSV = "index.jsonl", "index.csv"
# Leading columns of the index, in order; the flattened config (dotted keys) follows them.
COLUMNS = ("run_id", "name", "status", "swept", "seed", "device", "host", "started_at", "ended_at",
           "duration_s", "steps_per_s", "final_loss", "mean_loss_last_100", "dead_tokens", "dead_row_norm",
           "live_row_norm", "dead_cosine", "recording_path", "recording_bytes", "git_commit", "error")


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: readers never see a torn file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; manifests and indexes are for every reader
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(run_dir: Path, manifest: dict) -> None:
    write_atomic(run_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(run_dir: Path) -> dict | None:
    """The run's manifest, or None when it is missing or unreadable (a run that never started)."""
    try:
        return json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunLocked(UserError):
    """Another process is training this run right now."""


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One trainer per run directory at a time (an advisory lock, released when the process dies)."""
    with open(run_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{run_dir}: another process is training this run") from None
        yield


# A sweep plans with is_complete and rebuilds its index after every run: verify each published
# recording once per process, not once per look. A recording is never modified after it is
# published; a rewrite changes its mtime.
_verified: dict[tuple[str, int, int], bool] = {}


def _recording_ok(path: Path) -> bool:
    """The quick `verify` of a recording, remembered by (path, size, mtime)."""
    try:
        stat = path.stat()
    except OSError:
        return False
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        _verified[key] = not verify(path, full=False)
    return _verified[key]


def is_complete(run_dir: Path, exp: Experiment) -> bool:
    """A finished run: its manifest says complete and its recording has the expected tensors."""
    manifest = read_manifest(run_dir)
    if not manifest or manifest.get("status") != "complete" or manifest.get("run_id") != exp.run_id:
        return False
    return _recording_ok(run_dir / RECORDING)


@torch.no_grad()
def dead_token_summary(W: torch.Tensor, token_counts: list[int]) -> dict:
    """Dead tokens (never in the corpus) vs live ones: row norms of W and the dead rows' mutual cosine."""
    W = W.detach().float().cpu()
    dead = torch.tensor([c == 0 for c in token_counts])
    norms = W.norm(dim=1)
    summary = {"dead_tokens": int(dead.sum()), "dead_row_norm": None, "live_row_norm": None, "dead_cosine": None}
    if dead.any():
        summary["dead_row_norm"] = norms[dead].mean().item()
    if (~dead).any():
        summary["live_row_norm"] = norms[~dead].mean().item()
    if dead.sum() >= 2:
        unit = torch.nn.functional.normalize(W[dead], dim=1)
        cosine = unit @ unit.T
        n = len(unit)
        summary["dead_cosine"] = ((cosine.sum() - cosine.diagonal().sum()) / (n * (n - 1))).item()
    return summary


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def index_row(run_dir: Path, manifest: dict) -> dict:
    metrics = manifest.get("metrics", {})
    recording = manifest.get("recording", {})
    status = manifest.get("status")
    if status == "complete" and not _recording_ok(run_dir / recording.get("path", RECORDING)):
        status = "invalid"  # the manifest says complete but the recording does not check out
    row = {
        "run_id": manifest.get("run_id", run_dir.name),
        "name": manifest.get("name"),
        "status": status,
        "swept": ",".join(manifest.get("overrides", {})),
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
    row.update(_flatten(manifest.get("config", {})))
    return row


def rebuild_index(experiment_dir: Path) -> list[dict]:
    """Rewrite index.jsonl and index.csv (atomically) from the run manifests below `experiment_dir`."""
    rows = [index_row(d, m) for d in sorted(p for p in experiment_dir.iterdir() if p.is_dir())
            if (m := read_manifest(d)) is not None]
    write_atomic(experiment_dir / INDEX_JSONL, "".join(json.dumps(r) + "\n" for r in rows))
    columns = list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    write_atomic(experiment_dir / INDEX_CSV, buffer.getvalue())
    return rows


def experiment_dirs(root: Path) -> list[Path]:
    """`root` itself if it holds run directories, else its subdirectories that do."""
    def holds_runs(d: Path) -> bool:
        return any((p / MANIFEST).exists() for p in d.iterdir() if p.is_dir())
    if holds_runs(root):
        return [root]
    return [d for d in sorted(root.iterdir()) if d.is_dir() and holds_runs(d)]


def load_index(path: str | Path):
    """Rows of an index (index.jsonl, or an experiment directory holding one): a pandas DataFrame
    when pandas is installed, else a list of dicts."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_JSONL
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        import pandas
    except ImportError:
        return rows
    return pandas.DataFrame(rows)
