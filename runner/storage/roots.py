"""Getting a runs directory ready before any run starts: a local one is created, a bucket's is probed."""

from __future__ import annotations

import logging
from pathlib import Path

from runner.errors import ConfigError
from runner.storage.uri import Location

log = logging.getLogger(__name__)


def prepare_runs_dir(directory: Location) -> None:
    """Create a local directory; for `s3://`, check reach, credentials, bucket and write permission
    once (one-line ConfigError) and say if the server ignores conditional writes."""
    if isinstance(directory, Path):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{directory}: cannot create the runs directory ({e.strerror})") from None
        return
    from runner.storage.s3 import store

    if not store().probe(directory):
        log.warning("%s: the S3 server ignores conditional writes (If-None-Match), so run leases do not exclude: "
                    "two sweeps on this bucket at once could train the same run twice", directory)
