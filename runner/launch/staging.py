"""A run whose home is a bucket trains in a local scratch directory; this moves its state between the two.

While it trains, each checkpoint ships what another node needs to continue: the rows the recording
gained since the previous checkpoint (one `rows-<a>-<b>` object: rows a..b-1 of every per-step
tensor, and a compact recording's keyframes of those rows), the recording's header (once; a compact
recording's at each checkpoint, since it lists the keyframes), the snapshots taken so far, the live metrics and event
file as they stand (what a report or TensorBoard of the running run reads), and then the checkpoint
itself, so a checkpoint in the bucket always has every row it needs. `restore` rebuilds the scratch
directory from those on any node. When the run is complete, `publish` uploads the recording
(multipart, parallel parts, streamed from the file), the metrics, tokenizer, snapshots and log,
then `run.json` last: a run whose manifest in the bucket says complete is complete. Then the
checkpoint, the live metrics and the row objects are deleted. Bucket layout: docs/storage.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from runner.config import Experiment
from runner.layout import (
    EVENTS,
    MODELS,
    PARTIAL_METRICS,
    PARTS_HEADER,
    PROGRESS,
    TMP,
    TRAIN_LOG,
    RunFiles,
    is_local_only,
    is_shipped_once,
    row_span,
    rows_key,
    snapshot_step,
)
from runner.recording.format import KEYFRAMES, Header, read_header, recorded_tensors
from runner.runs.rundir import write_manifest
from runner.storage.lease import Lease
from runner.storage.location import Location
from runner.storage.s3 import StorageError

log = logging.getLogger(__name__)
COPY_BYTES = 1 << 20


def _header_of(path: Path) -> Header:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_header(lambda offset, n: os.pread(fd, n, offset))
    finally:
        os.close(fd)


class Publisher:
    """Ships a scratch run directory's state to its home in the bucket (see the module docstring)."""

    def __init__(self, home: Location, scratch: Path, exp: Experiment, lease: Lease, rows_shipped: int = 0):
        self.home, self.scratch, self.exp, self.lease = RunFiles(home), RunFiles(scratch), exp, lease
        self.rows_shipped = rows_shipped  # rows 0..rows_shipped-1 are in the bucket's row objects
        # snapshot and tokenizer files in the bucket already (those `restore` brought down are)
        self.shipped = {p.relative_to(scratch).as_posix() for p in self.scratch.models.rglob("*") if p.is_file()}

    def checkpoint_saved(self, step: int) -> None:
        self.lease.check()
        stop = step // self.exp.record.every + 1
        partial = self.scratch.partial_recording
        header = _header_of(partial)
        if self.rows_shipped == 0 or KEYFRAMES in header.tensors:  # a compact one's lists its keyframes so far
            with open(partial, "rb") as f:
                (self.home.parts / PARTS_HEADER).write_bytes(f.read(header.data_start))
        if stop > self.rows_shipped:
            segment = self.scratch.root / f"{rows_key(self.rows_shipped, stop)}{TMP}"
            _copy_ranges(partial, segment,
                         header.segment_ranges(recorded_tensors(self.exp), self.rows_shipped, stop))
            try:
                self.home.rows(self.rows_shipped, stop).upload(segment)
            finally:
                segment.unlink()
        self._upload_files(f"{MODELS}/")
        if self.scratch.partial_metrics.exists():
            self.home.partial_metrics.upload(self.scratch.partial_metrics)
        self._upload_files(EVENTS)
        self.home.checkpoint.upload(self.scratch.checkpoint)
        self._upload_files(PROGRESS)
        self.rows_shipped = stop

    def manifest_written(self, manifest: dict) -> None:
        status = manifest.get("status")
        if status == "complete":
            self.lease.check()
            self._upload_files("")
            write_manifest(self.home.root, manifest)  # last: the bucket's word that the run is complete
            self.home.checkpoint.delete()
            self.home.partial_metrics.delete()
            self.home.parts.delete_tree()
        elif status == "running":
            self.lease.check()
            write_manifest(self.home.root, manifest)
        else:  # failed or cancelled: say so if the server can still hear it
            try:
                write_manifest(self.home.root, manifest)
                self._upload_files(TRAIN_LOG)
            except StorageError as e:
                log.warning("%s: could not record the run's end in the bucket: %s", self.home.root, e)

    def _upload_files(self, prefix: str) -> None:
        """The scratch files whose relative path starts with `prefix` (except local-only ones); a
        snapshot or tokenizer file once, the rest each time."""
        for path in sorted(p for p in self.scratch.root.rglob("*") if p.is_file()):
            relative = path.relative_to(self.scratch.root).as_posix()
            if not relative.startswith(prefix) or is_local_only(relative) or relative in self.shipped:
                continue
            (self.home.root / relative).upload(path)
            if is_shipped_once(relative):
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
        span = row_span(key)
        if span:
            spans[span[0]] = max(span[1], spans.get(span[0], 0))
    chain, row = [], 0
    while row < stop:
        end = spans.get(row)
        if end is None or end > stop:
            return None
        chain.append((row, end))
        row = end
    return chain


def restore(home_dir: Location, scratch_dir: Path, exp: Experiment) -> int:
    """Rebuild the scratch run directory from the bucket: its last checkpoint, the partial recording
    up to it, its snapshots, log, live metrics and event file. Returns the rows restored (0: nothing
    to resume; the run starts over). A checkpoint that is there but cannot be downloaded fails the
    run (StorageError): it is kept."""
    from safetensors import safe_open

    home, scratch = RunFiles(home_dir), RunFiles(scratch_dir)
    if not home.checkpoint.exists():
        return 0
    home.checkpoint.download(scratch.checkpoint)
    with safe_open(str(scratch.checkpoint), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("run_id") != exp.run_id:
        scratch.checkpoint.unlink()
        return 0
    step = int(meta["step"])
    stop = step // exp.record.every + 1
    objects = home.parts.files()
    chain = _tiling(objects, stop) if PARTS_HEADER in objects else None
    if chain is None:
        log.warning("%s: a checkpoint at step %d but not the recording's rows up to it; starting over",
                    home.root, step)
        scratch.checkpoint.unlink()
        return 0
    head = (home.parts / PARTS_HEADER).read_bytes() or b""
    header = read_header(lambda offset, n: head[offset:offset + n])
    fd = os.open(scratch.partial_recording, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, header.end)
        os.pwrite(fd, head, 0)
        for first, last in chain:
            sink = _RangeWriter(fd, header.segment_ranges(recorded_tensors(exp), first, last))
            for block in home.rows(first, last).stream():
                sink.write(block)
            if sink.ranges:
                raise StorageError(f"{home.rows(first, last)}: shorter than rows {first}..{last - 1}")
        os.fsync(fd)
    finally:
        os.close(fd)
    for relative in home_dir.files():
        snapshot = snapshot_step(relative)
        if relative in (TRAIN_LOG, EVENTS, PARTIAL_METRICS) or (snapshot is not None and snapshot <= step):
            (home_dir / relative).download(scratch_dir / relative)
    log.info("%s: restored from the bucket: checkpoint at step %d, %d recording rows", home.root, step, stop)
    return stop
