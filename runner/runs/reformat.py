"""`lilgatsby compact` and `lilgatsby expand` of run directories, on a disk or in a bucket: the run's
lock, the atomic replacement of its recording, its manifest (`runner.recording.convert` rewrites the
bytes)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runner.errors import RunLocked, UserError
from runner.files import publish
from runner.layout import CONVERTING, partial, recording_of
from runner.recording.convert import rewrite
from runner.runs.rundir import is_training, read_manifest, run_lock, write_manifest
from runner.storage.location import Location, at
from runner.text import mib


@contextlib.contextmanager
def _held(run_dir: Location) -> Iterator[None]:
    """No trainer starts on the run while its recording is replaced (a bucket's lease is only checked)."""
    if is_training(run_dir):
        raise RunLocked(f"{run_dir}: its run is training; compact it when it is complete (nothing changed)")
    if run_dir.local is None:
        yield
        return
    with run_lock(run_dir.local):
        yield


def compact_run(path: Location, progress: bool = True) -> str:
    """Replace a complete run's full recording by its compact form, once the compact one reads back
    equal to it in every bit; returns what was done, as one line. Interrupted, the run keeps its
    full recording (the compact one is written under another name and renamed over it)."""
    recording = recording_of(path)
    run_dir = recording.parent
    if not recording.exists():
        raise UserError(f"{recording}: missing (only a complete run's recording compacts)")
    with _held(run_dir):
        with recording.local_copy() as source, _scratch(run_dir) as scratch:
            full = source.stat().st_size
            target = scratch / CONVERTING
            for stale in (target, partial(target)):  # an interrupted conversion's
                stale.unlink(missing_ok=True)
            summary = rewrite(source, target, compact=True, progress=progress, desc=str(run_dir.name))
            size = target.stat().st_size
            if run_dir.local is not None:
                publish(target, source)
            else:
                recording.upload(target)
        manifest = read_manifest(run_dir)
        if manifest is not None and "recording" in manifest:
            manifest["recording"].update(bytes=size, **summary)
            write_manifest(run_dir, manifest)
    return (f"{recording}: compact, {mib(full)} -> {mib(size)} ({full / size:.1f}x smaller), {summary['keyframes']} "
            f"keyframes ({summary['unscheduled_keyframes']} where the replay differed)")


def expand_run(path: Location, out: str, progress: bool = True) -> str:
    """Write the full-format recording of a run (or recording) in either format to `out` (a local
    path or s3://); returns what was done, as one line."""
    recording, target = recording_of(path), at(out, "--out")
    if not recording.exists():
        raise UserError(f"{recording}: missing")
    if target.exists():
        raise UserError(f"{target}: exists already (nothing written)")
    with recording.local_copy() as source:
        if target.local is not None:
            target.local.parent.mkdir(parents=True, exist_ok=True)
            rewrite(source, target.local, compact=False, progress=progress, desc=target.name)
            size = target.local.stat().st_size
        else:
            with tempfile.TemporaryDirectory() as scratch:
                local = Path(scratch) / target.name
                rewrite(source, local, compact=False, progress=progress, desc=target.name)
                size = local.stat().st_size
                target.upload(local)
    return f"{target}: the full recording of {recording} ({mib(size)})"


@contextlib.contextmanager
def _scratch(run_dir: Location) -> Iterator[Path]:
    """Where the compact file is written: beside the recording on a disk (so the rename is atomic),
    a temporary directory for a bucket's."""
    if run_dir.local is not None:
        yield run_dir.local
        return
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(scratch)
