"""One run whose home is a bucket: lease it, rebuild its scratch directory from the bucket (a
resume on any node), train there as a local run does, and publish (`runner.storage.staging`)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from runner.config import Experiment
from runner.runs.rundir import is_complete, read_manifest
from runner.storage.lease import Lease
from runner.storage.s3 import store
from runner.storage.staging import PARTS, Publisher, restore
from runner.storage.uri import S3Uri
from runner.training.checkpoint import CHECKPOINT

log = logging.getLogger(__name__)
SCRATCH_ENV = "LILGATSBY_SCRATCH"


def scratch_dir(home: S3Uri) -> Path:
    """Where a run of the bucket trains on this node: `$LILGATSBY_SCRATCH` (default: the system's
    temporary directory) / lilgatsby-scratch / bucket / key."""
    root = Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "lilgatsby-scratch")
    return root / home.bucket / home.key


def train_remote(exp: Experiment, home: S3Uri, *, restart: bool = False, force: bool = False, **run_kwargs) -> dict:
    """`runner.launch.train.run` for a run directory in a bucket; the same arguments and result.
    The scratch directory is rebuilt from the bucket at each start (never trusted from an earlier
    attempt on this node) and removed at the end."""
    from runner.launch.train import run

    objects = store()
    objects.probe(home.parent)  # each worker checks its own credentials and reach before training
    with Lease(objects, home) as lease:
        if not force and is_complete(home, exp):
            return read_manifest(home) or {}
        scratch = scratch_dir(home)
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            if restart or force:
                objects.delete([home / CHECKPOINT])
                objects.delete_below(home / PARTS)
                rows = 0
            else:
                rows = restore(objects, home, scratch, exp)
            publisher = Publisher(objects, home, scratch, exp, lease, rows_shipped=rows)
            return run(exp, scratch, restart=False, force=True, publisher=publisher, **run_kwargs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
