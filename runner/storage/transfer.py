"""Whole directories between a disk and a bucket: a report uploaded, an experiment (or one run)
brought down to a local runs root (`lilgatsby pull`), a recording fetched for a full `verify`."""

from __future__ import annotations

import re
from pathlib import Path

from tqdm import tqdm

from runner.storage.s3 import store
from runner.storage.uri import S3Uri

# What a run keeps in the bucket only while it trains (its lease, checkpoint and recording rows):
# never part of a copy.
TRANSIENT = re.compile(r"(.*/)?(\.lease|checkpoint\.safetensors|recording\.safetensors\.parts/.*|\.lilgatsby-probe-.*)")


def upload_dir(local: Path, uri: S3Uri) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store().upload(path, uri / path.relative_to(local).as_posix())


def download_dir(uri: S3Uri, local: Path, progress: bool = True) -> int:
    """Every object below `uri` (but the transient ones) into `local`, keeping names; returns bytes."""
    objects = {key: size for key, size in store().objects(uri).items() if not TRANSIENT.fullmatch(key)}
    with tqdm(total=sum(objects.values()), unit="B", unit_scale=True, desc=uri.name, disable=not progress,
              dynamic_ncols=True) as bar:
        for key, size in sorted(objects.items()):
            store().download(uri / key, local / key)
            bar.update(size)
    return sum(objects.values())
