"""A file's bytes wherever it is: a local file (positional reads) or an S3 object (ranged reads).
`Location.open_blob` gives one; `RowReader` reads rows through it, so metrics, `compare` and the
report stream a recording from a bucket with the same bounded memory as from a disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from runner.errors import UserError
from runner.storage.uri import S3Uri


class Blob(Protocol):
    size: int

    def read_into(self, offset: int, buffer: memoryview) -> None: ...

    def close(self) -> None: ...


class LocalBlob:
    def __init__(self, path: Path):
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise UserError(f"{path}: cannot open: {e.strerror}") from None
        self.path, self.size = path, os.fstat(self.fd).st_size

    def read_into(self, offset: int, buffer: memoryview) -> None:
        while buffer:
            read = os.preadv(self.fd, [buffer], offset)
            if read == 0:
                raise EOFError(f"{self.path}: {len(buffer):,} bytes at {offset:,} run past the end of the file")
            buffer, offset = buffer[read:], offset + read

    def close(self) -> None:
        os.close(self.fd)


class S3Blob:
    def __init__(self, uri: S3Uri):
        from runner.storage.s3 import store

        self.uri, self.store = uri, store()
        info = self.store.head(uri)
        if info is None:
            raise UserError(f"{uri}: no such object")
        self.size = info.size

    def read_into(self, offset: int, buffer: memoryview) -> None:
        if not buffer:
            return
        data = self.store.get_bytes(self.uri, offset, offset + len(buffer))
        if data is None or len(data) != len(buffer):
            raise EOFError(f"{self.uri}: {len(buffer):,} bytes at {offset:,} run past the end of the object")
        buffer[:] = data

    def close(self) -> None:
        pass


def read(blob: Blob, offset: int, size: int) -> bytes:
    buffer = bytearray(size)
    blob.read_into(offset, memoryview(buffer))
    return bytes(buffer)
