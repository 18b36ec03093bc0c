"""Publishing files whole: written under a temporary name, made durable, then renamed.

A reader (a resume, `verify`, the index, a crash's survivor) sees the previous version or the new
one, never a torn file: `rename` within a directory is atomic, and the fsyncs make the new bytes
durable before the name points at them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Make `tmp` (a file, or a directory and every file in it) durable and rename it to `final`."""
    if tmp.is_dir():
        for path in sorted(tmp.rglob("*")):
            _fsync(path)
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)  # the rename itself


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: Path, tmp: Path | None = None) -> Iterator[Path]:
    """`with atomic_path(final) as tmp:` write the file (or directory) `tmp`; it is published as
    `final` when the block succeeds and removed when it raises. `tmp` defaults to a fresh name in
    `final`'s directory; a fixed one (e.g. `step-100.partial`) is cleared first, in case a crash left it."""
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    else:
        _remove(tmp)
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content` (text is UTF-8), readable by everyone, never torn."""
    with atomic_path(path) as tmp:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8", newline="")
        else:
            tmp.write_bytes(content)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; manifests and indexes are for every reader


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes, up to `limit`. Anything else is refused by its type before it is
    opened (a FIFO would block the read, /dev/zero never end it), and so is a larger file: raises
    ValueError saying which; OSError as `open` does."""
    mode = os.stat(path).st_mode
    kind = next((name for test, name in _KINDS if test(mode)), None)
    if kind:
        raise ValueError(f"{kind}, not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit / 2**20:g} MiB")
    return data
