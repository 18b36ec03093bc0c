"""Runs roots, run and experiment locations as text: a local path, or `s3://bucket/prefix`.

Parsing is the only thing here, so every command can tell a bucket from a directory (and refuse a
malformed URI or a scheme it does not speak) without importing boto3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runner.errors import ConfigError

SCHEME = "s3://"
# S3's bucket naming rules (3-63 of lowercase letters, digits, dots and hyphens; a letter or digit at each end)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class S3Uri:
    """`s3://bucket/key`; `key` has no leading or trailing slash ('' is the bucket's root)."""

    bucket: str
    key: str

    def __truediv__(self, name: str) -> S3Uri:
        return S3Uri(self.bucket, f"{self.key}/{name}" if self.key else name)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> S3Uri:
        return S3Uri(self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def prefix(self) -> str:
        """The key prefix of everything below this location ('dir/')."""
        return f"{self.key}/" if self.key else ""

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"


def parse_location(text: str, what: str = "path") -> Path | S3Uri:
    """A local path as a Path, `s3://bucket/prefix` as an S3Uri; any other scheme, or an S3 URI
    that is not one, is a one-line ConfigError naming `what` (e.g. `--runs`)."""
    match = _SCHEME.match(text)
    if not match:
        return Path(text)
    if not text.startswith(SCHEME):
        raise ConfigError(f"{what}: {text}: unsupported scheme {match.group(1)!r} (a local path or s3://bucket/prefix)")
    bucket, _, key = text[len(SCHEME):].partition("/")
    key = key.strip("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"{what}: {text}: {bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, "
                          f"dots and hyphens)")
    if "//" in key or any(part in (".", "..") for part in key.split("/")):
        raise ConfigError(f"{what}: {text}: empty, '.' or '..' parts in the key prefix")
    return S3Uri(bucket, key)

