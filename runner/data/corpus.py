"""The Great Gatsby (Project Gutenberg eBook #64317): find it, read it, clean it to 7-bit ASCII.

Resolution order: explicit path (experiment or CLI) -> $LILGATSBY_CORPUS -> the copy cached
under data/ -> download from Project Gutenberg (cached under data/ for next time). A sweep's
driver reads the book once and sends its bytes to every task with their SHA-256 (a `Book`):
a worker checks the hash and cleans the bytes itself, never needing the file or the internet.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import unicodedata
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from runner.errors import UserError
from runner.files import read_regular, write_atomic
from runner.settings import CORPUS, corpus_path

log = logging.getLogger(__name__)

ENV_VAR = CORPUS
GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/64317/pg64317.txt"
CACHE_PATH = Path("data") / "pg64317.txt"
DOWNLOAD_TIMEOUT_S = 30
MAX_BOOK_BYTES = 1 << 30  # The Great Gatsby is 0.3 MB; a file this large is not a book to train on here
START_MARKER = "*** START OF THE PROJECT GUTENBERG EBOOK"
END_MARKER = "*** END OF THE PROJECT GUTENBERG EBOOK"
# `map` mode: typographic punctuation that has an obvious ASCII spelling.
ASCII_MAP = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'",
                           "\u2014": "-", "\u2013": "-"})


class CorpusError(UserError):
    """The corpus cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class Book:
    """The raw book as read from its file: its bytes, where they came from and their SHA-256."""

    data: bytes
    source: str
    sha256: str


@dataclass(frozen=True)
class Corpus:
    text: str  # cleaned, 7-bit ASCII
    source: str  # where the raw book came from
    mode: str  # "drop" or "map"
    dropped: int  # non-ASCII characters removed
    replaced: int  # characters rewritten (map mode's punctuation, NFKD decompositions)
    file_sha256: str = ""  # of the raw book's bytes (the text's own hash is `sha256`)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("ascii")).hexdigest()

    @functools.cached_property
    def token_counts(self) -> list[int]:
        """Occurrences of each of the 128 ASCII codes; a zero marks a dead token."""
        counts = Counter(self.text.encode("ascii"))
        return [counts.get(i, 0) for i in range(128)]

    def summary(self) -> dict:
        """What run.json says of the corpus a run trained on."""
        counts = self.token_counts
        return {"source": self.source, "ascii": self.mode, "length": len(self.text), "sha256": self.sha256,
                "file_sha256": self.file_sha256, "dropped": self.dropped, "replaced": self.replaced,
                "token_counts": counts,
                "dead_tokens": [i for i, c in enumerate(counts) if c == 0]}


def strip_gutenberg(raw: str, source: str) -> str:
    """The text between the START and END marker lines; the whole text if they are missing."""
    start, end = raw.find(START_MARKER), raw.find(END_MARKER)
    if start < 0 or end < start:
        log.warning("%s: no Project Gutenberg START/END markers; using the whole file", source)
        return raw
    return raw[raw.index("\n", start) + 1:end]


def to_ascii(text: str, mode: str) -> tuple[str, int, int]:
    """Make text 7-bit ASCII; returns (text, characters dropped, characters replaced)."""
    if mode not in ("drop", "map"):
        raise ValueError(f"unknown ascii mode {mode!r}")
    mapped = text.translate(ASCII_MAP) if mode == "map" else text
    replaced = sum(a != b for a, b in zip(text, mapped, strict=True))  # the map is one character to one
    dropped = 0
    out = []
    for ch in mapped:
        if ch.isascii():
            out.append(ch)
            continue
        ascii_part = "".join(c for c in unicodedata.normalize("NFKD", ch) if c.isascii())
        replaced += bool(ascii_part)
        dropped += not ascii_part
        out.append(ascii_part)
    return "".join(out), dropped, replaced


def clean(raw: str, mode: str, source: str = "<text>", file_sha256: str = "") -> Corpus:
    body = strip_gutenberg(raw.replace("\r\n", "\n"), source)
    text, dropped, replaced = to_ascii(body, mode)
    if not text:
        raise CorpusError(f"{source}: no text left after cleaning")
    return Corpus(text=text, source=source, mode=mode, dropped=dropped, replaced=replaced, file_sha256=file_sha256)


def read_book(path: Path) -> Book:
    """The book's bytes from its file (a one-line CorpusError when it cannot be read, is no
    regular file or is larger than MAX_BOOK_BYTES)."""
    try:
        data = read_regular(path, MAX_BOOK_BYTES)
    except FileNotFoundError:
        raise CorpusError(f"{path}: corpus file not found") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read corpus: {e.strerror}") from None
    except ValueError as e:
        raise CorpusError(f"{path}: cannot use as the corpus: {e}") from None
    return Book(data, str(path), hashlib.sha256(data).hexdigest())


def decode(book: Book) -> str:
    """The book as text, refusing empty, binary and non-UTF-8 files with a clear message."""
    data, where = book.data, book.source
    if not data.strip():
        raise CorpusError(f"{where}: corpus file is empty")
    if b"\x00" in data:
        raise CorpusError(f"{where}: corpus file is binary (contains NUL bytes), expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where}: corpus is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def corpus_of(book: Book, mode: str) -> Corpus:
    """The cleaned corpus of a book whose bytes may have travelled (from a sweep's driver to its
    worker): refused in one line, naming both hashes, when they no longer hash to `book.sha256`."""
    actual = hashlib.sha256(book.data).hexdigest()
    if actual != book.sha256:
        raise CorpusError(f"{book.source}: the book's bytes hash to sha256 {actual} here, not the {book.sha256} "
                          f"the driver read: changed on the way; the run is not trained on them")
    return clean(decode(book), mode, book.source, book.sha256)


def _download(url: str, dest: Path) -> None:
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except OSError as e:
        raise CorpusError(
            f"cannot download the corpus from {url} ({getattr(e, 'reason', e)}); "
            f"set {ENV_VAR}=/path/to/pg64317.txt (Project Gutenberg eBook #64317, UTF-8) or corpus.path"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, data)


def resolve_path(path: str | None) -> Path:
    """Where the raw book is, downloading it into the cache if there is no local copy."""
    if path:
        return Path(path)
    from_environment = corpus_path()
    if from_environment:
        return from_environment
    if not CACHE_PATH.exists():
        _download(GUTENBERG_URL, CACHE_PATH)
    return CACHE_PATH


def load_corpus(path: str | None, mode: str) -> Corpus:
    """The cleaned book. Kept per process while the file is unchanged: a sweep's worker trains
    several runs on it (reading and cleaning it costs ~0.15 s a run)."""
    source = resolve_path(path)
    try:
        stat = source.stat()
    except OSError:
        return _load(source, mode)  # read_book says what is wrong
    return _load_unchanged(source, mode, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_unchanged(source: Path, mode: str, mtime_ns: int, size: int) -> Corpus:
    return _load(source, mode)


def _load(source: Path, mode: str) -> Corpus:
    corpus = corpus_of(read_book(source), mode)
    log.info("corpus %s (%s): %d characters, %d dropped, %d replaced, %d dead tokens",
             source, mode, len(corpus.text), corpus.dropped, corpus.replaced, corpus.token_counts.count(0))
    return corpus
