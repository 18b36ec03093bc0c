"""One run wherever its home is: here, or in a bucket. A bucket's run is leased, its scratch
directory rebuilt from the bucket (a resume on any node), trained there as a local run is, and
published (`runner.launch.staging`).

Scratch space on a node is bounded: each bucket run holds a lock on `<its scratch>.claim` while it
trains, and every start removes the scratch directories whose claim no live process holds (left
by a trainer that was killed), and the empty folders above them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from runner.config import Experiment
from runner.launch.staging import Publisher, restore
from runner.launch.train import run
from runner.layout import RunFiles
from runner.runs.rundir import claim_run_dir, is_complete, read_manifest
from runner.settings import scratch_root
from runner.storage.lease import Lease
from runner.storage.location import Location
from runner.storage.s3 import store
from runner.storage.uri import S3Uri

log = logging.getLogger(__name__)
CLAIM = ".claim"  # suffix of the file beside a scratch directory that its trainer holds locked


def train_at(exp: Experiment, home: Location, **options) -> dict:
    """`runner.launch.train.run` into a run directory wherever it is (`lilgatsby train` and each
    sweep task call this): here, or in a bucket (`train_remote`). The same options and result.
    A directory that holds anything but this run is refused first (`claim_run_dir`)."""
    claim_run_dir(home, exp, options.get("force", False))
    if home.local is not None:
        return run(exp, home.local, **options)
    return train_remote(exp, home, **options)


def scratch_dir(home: S3Uri) -> Path:
    """Where a run of the bucket trains on this node: `$LILGATSBY_SCRATCH` (default: the system's
    temporary directory / lilgatsby-scratch) / bucket / key."""
    return scratch_root() / home.bucket / home.key


@contextlib.contextmanager
def _claimed(scratch: Path) -> Iterator[None]:
    """Hold `<scratch>.claim` locked (released when the process dies) and remove the scratch
    directory, its claim and the empty folders above them at the end."""
    claim = scratch.with_name(scratch.name + CLAIM)
    claim.parent.mkdir(parents=True, exist_ok=True)
    with open(claim, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            claim.unlink(missing_ok=True)
    _remove_empty_parents(claim.parent)


def _remove_empty_parents(folder: Path) -> None:
    root = scratch_root()
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            return
        folder = folder.parent


def clear_stale_scratch() -> list[Path]:
    """Remove the scratch directories on this node that no live trainer claims; returns them."""
    removed = []
    for claim in sorted(scratch_root().rglob(f"*{CLAIM}")):
        with open(claim, "a") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its trainer is alive
            scratch = claim.with_name(claim.name.removesuffix(CLAIM))
            shutil.rmtree(scratch, ignore_errors=True)
            claim.unlink(missing_ok=True)
            removed.append(scratch)
        _remove_empty_parents(claim.parent)
    if removed:
        log.info("removed %d scratch %s left by killed trainers", len(removed),
                 "directory" if len(removed) == 1 else "directories")
    return removed


def train_remote(exp: Experiment, home: Location, *, restart: bool = False, force: bool = False, **run_kwargs) -> dict:
    """`runner.launch.train.run` for a run directory in a bucket; the same arguments and result.
    The scratch directory is rebuilt from the bucket at each start (never trusted from an earlier
    attempt on this node) and removed at the end."""
    if home.s3 is None:
        raise ValueError(f"{home}: not a run directory in a bucket")
    home.parent.probe()  # each worker checks its own credentials and reach before training
    clear_stale_scratch()
    scratch = scratch_dir(home.s3)
    with Lease(store(), home.s3) as lease:
        if not force and is_complete(home, exp):  # completed meanwhile, or killed in its cleanup
            _forget_progress(home)
            return read_manifest(home) or {}
        with _claimed(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            if restart or force:
                _forget_progress(home)
                rows = 0
            else:
                rows = restore(home, scratch, exp)
            publisher = Publisher(home, scratch, exp, lease, rows_shipped=rows)
            return run(exp, scratch, restart=False, force=True, publisher=publisher, **run_kwargs)


def _forget_progress(home: Location) -> None:
    """The bucket's checkpoint and recording rows of a run (under its lease)."""
    RunFiles(home).checkpoint.delete()
    RunFiles(home).parts.delete_tree()
