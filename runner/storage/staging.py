"""A run whose home is a bucket trains in a local scratch directory; this moves its state between the two.

While it trains, each checkpoint ships what another node needs to continue: the rows the recording
gained since the previous checkpoint (one `rows-<a>-<b>` object: rows a..b-1 of every per-step
tensor), the recording's header (once), the snapshots taken so far, and then the checkpoint
itself, so a checkpoint in the bucket always has every row it needs. `restore` rebuilds the scratch
directory from those on any node. When the run is complete, `publish` uploads the recording
(multipart, parallel parts, streamed from the file), the metrics, tokenizer, snapshots and log,
then `run.json` last: a run whose manifest in the bucket says complete is complete. Then the
checkpoint and the row objects are deleted. Bucket layout: docs/storage.md.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from runner.config import Experiment
from runner.recording.format import RECORDING, partial_path, read_header, recorded_tensors
from runner.runs.rundir import MANIFEST, write_manifest
from runner.storage.lease import Lease
from runner.storage.s3 import ObjectStore, StorageError
from runner.storage.uri import S3Uri
from runner.training.checkpoint import CHECKPOINT
from runner.training.progress import PROGRESS
from runner.training.snapshots import MODELS

log = logging.getLogger(__name__)
PARTS = RECORDING + ".parts"  # in the bucket while a run trains: `header` and `rows-<a>-<b>` objects
HEADER = "header"
_ROWS = re.compile(r"rows-(\d+)-(\d+)")
COPY_BYTES = 1 << 20
# Scratch files that stay on the node: the lock, the partial recording (shipped as row objects),
# the checkpoint (shipped at each checkpoint, deleted at the end) and files being written.
_LOCAL_ONLY = re.compile(r"\.lock|.*\.partial(/.*)?|.*\.tmp|" + re.escape(CHECKPOINT) + "|" + re.escape(MANIFEST))


def rows_key(first: int, stop: int) -> str:
    return f"rows-{first:08d}-{stop:08d}"


def _row_ranges(header: dict, data_start: int, names: tuple[str, ...], first: int, stop: int) -> list[tuple[int, int]]:
    """(file offset, length) of rows first..stop-1 of each per-step tensor, in file order."""
    ranges = []
    for name in names:
        info = header[name]
        begin, end = info["data_offsets"]
        row_bytes = (end - begin) // info["shape"][0]
        ranges.append((data_start + begin + first * row_bytes, (stop - first) * row_bytes))
    return ranges


def _header_of(path: Path) -> tuple[int, dict]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size, header = read_header(lambda offset, n: os.pread(fd, n, offset))
    finally:
        os.close(fd)
    return 8 + size, header


class Publisher:
    """Ships a scratch run directory's state to its home in the bucket (see the module docstring)."""

    def __init__(self, store: ObjectStore, home: S3Uri, scratch: Path, exp: Experiment, lease: Lease,
                 rows_shipped: int = 0):
        self.store, self.home, self.scratch, self.exp, self.lease = store, home, scratch, exp, lease
        self.rows_shipped = rows_shipped  # rows 0..rows_shipped-1 are in the bucket's row objects
        # snapshot and tokenizer files in the bucket already (those `restore` brought down are)
        self.shipped = {p.relative_to(scratch).as_posix() for p in (scratch / MODELS).rglob("*") if p.is_file()}

    def checkpoint_saved(self, step: int) -> None:
        self.lease.check()
        stop = step // self.exp.record.every + 1
        partial = partial_path(self.scratch / RECORDING)
        data_start, header = _header_of(partial)
        if self.rows_shipped == 0:
            with open(partial, "rb") as f:
                self.store.put_bytes(self.home / PARTS / HEADER, f.read(data_start))
        if stop > self.rows_shipped:
            segment = self.scratch / f"{rows_key(self.rows_shipped, stop)}.tmp"
            _copy_ranges(partial, segment, _row_ranges(header, data_start, recorded_tensors(self.exp),
                                                       self.rows_shipped, stop))
            try:
                self.store.upload(segment, self.home / PARTS / rows_key(self.rows_shipped, stop))
            finally:
                segment.unlink()
        self._upload_files(f"{MODELS}/")
        self.store.upload(self.scratch / CHECKPOINT, self.home / CHECKPOINT)
        self._upload_files(PROGRESS)
        self.rows_shipped = stop

    def manifest_written(self, manifest: dict) -> None:
        status = manifest.get("status")
        if status == "complete":
            self.lease.check()
            self._upload_files("")
            write_manifest(self.home, manifest)  # last: the bucket's word that the run is complete
            self.store.delete([self.home / CHECKPOINT])
            self.store.delete_below(self.home / PARTS)
        elif status == "running":
            self.lease.check()
            write_manifest(self.home, manifest)
        else:  # failed or cancelled: say so if the server can still hear it
            try:
                write_manifest(self.home, manifest)
                self._upload_files("train.log")
            except StorageError as e:
                log.warning("%s: could not record the run's end in the bucket: %s", self.home, e)

    def _upload_files(self, prefix: str) -> None:
        """The scratch files whose relative path starts with `prefix` (except local-only ones); a
        snapshot or tokenizer file once, the rest each time."""
        for path in sorted(p for p in self.scratch.rglob("*") if p.is_file()):
            relative = path.relative_to(self.scratch).as_posix()
            if not relative.startswith(prefix) or _LOCAL_ONLY.fullmatch(relative) or ".partial/" in relative:
                continue
            if relative in self.shipped:
                continue
            self.store.upload(path, self.home / relative)
            if relative.startswith((f"{MODELS}/", "tokenizer/")):
                self.shipped.add(relative)


def _copy_ranges(source: Path, target: Path, ranges: list[tuple[int, int]]) -> None:
    """Concatenate byte ranges of `source` into `target`, in bounded memory."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        for offset, length in ranges:
            src.seek(offset)
            while length:
                block = src.read(min(COPY_BYTES, length))
                if not block:
                    raise EOFError(f"{source}: ends before byte {offset + length:,}")
                dst.write(block)
                length -= len(block)


class _RangeWriter:
    """A file-like sink that writes consecutive bytes into a list of (offset, length) ranges."""

    def __init__(self, fd: int, ranges: list[tuple[int, int]]):
        self.fd, self.ranges = fd, list(ranges)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self.ranges:
                raise ValueError("a row object holds more bytes than its rows")
            offset, length = self.ranges[0]
            n = min(length, len(view))
            os.pwrite(self.fd, view[:n], offset)
            view = view[n:]
            self.ranges[0] = (offset + n, length - n)
            if length == n:
                self.ranges.pop(0)


def _tiling(objects: dict[str, int], stop: int) -> list[tuple[int, int]] | None:
    """Row objects covering rows 0..stop-1 end to end, or None when there is a gap."""
    spans: dict[int, int] = {}
    for key in objects:
        match = _ROWS.fullmatch(key)
        if match:
            spans[int(match[1])] = max(int(match[2]), spans.get(int(match[1]), 0))
    chain, row = [], 0
    while row < stop:
        end = spans.get(row)
        if end is None or end > stop:
            return None
        chain.append((row, end))
        row = end
    return chain


def restore(store: ObjectStore, home: S3Uri, scratch: Path, exp: Experiment) -> int:
    """Rebuild the scratch run directory from the bucket: its last checkpoint, the partial recording
    up to it, its snapshots and log. Returns the rows restored (0: nothing to resume; the run starts over).
    A checkpoint that is there but cannot be downloaded fails the run (StorageError): it is kept."""
    from safetensors import safe_open

    if store.head(home / CHECKPOINT) is None:
        return 0
    store.download(home / CHECKPOINT, scratch / CHECKPOINT)
    with safe_open(str(scratch / CHECKPOINT), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("run_id") != exp.run_id:
        (scratch / CHECKPOINT).unlink()
        return 0
    step = int(meta["step"])
    stop = step // exp.record.every + 1
    objects = store.objects(home / PARTS)
    chain = _tiling(objects, stop) if HEADER in objects else None
    if chain is None:
        log.warning("%s: a checkpoint at step %d but not the recording's rows up to it; starting over", home, step)
        (scratch / CHECKPOINT).unlink()
        return 0
    head = store.get_bytes(home / PARTS / HEADER) or b""
    size, header = read_header(lambda offset, n: head[offset:offset + n])
    data_start = 8 + size
    end = data_start + max(t["data_offsets"][1] for name, t in header.items() if name != "__metadata__")
    partial = partial_path(scratch / RECORDING)
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, end)
        os.pwrite(fd, head, 0)
        for first, last in chain:
            sink = _RangeWriter(fd, _row_ranges(header, data_start, recorded_tensors(exp), first, last))
            store.stream_to(home / PARTS / rows_key(first, last), sink.write)
            if sink.ranges:
                raise StorageError(f"{home / PARTS / rows_key(first, last)}: shorter than rows {first}..{last - 1}")
        os.fsync(fd)
    finally:
        os.close(fd)
    for relative in store.objects(home):
        snapshot = re.fullmatch(rf"{MODELS}/step-(\d+)/.+", relative)
        if relative == "train.log" or (snapshot and int(snapshot[1]) <= step):
            store.download(home / relative, scratch / relative)
    log.info("%s: restored from the bucket: checkpoint at step %d, %d recording rows", home, step, stop)
    return stop
