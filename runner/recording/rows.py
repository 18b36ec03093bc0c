"""Rows of a recording as numpy arrays, by plain reads: for analyses whose memory must stay bounded.

Two choices keep a 1 GB recording's analysis small: the file is read, not memory-mapped (mapped
pages count toward the process's memory as they are touched; read pages stay in the kernel's
cache), and nothing here imports torch (~240 MiB of the process before any work). bf16 values are
widened to fp32 exactly: a bf16 number is the upper half of the fp32 with the same value.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from runner.errors import ConfigError, UserError
from runner.layout import recording_of
from runner.recording.compression import BITS, CompressedTensors
from runner.recording.format import COMPRESSION, ITEM_BYTES, experiment_of, is_compact, read_header, stored_layout
from runner.storage.blob import read
from runner.storage.location import Location, at


def as_fp32(bits: np.ndarray) -> np.ndarray:
    """Stored bits (see `RowReader.bits`) as fp32 values; bf16 widens exactly."""
    if bits.dtype == BITS["BF16"]:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float32)


def round_to_bf16(bits: np.ndarray) -> np.ndarray:
    """fp32 bits rounded to bf16 bits, to nearest even, as torch's `.to(torch.bfloat16)` rounds
    (a NaN becomes its quiet NaN). numpy, not torch: a torch op on large tensors in a second thread
    starts a second OpenMP team, which slowed training by ~15 % on 2 cores."""
    one, half = np.uint32(1), np.uint32(0x7FFF)
    rounded = ((bits + half + ((bits >> np.uint32(16)) & one)) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(bits.view(np.float32)), np.uint16(0x7FC0), rounded)


class RowReader:
    """`with RowReader(path) as f: f.rows("W", 0, 256)` -> fp32 array of rows 0..255. `path` is a
    local file or an `s3://` object (read by ranges), a recording in either format: `tensors`,
    `rows` and `bits` are the full format's, a compact recording's replayed (which imports torch);
    `stored` and `stored_bits` are what the file holds."""

    def __init__(self, path: str | Path | Location, keyframe_rows: list[int] | None = None):
        """`keyframe_rows`: a partial compact recording's keyframes as its checkpoint knew them."""
        self.path = at(path)
        self.blob = self.path.open_blob()
        try:
            header = read_header(lambda offset, n: read(self.blob, offset, n))
            self.metadata, self.tensors = header.metadata, header.tensors
            self.data_start, need = header.data_start, header.end
        except (struct.error, ValueError, KeyError, TypeError, AttributeError, EOFError):
            self.blob.close()
            raise UserError(f"{self.path}: not a safetensors recording (unreadable header)") from None
        if self.blob.size < need:
            self.blob.close()
            raise UserError(f"{self.path}: truncated: its header describes {need:,} bytes, the file has "
                            f"{self.blob.size:,}")
        self.stored = self.tensors
        self.compressed = None
        if COMPRESSION in self.metadata:  # a complete compact recording's large tensors (compression.py)
            try:
                self.compressed = CompressedTensors(str(self.path), self.metadata, self.tensors,
                                                    lambda offset, n: read(self.blob, self.data_start + offset, n))
            except UserError:
                self.blob.close()
                raise
            self.stored = {**self.tensors, **self.compressed.layout()}
        self.compact = None
        if is_compact(self.metadata):
            from runner.recording.compact import CompactRows  # torch, for the replay

            metadata = self.metadata if keyframe_rows is None else {**self.metadata,
                                                                     "keyframe_rows": json.dumps(keyframe_rows)}
            self.compact = CompactRows(metadata, self.stored_bits)
            self.tensors = {name: {"dtype": dtype, "shape": list(shape)}
                            for name, (dtype, shape) in self.compact.full.items()}

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc) -> None:
        self.blob.close()

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of tensor `name`, as fp32."""
        return as_fp32(self.bits(name, start, stop))

    def bits(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of tensor `name` as the full format stores them: unsigned integers of
        the dtype's width."""
        if self.compact is not None:
            return self.compact.bits(name, start, stop)
        return self.stored_bits(name, start, stop)

    def stored_bits(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of tensor `name` as the file stores it (uncompressed)."""
        if self.compressed is not None and name in self.compressed.specs:
            return self.compressed.bits(name, start, stop)
        info = self.stored[name]
        dtype, shape = info["dtype"], info["shape"]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * ITEM_BYTES[dtype]
        buffer = bytearray((stop - start) * row_bytes)
        self.blob.read_into(self.data_start + info["data_offsets"][0] + start * row_bytes, memoryview(buffer))
        return np.frombuffer(buffer, dtype=BITS[dtype]).reshape(stop - start, *shape[1:])


def open_recording(path: str | Path | Location) -> RowReader:
    """Any tensor of a recording, any rows, in either format (docs/recording.md), on a disk or in a
    bucket, read lazily: `with open_recording("runs/seed_sweep/<run id>") as f: f.rows("W", 5000,
    5001)`. A run directory stands for its recording. `f.tensors` names what it holds (the full
    format's tensors, whatever the file's format), `f.metadata` its metadata."""
    return RowReader(recording_of(at(path)))


def layout_matches(recording: Location) -> bool:
    """The quick check of a recording by its header alone (one ranged read in a bucket): it parses,
    its tensors are those its own config records (names, dtypes, shapes), and the file is as long
    as the header says."""
    try:
        with RowReader(recording) as f:
            layout = {name: (info["dtype"], tuple(info["shape"])) for name, info in f.stored.items()}
            return layout == stored_layout(experiment_of(f.metadata), f.metadata)
    except (UserError, ConfigError, KeyError, ValueError, TypeError):
        return False
