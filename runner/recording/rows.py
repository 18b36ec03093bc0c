"""Rows of a recording as numpy arrays, by plain reads: for analyses whose memory must stay bounded.

Two choices keep a 1 GB recording's analysis small: the file is read, not memory-mapped (mapped
pages count toward the process's memory as they are touched; read pages stay in the kernel's
cache), and nothing here imports torch (~240 MiB of the process before any work). bf16 values are
widened to fp32 exactly: a bf16 number is the upper half of the fp32 with the same value.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from runner.errors import UserError
from runner.recording.format import ITEM_BYTES, read_header

BITS: dict[str, np.dtype] = {"BF16": np.dtype("<u2"), "F32": np.dtype("<u4")}


def as_fp32(bits: np.ndarray) -> np.ndarray:
    """Stored bits (see `RowReader.bits`) as fp32 values; bf16 widens exactly."""
    if bits.dtype == BITS["BF16"]:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float32)


class RowReader:
    """`with RowReader(path) as f: f.rows("W", 0, 256)` -> fp32 array of rows 0..255."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise UserError(f"{self.path}: cannot open: {e.strerror}") from None
        try:
            size, header = read_header(self.fd)
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self.tensors: dict[str, dict] = header
            self.data_start = 8 + size
            need, have = self.data_start + max((t["data_offsets"][1] for t in header.values()), default=0), \
                os.fstat(self.fd).st_size
        except (struct.error, ValueError, KeyError, TypeError, AttributeError):
            os.close(self.fd)
            raise UserError(f"{self.path}: not a safetensors recording (unreadable header)") from None
        if have < need:
            os.close(self.fd)
            raise UserError(f"{self.path}: truncated: its header describes {need:,} bytes, the file has {have:,}")

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of tensor `name`, as fp32."""
        return as_fp32(self.bits(name, start, stop))

    def bits(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of tensor `name` as stored: unsigned integers of the dtype's width."""
        info = self.tensors[name]
        dtype, shape = info["dtype"], info["shape"]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * ITEM_BYTES[dtype]
        buffer = bytearray((stop - start) * row_bytes)
        offset, view = self.data_start + info["data_offsets"][0] + start * row_bytes, memoryview(buffer)
        while view:
            read = os.preadv(self.fd, [view], offset)
            if read == 0:
                raise EOFError(f"{self.path}: {name}: rows {start}..{stop - 1} run past the end of the file")
            view, offset = view[read:], offset + read
        return np.frombuffer(buffer, dtype=BITS[dtype]).reshape(stop - start, *shape[1:])
