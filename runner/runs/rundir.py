"""Run directories: their manifest (run.json, the source of truth), their lock and their
completeness. Training, the sweep's driver, the index and the CLI use it; it imports no model code
(checking a recording imports torch, when it is first needed)."""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

from runner.config import Experiment
from runner.errors import UserError
from runner.files import write_atomic
from runner.recording.format import RECORDING

MANIFEST = "run.json"
# The status and error of a run the user interrupted (train and sweep alike); it resumes from its
# last checkpoint when trained again.
CANCELLED = "cancelled", "cancelled by the user (Ctrl-C); resumable"


def new_manifest(exp: Experiment, overrides: dict | None, grid_point: dict | None) -> dict:
    """The manifest of a run before it has trained: what it is (id, name, config), and what it set on
    top of its experiment file (`overrides`: `--set` values and grid values; `grid_point`: the latter)."""
    return {"run_id": exp.run_id, "name": exp.name, "overrides": overrides or {}, "grid_point": grid_point or {},
            "config": exp.to_dict()}


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


def recording_ok(path: Path) -> bool:
    """The quick `verify` of a recording, remembered by (path, size, mtime)."""
    from runner.recording.verify import verify  # torch: imported when a recording is checked, not by `load_index`

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
    return recording_ok(run_dir / RECORDING)
