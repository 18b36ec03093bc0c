"""Per-step recordings: one safetensors file, written row by row while training runs.

The safetensors library writes whole in-memory tensors; a 10,000-step recording is ~943 MiB,
so this module lays the file out itself (the format is a JSON header and raw little-endian
tensor bytes) and fills each tensor's rows in place. The header is written first with its size
reserved, rows are buffered in chunks and written by a background thread, and the header is
rewritten with the final metadata at the end. The file lives under `<name>.partial` until it is
complete, then is renamed: a file with the final name is always complete. Reading uses the
safetensors library (memory-mapped, no code execution).
"""

from __future__ import annotations

import json
import math
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

FORMAT_VERSION = "1"
FINAL_TENSORS = ("W_final", "momentum_final", "variance_final")
HEADER_SLACK = 4096  # bytes reserved for metadata only known at the end (final loss, timings)
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32"}


def row_specs(vocab: int, dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of one row of each per-step tensor (the notebook's)."""
    return {"W": (torch.bfloat16, (vocab, dim)), "grads": (torch.bfloat16, (vocab, dim)),
            "momentum": (torch.float32, (vocab, dim)), "variance": (torch.float32, (vocab, dim)),
            "logits": (torch.float32, (vocab,)), "loss": (torch.float32, ())}


def final_specs(vocab: int, dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    rows = row_specs(vocab, dim)
    return {"W_final": rows["W"], "momentum_final": rows["momentum"], "variance_final": rows["variance"]}


def recorded_steps(steps: int, every: int) -> range:
    """Row r of every per-step tensor holds step r * every."""
    return range(0, steps + 1, every)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def expected_layout(steps: int, every: int, names: tuple[str, ...], vocab: int, dim: int) -> dict:
    """Name -> (dtype, full shape) of every tensor a recording with this config holds."""
    rows = len(recorded_steps(steps, every))
    specs = row_specs(vocab, dim)
    layout = {name: (specs[name][0], (rows, *specs[name][1])) for name in names}
    layout.update(final_specs(vocab, dim))
    return layout


def recording_size(steps: int, every: int, names: tuple[str, ...], vocab: int, dim: int) -> int:
    """Bytes of tensor data in such a recording (the header adds a few KiB)."""
    return sum(_nbytes(dtype, shape) for dtype, shape in expected_layout(steps, every, names, vocab, dim).values())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


class RecordingWriter:
    """Streams rows of the per-step tensors into `path` (via `path.partial`)."""

    def __init__(self, path: Path, *, steps: int, every: int, names: tuple[str, ...], vocab: int, dim: int,
                 metadata: dict[str, str], device: torch.device, chunk_rows: int = 64):
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        self.every, self.names = every, names
        self.layout = expected_layout(steps, every, names, vocab, dim)
        self.offsets: dict[str, int] = {}
        end = 0
        for name, (dtype, shape) in self.layout.items():
            self.offsets[name] = end
            end += _nbytes(dtype, shape)
        self.metadata = {"format_version": FORMAT_VERSION, **metadata}
        header = self._header_bytes()
        self.header_size = (len(header) + HEADER_SLACK + 7) // 8 * 8
        self.data_start = 8 + self.header_size
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(self.fd, 0, self.data_start + end)  # ENOSPC now, not mid-run
            self._write_header()
        except BaseException:
            self.abort()
            raise
        rows = min(chunk_rows, self.layout[names[0]][1][0]) if names else 1
        self._buffers = [{n: torch.empty((rows, *self.layout[n][1][1:]), dtype=self.layout[n][0], device=device)
                          for n in names} for _ in range(2)]
        self._active, self._filled, self._chunk_start = 0, 0, 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recording-writer")
        self._pending: Future | None = None

    def _header_bytes(self) -> bytes:
        entries: dict = {"__metadata__": self.metadata}
        for name, (dtype, shape) in self.layout.items():
            start = self.offsets[name]
            entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                             "data_offsets": [start, start + _nbytes(dtype, shape)]}
        return json.dumps(entries, separators=(",", ":")).encode()

    def _write_header(self) -> None:
        header = self._header_bytes()
        if len(header) > self.header_size:
            raise ValueError(f"recording metadata grew past the reserved {self.header_size} bytes")
        _pwrite_all(self.fd, memoryview(struct.pack("<Q", self.header_size) + header.ljust(self.header_size)), 0)

    def wants(self, step: int) -> bool:
        return step % self.every == 0

    def write(self, step: int, values: dict[str, torch.Tensor | None]) -> None:
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
        if self.names and self._filled == len(buffers[self.names[0]]):
            self._flush()

    def _flush(self) -> None:
        if not self._filled:
            return
        # One device->host copy per chunk (a no-op on CPU): no per-step synchronisation on a GPU.
        host = {n: b[:self._filled].cpu() for n, b in self._buffers[self._active].items()}
        self._wait()  # the other buffer set's write has finished, so it may be refilled
        self._pending = self._executor.submit(self._write_rows, self._chunk_start, host)
        self._active, self._chunk_start, self._filled = 1 - self._active, self._chunk_start + self._filled, 0

    def _write_rows(self, first_row: int, rows: dict[str, torch.Tensor]) -> None:
        for name, tensor in rows.items():
            dtype, shape = self.layout[name]
            row_bytes = _nbytes(dtype, shape) // shape[0]
            _pwrite_all(self.fd, _as_bytes(tensor), self.data_start + self.offsets[name] + first_row * row_bytes)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()  # re-raises a write error (e.g. disk full) in the training thread
            self._pending = None

    def close(self, finals: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        """Write the last rows, the final state and the final metadata; then publish the file."""
        self._flush()
        self._wait()
        self._executor.shutdown()
        for name, tensor in finals.items():
            dtype, shape = self.layout[name]
            _pwrite_all(self.fd, _as_bytes(tensor.detach().to("cpu", dtype).reshape(shape)),
                        self.data_start + self.offsets[name])
        self.metadata.update(metadata)
        self._write_header()
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Stop writing; the `.partial` file stays behind and is never taken for a recording."""
        if hasattr(self, "_executor"):
            self._executor.shutdown(cancel_futures=True)
        os.close(self.fd)


def check_layout(path: Path, expected: dict) -> list[str]:
    """Problems with a recording's header: missing file, unreadable header, wrong names/dtypes/shapes."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {name: f.get_slice(name) for name in f.keys()}
    except FileNotFoundError:
        return [f"{path}: missing"]
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        return [f"{path}: unreadable safetensors header: {e}"]
    problems = [f"{path}: {name}: missing" for name in expected if name not in found]
    problems += [f"{path}: {name}: unexpected tensor" for name in found if name not in expected]
    for name, (dtype, shape) in expected.items():
        if name in found:
            got = (found[name].get_dtype(), tuple(found[name].get_shape()))
            if got != (DTYPE_NAMES[dtype], shape):
                problems.append(f"{path}: {name}: {got[0]}{list(got[1])}, expected {DTYPE_NAMES[dtype]}{list(shape)}")
    return problems


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_recording(path: Path, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a recording (memory-mapped by safetensors; nothing is executed)."""
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in (names or f.keys())}

