"""Small files (manifests, indexes, progress, metrics tables) at a local path or in a bucket: read
whole, written whole (atomically on a disk, as one PUT in a bucket)."""

from __future__ import annotations

from pathlib import Path

from runner.files import write_atomic
from runner.storage.uri import S3Uri


def read_bytes(path: Path | S3Uri) -> bytes | None:
    """The file's bytes, or None when it does not exist (other errors raise)."""
    if isinstance(path, S3Uri):
        from runner.storage.s3 import store

        return store().get_bytes(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_text(path: Path | S3Uri, text: str) -> None:
    if isinstance(path, S3Uri):
        from runner.storage.s3 import store

        store().put_bytes(path, text.encode())
    else:
        write_atomic(path, text)
