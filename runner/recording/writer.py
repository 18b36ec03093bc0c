"""Per-step recordings: one safetensors file, written row by row while training runs.

The safetensors library writes whole in-memory tensors; a 10,000-step recording is ~943 MiB,
so this module lays the file out itself (the format is a JSON header and raw little-endian
tensor bytes) and fills each tensor's rows in place. The header is written first with its size
reserved, rows are buffered in chunks and written by a background thread, and the header is
rewritten with the final metadata at the end. The file lives under `<name>.partial` until it is
complete, then is renamed: a file with the final name is always complete. Reading back is
`runner.recording.verify`'s. A `RowSink` is handed each chunk in the writer thread once it is in
the file (the live metrics, `runner.analysis.live`): whatever it does, the training step never waits for it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from runner.config import Experiment
from runner.errors import UserError
from runner.files import atomic_path, publish
from runner.layout import TMP, partial
from runner.recording.compact import Keyframes, uses_fused_adam
from runner.recording.compression import compress
from runner.recording.digests import RowDigests, reserved_bytes
from runner.recording.format import (
    FORMAT_VERSION,
    HEADER_SLACK,
    KEYFRAMES,
    LENGTH_BYTES,
    UPDATE_TENSORS,
    compact_layout,
    expected_layout,
    header_length,
    parameter_dtype,
    recorded_steps,
    recorded_tensors,
    recording_size,
    tensor_bytes,
)
from runner.recording.replay import TORCH_DTYPES
from runner.recording.rows import BITS, RowReader, as_fp32, round_to_bf16
from runner.text import size_text


class DiskSpaceError(UserError):
    """Not enough free space for a recording; refused before training starts."""


def check_free_space(path: Path, recordings: dict[Path, Experiment]) -> None:
    """Refuse recordings (path -> its run's experiment) that cannot all fit on the disk of `path`
    (one run's, or a sweep's still to write; a resumed one already has its space): the refusal says
    what the compact format would need where the recordings are full."""
    exps = list(recordings.values())
    needed = sum(recording_size(exp) + HEADER_SLACK for where, exp in recordings.items() if not partial(where).exists())
    needed += compression_room([recording_size(exp) for exp in exps if exp.record.format == "compact"])
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        what = "the recording needs" if len(exps) == 1 else f"the recordings of {len(exps)} runs need"
        raise DiskSpaceError(f"{path}: {what} {size_text(needed)} but only {size_text(free)} are free on that disk"
                             f"{compact_hint(exps, free)}")


def compression_room(compact_sizes: list[int]) -> int:
    """A compact recording is compressed into a second file when it completes, beside its
    uncompressed one until that is removed: room for the largest (runs complete one at a time, as
    far as that second is concerned)."""
    return max(compact_sizes, default=0)


def compact_hint(exps: list[Experiment], free: float | None = None) -> str:
    """What recording the full-format ones compact would take, as a clause ("" when none would change);
    with `free`, what the disk check would need and whether it fits."""
    full = [exp for exp in exps if exp.record.format == "full" and exp.record.replayable]
    if not full:
        return ""
    sizes = [recording_size(exp, "compact") for exp in full]
    compact = sum(recording_size(exp) for exp in exps if exp not in full) + sum(sizes)
    if free is not None:  # the disk check's: with the room compressing takes
        compact += compression_room(sizes + [recording_size(exp) for exp in exps if exp.record.format == "compact"])
    fits = "" if free is None else (", which fits" if compact <= free else ", which does not fit either")
    return f"; with record.format: compact: {size_text(compact)}{fits}"


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _as_bytes(t: torch.Tensor) -> memoryview:
    return t.contiguous().view(torch.uint8).numpy().data.cast("B")


class RowSink(Protocol):
    """What is told of the rows as they land in the file (every call but `start` in the writer thread)."""

    def start(self, first_row: int) -> None:
        """Rows 0..first_row-1 are in the file already (a resumed run); none are after them."""

    def rows_written(self, first_row: int, rows: dict[str, np.ndarray], wall_times: list[float]) -> None:
        """Rows first_row.. of every recorded tensor, as fp32, and when each was recorded (Unix time)."""

    def flush(self) -> None:
        """Make what it has been told durable (a checkpoint is about to rely on it)."""

    def close(self) -> None: ...


class RecordingWriter:
    """Streams rows of the per-step tensors into `path` (via `path.partial`)."""

    def __init__(self, path: Path, exp: Experiment, *, metadata: dict[str, str], device: torch.device,
                 first_row: int = 0, chunk_rows: int = 64, sink: RowSink | None = None,
                 checked_digests: dict | None = None, compact: bool = False):
        """`first_row` > 0 continues an existing `.partial` file whose rows before it are written;
        `checked_digests`: the digests of those rows, already checked against the file (a resume's).
        `compact`: the compact format (docs/recording.md), whatever `exp.record.format` says (a
        resumed recording keeps the format it began with)."""
        self.path, self.partial = path, partial(path)
        self.every, self.names = exp.record.every, recorded_tensors(exp)
        self.full_layout = expected_layout(exp)
        self.layout = compact_layout(exp, 0) if compact else self.full_layout  # the keyframes grow
        self.streams = tuple(name for name in self.names if name in self.layout)  # stored row by row
        self.offsets: dict[str, int] = {}
        end = 0
        for name, (dtype, shape) in self.layout.items():
            self.offsets[name] = end
            end += tensor_bytes(dtype, shape)
        rows = len(recorded_steps(exp.train.steps, self.every))
        self.metadata = {"format_version": FORMAT_VERSION, **metadata}
        self.keyframes = Keyframes(exp, self.layout, rows, uses_fused_adam(metadata), checked_digests, device) \
            if compact else None
        if self.keyframes is not None:
            self.metadata.update(self.keyframes.metadata())
        if first_row:
            self.fd = os.open(self.partial, os.O_RDWR)
            self.header_size = header_length(lambda offset, size: os.pread(self.fd, size, offset))
        else:
            reserved = HEADER_SLACK + reserved_bytes(self.streams, rows, len(self.layout) - len(self.streams))
            if self.keyframes is not None:
                reserved += len(json.dumps(list(range(rows))))  # every row a keyframe, at worst
                end += self.keyframes.scheduled_bytes
            self.header_size = (len(self._header_bytes()) + reserved + 7) // 8 * 8
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.posix_fallocate(self.fd, 0, LENGTH_BYTES + self.header_size + end)  # ENOSPC now, not mid-run
                self._write_header()
            except BaseException:
                os.close(self.fd)
                raise
        self.data_start = LENGTH_BYTES + self.header_size
        self.digests = RowDigests(self.streams, first_row, self._read_rows, checked_digests)
        if self.keyframes is not None and first_row:
            with RowReader(self.partial, keyframe_rows=self.keyframes.rows) as written:
                assert written.compact is not None, "a compact recording continues a compact file"
                self.keyframes.keyframer.continue_from(written.compact, first_row)
        chunk = min(chunk_rows, rows)
        self._buffers = [{n: torch.empty((chunk, *self.full_layout[n][1][1:]), dtype=self._buffer_dtype(exp, n),
                                      device=device)
                          for n in self.names} for _ in range(2)]
        # On CUDA each buffer set has a pinned host mirror: a chunk is copied asynchronously and the
        # writer thread waits for the copy, so the training thread never synchronises with the GPU.
        self._pinned = [{n: torch.empty_like(b, device="cpu").pin_memory() for n, b in bufs.items()}
                        for bufs in self._buffers] if device.type == "cuda" else None
        self._active, self._filled, self._chunk_start = 0, 0, first_row
        self._wall_times: list[float] = []  # of the rows buffered
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recording-writer")
        self._pending: Future | None = None
        self._pending_first = first_row  # the first row of the chunk being written by _pending
        self.sink = sink
        if sink is not None:
            sink.start(first_row)
        self.uncompressed_bytes, self.compress_s = 0, 0.0  # a compact recording's, when it is closed

    def _buffer_dtype(self, exp: Experiment, name: str) -> torch.dtype:
        """The full format's dtype; a compact recording's replay needs W's family as training holds it."""
        if self.keyframes is not None and name in self.keyframes.family_names:
            return TORCH_DTYPES[parameter_dtype(exp)]
        return TORCH_DTYPES[self.full_layout[name][0]]

    def _read_rows(self, name: str, first: int, stop: int) -> bytes:
        """Rows first..stop-1 of tensor `name` as the file holds them."""
        dtype, shape = self.layout[name]
        row_bytes = tensor_bytes(dtype, (1, *shape[1:]))
        return os.pread(self.fd, (stop - first) * row_bytes, self.data_start + self.offsets[name] + first * row_bytes)

    def _header_bytes(self) -> bytes:
        entries: dict = {"__metadata__": self.metadata}
        for name, (dtype, shape) in self.layout.items():
            start = self.offsets[name]
            entries[name] = {"dtype": dtype, "shape": list(shape),
                             "data_offsets": [start, start + tensor_bytes(dtype, shape)]}
        return json.dumps(entries, separators=(",", ":")).encode()

    def _write_header(self) -> None:
        header = self._header_bytes()
        if len(header) > self.header_size:
            raise ValueError(f"recording metadata grew past the reserved {self.header_size} bytes")
        _pwrite_all(self.fd, memoryview(struct.pack("<Q", self.header_size) + header.ljust(self.header_size)), 0)

    def record(self, step: int, values: dict[str, torch.Tensor | None]) -> None:
        """Record training step `step` (after backward, before the update) if the stride wants it.
        At step 1, unless row 0 is written, it first records row 0 from step 1's values: the initial
        W, and logits and loss on step 1's batch (see docs/recording.md)."""
        if step == 1 and self._chunk_start + self._filled == 0:
            self.record_initial(values)
        if step % self.every == 0:
            self._write(step, values)

    def record_initial(self, values: dict[str, torch.Tensor | None]) -> None:
        """Row 0: the state before any update, with gradients, Adam moments, lr and grad_norm zero."""
        self._write(0, {**values, **dict.fromkeys(UPDATE_TENSORS)})

    def _write(self, step: int, values: dict[str, torch.Tensor | None]) -> None:
        """Buffer row `step`; a value of None records zeros (e.g. Adam state before the first update)."""
        assert step // self.every == self._chunk_start + self._filled, "rows must be written in order"
        buffers = self._buffers[self._active]
        for name in self.names:
            value = values[name]
            if value is None:
                buffers[name][self._filled].zero_()
            else:
                buffers[name][self._filled].copy_(value.detach())
        self._filled += 1
        self._wall_times.append(time.time())
        if self.names and self._filled == len(buffers[self.names[0]]):
            self._flush()

    def _flush(self) -> None:
        if not self._filled:
            return
        buffers, copied = self._buffers[self._active], None
        if self._pinned is not None:  # this set's previous write finished at the last flush
            host = {n: self._pinned[self._active][n][:self._filled].copy_(b[:self._filled], non_blocking=True)
                    for n, b in buffers.items()}
            copied = torch.cuda.Event()
            copied.record()
        else:  # one copy per chunk on MPS; a view on the CPU
            host = {n: b[:self._filled].cpu() for n, b in buffers.items()}
        keyframes = [] if self.keyframes is None else self.keyframes.choose(
            self._chunk_start, {n: buffers[n][:self._filled] for n in self.keyframes.family_names})
        self._wait()  # the other buffer set's write has finished, so it may be refilled
        self._pending = self._executor.submit(self._write_rows, self._chunk_start, host, copied, self._wall_times,
                                              keyframes)
        self._pending_first = self._chunk_start
        self._active, self._chunk_start, self._filled = 1 - self._active, self._chunk_start + self._filled, 0
        self._wall_times = []

    def _write_rows(self, first_row: int, rows: dict[str, torch.Tensor], copied: torch.cuda.Event | None,
                    wall_times: list[float], keyframes: list[tuple[int, torch.Tensor]]) -> None:
        if copied is not None:
            copied.synchronize()  # the chunk's device->host copy has landed
        for row, record in keyframes:
            assert self.keyframes is not None
            self.keyframes.append(row, record, self._append)
        stored = {}
        for name in self.streams:
            dtype, shape = self.layout[name]
            row_bytes = tensor_bytes(dtype, shape) // shape[0]
            stored[name] = _as_bytes(rows[name])
            _pwrite_all(self.fd, stored[name], self.data_start + self.offsets[name] + first_row * row_bytes)
        self.digests.update(first_row, stored, len(wall_times))
        if self.sink is not None:  # the values as the full format stores them (bf16 widened exactly)
            self.sink.rows_written(first_row, {name: self._as_full_fp32(name, tensor) for name, tensor in rows.items()},
                                   wall_times)

    def _as_full_fp32(self, name: str, rows: torch.Tensor) -> np.ndarray:
        """Buffered rows as the full format stores them (a compact recording's fp32 W and gradients
        rounded to bf16), widened to fp32."""
        bits = np.frombuffer(_as_bytes(rows), dtype=BITS["BF16" if rows.dtype == torch.bfloat16 else "F32"])
        if rows.dtype == torch.float32 and self.full_layout[name][0] == "BF16":
            bits = round_to_bf16(bits)
        return as_fp32(bits).reshape(rows.shape)

    def _append(self, offset: int, data: memoryview) -> None:
        """Write a keyframe `offset` bytes after the tensors of fixed size."""
        _pwrite_all(self.fd, data, self.data_start + self.offsets[KEYFRAMES] + offset)

    def _update_keyframes(self) -> None:
        """The header's keyframe tensor and rows as they are now."""
        assert self.keyframes is not None
        dtype, shape = self.layout[KEYFRAMES]
        self.layout[KEYFRAMES] = (dtype, (len(self.keyframes.rows), *shape[1:]))
        self.metadata.update(self.keyframes.metadata())

    def format_summary(self) -> dict:
        """What run.json says of the recording's format."""
        if self.keyframes is None:
            return {"format": "full"}
        return {"format": "compact", "keyframes": len(self.keyframes.rows),
                "unscheduled_keyframes": int(self.keyframes.metadata()["unscheduled_keyframes"]),
                "uncompressed_bytes": self.uncompressed_bytes, "compress_s": round(self.compress_s, 3)}

    def _read_keyframes(self, first: int, stop: int) -> bytes:
        return self._read_rows(KEYFRAMES, first, stop)

    @property
    def rows_written(self) -> int:
        """Rows 0..rows_written-1 are in the file (readable, not necessarily durable): what a report
        of a running run may read."""
        return self._pending_first if self._pending is not None and not self._pending.done() else self._chunk_start

    def digest_state(self) -> dict:
        """The digests of the rows written so far, for a checkpoint (after `flush`)."""
        state = self.digests.state()
        if self.keyframes is not None:
            state["keyframes"] = self.keyframes.state()
        return state

    def flush(self) -> None:
        """Write every buffered row and make it durable (before a checkpoint relies on it). A compact
        recording's header is rewritten to list its keyframes so far: the partial file reads as itself."""
        self._flush()
        self._wait()
        if self.keyframes is not None:
            self._update_keyframes()
            self._write_header()
        os.fsync(self.fd)
        if self.sink is not None:
            self.sink.flush()

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()  # re-raises a write error (e.g. disk full) in the training thread
            self._pending = None

    def close(self, finals: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        """Write the last rows, the final state and the final metadata; then publish the file."""
        self._flush()
        self._wait()
        self._executor.shutdown()
        if self.sink is not None:
            self.sink.close()
        stored = {}
        for name, tensor in finals.items():
            dtype, shape = self.layout[name]
            stored[name] = _as_bytes(tensor.detach().to("cpu", TORCH_DTYPES[dtype]).reshape(shape))
            _pwrite_all(self.fd, stored[name], self.data_start + self.offsets[name])
        if self.keyframes is not None:
            self._update_keyframes()
            stored[KEYFRAMES] = memoryview(self.keyframes.read_back(self._read_keyframes))
            os.ftruncate(self.fd, self.data_start + self.offsets[KEYFRAMES] + len(stored[KEYFRAMES]))
        self.metadata.update(metadata, digests=self.digests.final(stored))
        if len(self._header_bytes()) > self.header_size:  # a file begun before digests were reserved for
            del self.metadata["digests"]
        self._write_header()
        os.close(self.fd)
        if self.keyframes is None:
            publish(self.partial, self.path)
        else:  # compressed now that no row moves (runner.recording.compression)
            began, self.uncompressed_bytes = time.perf_counter(), self.partial.stat().st_size
            with atomic_path(self.path, tmp=self.path.with_name(self.path.name + TMP)) as tmp:
                compress(self.partial, tmp)
            self.partial.unlink()
            self.compress_s = time.perf_counter() - began
        return self.path

    def abort(self) -> None:
        """Stop writing; the `.partial` file stays behind (a resume continues it) and is never taken
        for a recording."""
        self._executor.shutdown(cancel_futures=True)
        if self.sink is not None:
            self.sink.close()
        os.close(self.fd)
