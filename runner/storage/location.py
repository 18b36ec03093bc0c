"""A place for runs: a directory on this machine or a prefix in an S3 bucket, behind one interface.

Everything above the storage layer reads, writes, lists and publishes through `Location` and never
asks which kind it holds; `at()` is the one place that tells a path from a bucket. A file is read
whole and written whole (atomically on a disk, as one PUT in a bucket); a directory is published
file by file (multipart uploads for large ones). Two things stay kind-specific by nature and are
reached through the two typed accessors: the local trainer's files (`local`, a Path) and the
bucket's lease and row objects (`s3`, for `runner.storage.lease` and the bucket run's staging).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from runner.errors import ConfigError
from runner.files import write_atomic
from runner.storage.blob import Blob, LocalBlob, S3Blob
from runner.storage.uri import S3Uri, parse_location

log = logging.getLogger(__name__)


class Location(abc.ABC):
    """A file or directory, local or in a bucket; `Local` and `Bucket` implement each operation."""

    @property
    def local(self) -> Path | None:
        """The path on this machine (None in a bucket)."""
        return None

    @property
    def s3(self) -> S3Uri | None:
        """The object or prefix (None on a disk)."""
        return None

    @abc.abstractmethod
    def __truediv__(self, name: str) -> Location: ...

    @property
    @abc.abstractmethod
    def name(self) -> str: ...

    @property
    @abc.abstractmethod
    def parent(self) -> Location: ...

    def resolve(self) -> Location:
        """An absolute location (a bucket's already is)."""
        return self

    # -- reading ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def read_bytes(self) -> bytes | None:
        """The file's bytes, or None when it does not exist (other errors raise)."""

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether a file is here."""

    @abc.abstractmethod
    def is_dir(self) -> bool:
        """Whether this is a directory (in a bucket: whether any object is below it)."""

    @abc.abstractmethod
    def children(self) -> list[Location]:
        """The directories directly below, sorted by name."""

    @abc.abstractmethod
    def files(self) -> dict[str, int]:
        """Every file below (recursively): path relative to this location -> size."""

    @abc.abstractmethod
    def open_blob(self) -> Blob:
        """The file's bytes for positional (disk) or ranged (bucket) reads."""

    @abc.abstractmethod
    def stream(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes in chunks (bounded memory)."""

    @abc.abstractmethod
    def local_copy(self) -> contextlib.AbstractContextManager[Path]:
        """The file as a local path while the block runs (a bucket's downloaded to a temporary one)."""

    @abc.abstractmethod
    def download(self, target: Path) -> None:
        """The file into the local file `target`."""

    def download_tree(self, target: Path, skip: Callable[[str], bool] = lambda relative: False,
                      progress: bool = True) -> int:
        """Every file below (but those `skip` names, by relative path) into `target`, keeping names;
        returns the bytes copied."""
        files = {name: size for name, size in self.files().items() if not skip(name)}
        with tqdm(total=sum(files.values()), unit="B", unit_scale=True, desc=self.name, disable=not progress,
                  dynamic_ncols=True) as bar:
            for relative, size in sorted(files.items()):
                (self / relative).download(target / relative)
                bar.update(size)
        return sum(files.values())

    # -- writing ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def write_bytes(self, data: bytes) -> None:
        """Replace the file whole (never torn: atomic on a disk, one PUT in a bucket)."""

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    @abc.abstractmethod
    def delete(self) -> None:
        """Remove the file, if there is one."""

    @abc.abstractmethod
    def delete_tree(self) -> None:
        """Remove everything below (in a bucket: unfinished multipart uploads too)."""

    @abc.abstractmethod
    def upload(self, source: Path) -> None:
        """Publish the local file `source` here."""

    @abc.abstractmethod
    def staged_dir(self) -> contextlib.AbstractContextManager[Path]:
        """`with loc.staged_dir() as d:` write files into the local directory `d` (creating it); they
        are here when the block ends (a bucket's are uploaded then, from a temporary directory)."""

    @abc.abstractmethod
    def make_dir(self) -> None:
        """Create the directory and its parents (a one-line ConfigError when it cannot be; a bucket
        has no directories to create)."""

    @abc.abstractmethod
    def probe(self) -> None:
        """Before anything is read or written here: a bucket's reach, credentials, bucket and write
        permission are checked (a one-line ConfigError each); a disk has nothing to check."""


@dataclass(frozen=True)
class Local(Location):
    path: Path

    @property
    def local(self) -> Path:
        return self.path

    def __truediv__(self, name: str) -> Local:
        return Local(self.path / name)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def parent(self) -> Local:
        return Local(self.path.parent)

    def resolve(self) -> Local:
        try:
            return Local(self.path.resolve())
        except RuntimeError as e:  # Python 3.11's Path.resolve on a symlink loop
            raise ConfigError(f"{self.path}: cannot resolve the path ({e})") from None

    def read_bytes(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        return self.path.is_file()

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def children(self) -> list[Location]:
        return [Local(d) for d in sorted(self.path.iterdir()) if d.is_dir()]

    def files(self) -> dict[str, int]:
        return {p.relative_to(self.path).as_posix(): p.stat().st_size
                for p in sorted(self.path.rglob("*")) if p.is_file()}

    def open_blob(self) -> Blob:
        return LocalBlob(self.path)

    def stream(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while block := f.read(chunk):
                yield block

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        yield self.path

    def write_bytes(self, data: bytes) -> None:
        write_atomic(self.path, data)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)

    def delete_tree(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def make_dir(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot create the directory ({e.strerror})") from None

    def probe(self) -> None:
        pass

    def upload(self, source: Path) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, self.path)

    @contextlib.contextmanager
    def staged_dir(self) -> Iterator[Path]:
        yield self.path  # created by the writer, once it has something to write

    def download(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, target)


@dataclass(frozen=True)
class Bucket(Location):
    uri: S3Uri

    @property
    def s3(self) -> S3Uri:
        return self.uri

    @staticmethod
    def _store():
        from runner.storage.s3 import store

        return store()

    def __truediv__(self, name: str) -> Bucket:
        return Bucket(self.uri / name)

    def __str__(self) -> str:
        return str(self.uri)

    @property
    def name(self) -> str:
        return self.uri.name

    @property
    def parent(self) -> Bucket:
        return Bucket(self.uri.parent)

    def read_bytes(self) -> bytes | None:
        return self._store().get_bytes(self.uri)

    def exists(self) -> bool:
        return self._store().head(self.uri) is not None

    def is_dir(self) -> bool:
        return bool(self._store().objects(self.uri, limit=1))

    def children(self) -> list[Location]:
        return [Bucket(self.uri / name) for name in self._store().children(self.uri)]

    def files(self) -> dict[str, int]:
        return self._store().objects(self.uri)

    def open_blob(self) -> Blob:
        return S3Blob(self.uri)

    def stream(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        return self._store().stream(self.uri, chunk)

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="lilgatsby-") as tmp:
            local = Path(tmp) / self.name
            self.download(local)
            yield local

    def write_bytes(self, data: bytes) -> None:
        self._store().put_bytes(self.uri, data)

    def delete(self) -> None:
        self._store().delete([self.uri])

    def delete_tree(self) -> None:
        self._store().delete_below(self.uri)

    def make_dir(self) -> None:
        pass

    def probe(self) -> None:
        if not self._store().probe(self.uri):
            log.warning("%s: the S3 server ignores conditional writes (If-None-Match), so run leases do not "
                        "exclude: two sweeps on this bucket at once could train the same run twice", self.uri)

    def upload(self, source: Path) -> None:
        self._store().upload(source, self.uri)

    @contextlib.contextmanager
    def staged_dir(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="lilgatsby-") as tmp:
            yield Path(tmp)
            for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
                (self / path.relative_to(tmp).as_posix()).upload(path)

    def download(self, target: Path) -> None:
        self._store().download(self.uri, target)


@contextlib.contextmanager
def unless_read_only(what: object) -> Iterator[None]:
    """Around a write that only saves work for later (an index, a metrics cache): with credentials
    that may only read, the write is skipped and one line says so; the command goes on."""
    from runner.storage.s3 import AccessDenied

    try:
        yield
    except AccessDenied:
        log.warning("%s: not written: these credentials may only read there", what)


def at(where: str | Path | S3Uri | Location, what: str = "path") -> Location:
    """The location `where` names: a Location as it is, a local path, or `s3://bucket/prefix` (a
    malformed URI or another scheme is a one-line ConfigError naming `what`, e.g. `--runs`)."""
    if isinstance(where, Location):
        return where
    parsed = parse_location(where, what) if isinstance(where, str) else where
    return Bucket(parsed) if isinstance(parsed, S3Uri) else Local(parsed)

