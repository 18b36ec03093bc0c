"""Lossless compression of a complete compact recording: its large tensors as byte-shuffled zstd blocks.

While a run trains, its `.partial` recording keeps every row at a fixed offset (resumes, checkpoint
digests and a bucket's row objects rely on that); when it is complete, a compact recording is
rewritten once with its gradients, logits and keyframes compressed, then published. Byte shuffling
stores a block's first bytes of every value, then their second bytes, …: the sign and exponent bytes
of gradients and moments repeat far more than the mantissas, and zstd finds them once grouped
(measured: 1.58x on bf16-true's stored streams, against 1.27x unshuffled; docs/speed.md). A block is
256 rows (a keyframe interval) or one keyframe.
Every block is decompressed and compared with its source before the file is published, and each
zstd frame carries its content checksum, so a flipped bit fails loudly where it is read.
The stored tensors are `U8` byte strings; the `compression` metadata describes them
(docs/recording.md, "Compression").
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import zstandard

from runner.errors import UserError
from runner.recording import format as recording_format
from runner.recording.format import COMPRESSION, ITEM_BYTES, KEYFRAMES, LENGTH_BYTES, Header, read_header

LEVEL = 3  # zstd's default; on bf16-true's gradients levels 1-9 all took 1.57-1.61x off (docs/speed.md)
CODEC: dict[str, str | int] = {"codec": "zstd", "level": LEVEL, "shuffle": "byte"}
COMPRESSED = ("grads", "E_grads", "logits", KEYFRAMES)
Read = Callable[[int, int], bytes]  # (offset, size) -> bytes of a file
# The unsigned integers that hold a stored dtype's bits (as `RowReader.bits` gives them)
BITS: dict[str, np.dtype] = {"BF16": np.dtype("<u2"), "F32": np.dtype("<u4")}


class CorruptBlock(UserError):
    """A compressed block that does not decompress to what was written (a flipped bit, a cut file)."""


def block_rows(name: str) -> int:
    """Rows a block: one keyframe, or a keyframe interval of a stream (a row replays from its
    keyframe with the gradients of one block)."""
    return 1 if name == KEYFRAMES else recording_format.KEYFRAME_INTERVAL


def shuffle(data: bytes, itemsize: int) -> bytes:
    """Each value's byte 0, then each value's byte 1, …"""
    values = np.frombuffer(data, np.uint8)
    return b"".join(values[i::itemsize].tobytes() for i in range(itemsize))


def unshuffle(data: bytes, itemsize: int) -> np.ndarray:
    """`shuffle` undone: the bytes in a new (writable) array. (Strided copies, 3x faster than a
    transposed copy here.)"""
    planes, values = np.frombuffer(data, np.uint8).reshape(itemsize, -1), np.empty(len(data), np.uint8)
    for i in range(itemsize):
        values[i::itemsize] = planes[i]
    return values


def compress(source: Path, target: Path) -> None:
    """Write `source` (a complete recording) to `target` with its COMPRESSED tensors compressed,
    the others as they are, the metadata with `compression` added (~1 s for a reference run)."""
    fd = os.open(source, os.O_RDONLY)
    try:
        header = read_header(lambda offset, n: os.pread(fd, n, offset))
        read: Read = lambda offset, n: os.pread(fd, n, header.data_start + offset)  # noqa: E731
        order = sorted(header.tensors, key=lambda name: header.tensors[name]["data_offsets"][0])
        packed: dict[str, dict] = {}
        for name in (n for n in order if n in COMPRESSED):
            info, per_block = header.tensors[name], block_rows(name)
            packed[name] = {"dtype": info["dtype"], "shape": info["shape"], "block_rows": per_block,
                            "ends": [0] * _blocks(info["shape"][0], per_block)}
        spec = {**CODEC, "tensors": packed}
        # room for the header: every offset as long as any this file can have
        room = (len(_header(header, order, dict.fromkeys(order, 10 ** 15), spec, fill=10 ** 15)) + 7) // 8 * 8
        with open(target, "wb") as out:
            out.seek(LENGTH_BYTES + room)
            sizes = {}
            for name in order:
                begin, end = header.tensors[name]["data_offsets"]
                if name in packed:
                    sizes[name] = _compress_tensor(name, header.tensors[name], read, out, packed[name]["ends"])
                else:
                    sizes[name] = out.write(read(begin, end - begin))
            out.seek(0)
            out.write(struct.pack("<Q", room) + _header(header, order, sizes, spec).ljust(room))
    finally:
        os.close(fd)


def _blocks(rows: int, per_block: int) -> int:
    """How many blocks of `per_block` rows hold `rows` rows (the last may be short)."""
    return -(-rows // per_block)


def _compress_tensor(name: str, info: dict, read: Read, out: BinaryIO, ends: list[int]) -> int:
    """Compress tensor `name` block by block into `out`, filling `ends`; each block is checked by
    decompressing it. Returns the bytes written."""
    begin, stop_byte = info["data_offsets"]
    itemsize, rows = ITEM_BYTES[info["dtype"]], info["shape"][0]
    row_bytes = (stop_byte - begin) // rows
    compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True)
    decompressor = zstandard.ZstdDecompressor()
    written = 0
    for index, (first, stop) in enumerate(_ranges(rows, block_rows(name))):
        data = read(begin + first * row_bytes, (stop - first) * row_bytes)
        frame = compressor.compress(shuffle(data, itemsize))
        if unshuffle(decompressor.decompress(frame), itemsize).tobytes() != data:
            raise RuntimeError(f"{name}: rows {first}..{stop - 1} do not decompress to themselves; nothing published")
        written += out.write(frame)
        ends[index] = written
    return written


def _ranges(rows: int, rows_a_block: int) -> Iterator[tuple[int, int]]:
    for first in range(0, rows, rows_a_block):
        yield first, min(first + rows_a_block, rows)


def _header(header: Header, order: list[str], sizes: dict[str, int], spec: dict, fill: int | None = None) -> bytes:
    """The target's header JSON: each tensor with its stored bytes (`U8` where compressed)."""
    if fill is not None:
        spec = {**spec, "tensors": {n: {**s, "ends": [fill] * len(s["ends"])} for n, s in spec["tensors"].items()}}
    entries: dict = {"__metadata__": {**header.metadata, COMPRESSION: json.dumps(spec, separators=(",", ":"))}}
    offset = 0
    for name in order:
        info = header.tensors[name]
        stored = {"dtype": "U8", "shape": [sizes[name]]} if name in spec["tensors"] else \
            {"dtype": info["dtype"], "shape": info["shape"]}
        entries[name] = {**stored, "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    return json.dumps(entries, separators=(",", ":")).encode()


class CompressedTensors:
    """The compressed tensors of a recording, read by blocks (the last one kept: rows are read in order)."""

    def __init__(self, where: str, metadata: dict[str, str], tensors: dict[str, dict], read: Read):
        """`tensors`: the file's header entries; `read(offset, size)` of the file's data section."""
        self.where, self.read = where, read
        try:
            spec = json.loads(metadata[COMPRESSION])
            codec = {k: spec.get(k) for k in CODEC}
            if codec != CODEC:
                raise ValueError(f"unknown codec {codec}")
            self.specs: dict[str, dict] = spec["tensors"]
            for name, s in self.specs.items():
                info, ends = tensors[name], s["ends"]
                stored = info["data_offsets"][1] - info["data_offsets"][0]
                if info["dtype"] != "U8" or s["dtype"] not in BITS or ends != sorted(ends) or \
                        len(ends) != _blocks(s["shape"][0], s["block_rows"]) or (ends[-1] if ends else 0) != stored:
                    raise ValueError(f"{name}: its blocks do not cover its {stored:,} bytes")
        except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError) as e:
            raise UserError(f"{where}: metadata: compression unusable ({e})") from None
        self.offsets = {name: tensors[name]["data_offsets"][0] for name in self.specs}
        self._last: dict[str, tuple[int, np.ndarray]] = {}

    def layout(self) -> dict[str, dict]:
        """The compressed tensors as they are uncompressed: dtype and shape."""
        return {name: {"dtype": s["dtype"], "shape": s["shape"]} for name, s in self.specs.items()}

    def bits(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of `name`, uncompressed: unsigned integers of the dtype's width."""
        s = self.specs[name]
        if stop <= start:
            return np.empty((0, *s["shape"][1:]), BITS[s["dtype"]])
        per_block = s["block_rows"]
        blocks = [self._block(name, index) for index in range(start // per_block, _blocks(stop, per_block))]
        first = start // per_block * per_block
        rows = np.concatenate(blocks) if len(blocks) != 1 else blocks[0]
        return rows[start - first:stop - first]

    def _block(self, name: str, index: int) -> np.ndarray:
        if name in self._last and self._last[name][0] == index:
            return self._last[name][1]
        s = self.specs[name]
        begin = s["ends"][index - 1] if index else 0
        first, stop = index * s["block_rows"], min((index + 1) * s["block_rows"], s["shape"][0])
        frame = self.read(self.offsets[name] + begin, s["ends"][index] - begin)
        dtype = BITS[s["dtype"]]
        try:
            data = unshuffle(zstandard.ZstdDecompressor().decompress(frame), dtype.itemsize)
            rows = data.view(dtype).reshape(stop - first, *s["shape"][1:])
        except (zstandard.ZstdError, ValueError) as e:
            what = f"keyframe {index}" if name == KEYFRAMES else f"rows {first}..{stop - 1}"
            raise CorruptBlock(f"{self.where}: {name}: {what}: the compressed block does not decompress ({e})") \
                from None
        self._last[name] = (index, rows)
        return rows
