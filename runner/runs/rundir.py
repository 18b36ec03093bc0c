"""Run directories: their manifest (run.json, the source of truth), their lock, their progress
and their completeness. Training, the sweep's driver, the index and the CLI use it; it imports no model code
(checking a recording imports torch, when it is first needed)."""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

from runner.config import Experiment
from runner.errors import ConfigError, RunLocked, UserError
from runner.layout import RunFiles, is_run_file
from runner.recording.rows import layout_matches
from runner.storage.location import Location, at, unless_read_only

# The status of a run interrupted by Ctrl-C or SIGTERM (train and sweep alike; its error says which:
# `runner.interrupt.how_cancelled`); it resumes from its last checkpoint when trained again.
CANCELLED = "cancelled"


def new_manifest(exp: Experiment, overrides: dict | None, grid_point: dict | None) -> dict:
    """The manifest of a run before it has trained: what it is (id, name, config), and what it set on
    top of its experiment file (`overrides`: `--set` values and grid values; `grid_point`: the latter)."""
    return {"run_id": exp.run_id, "name": exp.name, "overrides": overrides or {}, "grid_point": grid_point or {},
            "config": exp.to_dict()}


def write_manifest(run_dir: Path | Location, manifest: dict) -> None:
    RunFiles(at(run_dir)).manifest.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


class UnreadableManifest(UserError):
    """A run.json that exists but does not parse: never dropped from the index or written over."""


# The shape of the run.json keys every reader relies on (the index, report, rm, a sweep's planning)
_MANIFEST_SHAPE = {"run_id": str, "name": str, "status": str, "error": str, "config": dict, "overrides": dict,
                   "grid_point": dict, "metrics": dict, "environment": dict, "corpus": dict, "recording": dict,
                   "dead_token_summary": dict, "samples": dict, "threads": int, "device": str}
_JSON_NAMES = {str: "a string", dict: "an object", int: "an integer"}


def _parse_manifest(data: bytes | str, where: object) -> dict:
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        for key, kind in _MANIFEST_SHAPE.items():
            if key in manifest and not isinstance(manifest[key], kind):
                raise ValueError(f"{key} is {json.dumps(manifest[key])[:40]}, not {_JSON_NAMES[kind]}")
        return manifest
    except (ValueError, UnicodeDecodeError) as e:
        raise UnreadableManifest(f"{where}: unreadable ({str(e).splitlines()[0]}); left as it is: fix or "
                                 f"remove it") from None


def read_manifest(run_dir: Path | Location) -> dict | None:
    """The run's manifest, or None when there is none yet. One that exists but does not parse raises
    UnreadableManifest: the index names it, and nothing writes over it."""
    path = RunFiles(at(run_dir)).manifest
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UnreadableManifest(f"{path}: unreadable ({e.strerror}); left as it is") from None
    return None if data is None else _parse_manifest(data, path)


def is_training(run_dir: Location) -> bool:
    """Its trainer holds the run's lock (a disk) or a live lease (a bucket)."""
    if run_dir.s3 is not None:
        from runner.storage.lease import lease_is_live
        from runner.storage.s3 import store

        return lease_is_live(store(), run_dir.s3)
    assert run_dir.local is not None
    lock = RunFiles(run_dir.local).lock
    if not lock.exists():
        return False
    with open(lock, "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(held, fcntl.LOCK_UN)
    return False


def foreign_files(run_dir: Location) -> list[str]:
    """What a run directory holds that no run writes (`layout.is_run_file`), sorted."""
    return sorted(name for name in run_dir.files() if not is_run_file(name)) if run_dir.is_dir() else []


def listed(names: list[str], at_most: int = 3) -> str:
    return ", ".join(names[:at_most]) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def claim_run_dir(run_dir: Location, exp: Experiment, force: bool) -> None:
    """A run directory belongs to one run. One that holds files no run writes (a user's) is
    refused; one that holds another run is refused unless `force`, which removes that run's files
    first (never while it trains). Nothing is changed by a refusal."""
    foreign = foreign_files(run_dir)
    if foreign:
        raise ConfigError(f"{run_dir}: holds files that are not a run's ({listed(foreign)}): train into an empty "
                          f"directory or the run's own (nothing changed)")
    manifest = read_manifest(run_dir)
    if manifest is None or manifest.get("run_id") == exp.run_id:
        return
    other = f"run {manifest.get('run_id')} of {manifest.get('name')!r}"
    if not force:
        raise ConfigError(f"{run_dir}: holds {other}, not {exp.run_id}: --force removes its files and trains this "
                          f"run there (nothing changed)")
    if is_training(run_dir):
        raise RunLocked(f"{run_dir}: holds {other}, which another process is training (nothing changed)")
    run_dir.delete_tree()


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One trainer per run directory at a time (an advisory lock, released when the process dies)."""
    with open(RunFiles(run_dir).lock, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{run_dir}: another process is training this run") from None
        yield


# A sweep plans with is_complete and rebuilds its index after every run: verify each published
# recording once per process, not once per look. A recording is never modified after it is
# published; a rewrite changes its mtime.
_verified: dict[tuple[str, int, int], bool] = {}


def recording_ok(recording: Location) -> bool:
    """The quick `verify` of a recording, remembered by (path, size, mtime). In a bucket: its header
    and size (a ranged read; the recording is not downloaded)."""
    path = recording.local
    if path is None:
        return layout_matches(recording)
    from runner.recording.verify import verify  # torch: imported when a recording is checked, not by `load_index`

    try:
        stat = path.stat()
    except OSError:
        return False
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        _verified[key] = not verify(path, full=False)
    return _verified[key]


def is_complete(run_dir: Path | Location, exp: Experiment) -> bool:
    """A finished run: its manifest says complete and its recording has the expected tensors."""
    manifest = read_manifest(run_dir)
    if not manifest or manifest.get("status") != "complete" or manifest.get("run_id") != exp.run_id:
        return False
    return recording_ok(RunFiles(at(run_dir)).recording)


def tidy_complete(run_dir: Location) -> None:
    """A complete bucket run's leftovers from a trainer killed between publishing its run.json and
    its cleanup (its lease, checkpoint, row objects): removed, unless a live trainer holds the
    lease (one training it again with --force). Credentials that may only read leave them."""
    if run_dir.s3 is None:
        return  # a local run leaves no lease, and its lock goes with its process
    from runner.storage.lease import lease_is_live, remove_transients
    from runner.storage.s3 import store

    if not lease_is_live(store(), run_dir.s3):
        with unless_read_only(f"{run_dir}'s leftovers"):
            remove_transients(store(), run_dir.s3)


def read_progress(run_dir: Location) -> dict | None:
    """The run's last progress update (`runner.training.progress` writes it), or None before its
    first (or when unreadable). In a bucket, the one its last checkpoint shipped."""
    try:
        data = RunFiles(run_dir).progress.read_bytes()
        return None if data is None else json.loads(data)
    except (OSError, ValueError):
        return None
