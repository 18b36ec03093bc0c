"""One run wherever its home is: here, or in a bucket. A bucket's run is leased, its scratch
directory rebuilt from the bucket (a resume on any node), trained there as a local run is, and
published (`runner.launch.staging`)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from runner.config import Experiment
from runner.launch.staging import Publisher, restore
from runner.launch.train import run
from runner.layout import RunFiles
from runner.runs.rundir import is_complete, read_manifest
from runner.storage.lease import Lease
from runner.storage.location import Location
from runner.storage.s3 import store
from runner.storage.uri import S3Uri

log = logging.getLogger(__name__)
SCRATCH_ENV = "LILGATSBY_SCRATCH"


def train_at(exp: Experiment, home: Location, **options) -> dict:
    """`runner.launch.train.run` into a run directory wherever it is (`lilgatsby train` and each
    sweep task call this): here, or in a bucket (`train_remote`). The same options and result."""
    if home.local is not None:
        return run(exp, home.local, **options)
    return train_remote(exp, home, **options)


def scratch_dir(home: S3Uri) -> Path:
    """Where a run of the bucket trains on this node: `$LILGATSBY_SCRATCH` (default: the system's
    temporary directory) / lilgatsby-scratch / bucket / key."""
    root = Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "lilgatsby-scratch")
    return root / home.bucket / home.key


def train_remote(exp: Experiment, home: Location, *, restart: bool = False, force: bool = False, **run_kwargs) -> dict:
    """`runner.launch.train.run` for a run directory in a bucket; the same arguments and result.
    The scratch directory is rebuilt from the bucket at each start (never trusted from an earlier
    attempt on this node) and removed at the end."""
    if home.s3 is None:
        raise ValueError(f"{home}: not a run directory in a bucket")
    scratch = scratch_dir(home.s3)
    home.parent.probe()  # each worker checks its own credentials and reach before training
    with Lease(store(), home.s3) as lease:
        if not force and is_complete(home, exp):
            return read_manifest(home) or {}
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            if restart or force:
                RunFiles(home).checkpoint.delete()
                RunFiles(home).parts.delete_tree()
                rows = 0
            else:
                rows = restore(home, scratch, exp)
            publisher = Publisher(home, scratch, exp, lease, rows_shipped=rows)
            return run(exp, scratch, restart=False, force=True, publisher=publisher, **run_kwargs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
