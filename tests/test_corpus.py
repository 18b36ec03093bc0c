import hashlib
import logging
import urllib.request

import pytest

from runner.data import corpus as corpus_mod
from runner.data.corpus import Book, CorpusError, clean, corpus_of, load_corpus, read_book, resolve_path

from conftest import SMALL_BOOK


def test_clean_strips_markers_and_makes_ascii():
    c = clean(SMALL_BOOK.replace("\n", "\r\n"), "drop")
    assert c.text.isascii() and "\r" not in c.text
    assert c.text.startswith("In my younger") and "GUTENBERG" not in c.text and "License" not in c.text
    # drop: curly quotes and the em dash vanish, so " and ' are dead tokens
    assert '"' not in c.text and "'" not in c.text and "Ive been" in c.text
    assert c.dropped == 20 * 9 and c.replaced == 0
    assert c.token_counts[ord('"')] == 0 and sum(c.token_counts) == len(c.text)


def test_map_mode_keeps_quotes_and_dashes():
    c = clean(SMALL_BOOK, "map")
    assert "I've been" in c.text and '"Whenever' in c.text and '."-He' in c.text
    assert c.dropped == 0 and c.replaced == 20 * 9


def test_nfkd_decomposes_accents_and_ellipsis():
    c = clean("caf\u00e9 \u2026 na\u00efve", "drop")
    assert c.text == "cafe ... naive" and c.replaced == 3 and c.dropped == 0


def test_shared_book_drop(book_path):
    c = load_corpus(str(book_path), "drop")
    assert c.text.isascii() and len(c.text) == 266_133
    assert c.token_counts.count(0) == 51 and c.token_counts[ord('"')] == 0
    assert "*** START" not in c.text and "*** END" not in c.text and "Project Gutenberg" not in c.text
    assert c.text.lstrip().startswith("The Great Gatsby")


def test_shared_book_map(book_path):
    c = load_corpus(str(book_path), "map")
    assert len(c.text) == 270_832 and c.token_counts.count(0) == 49
    assert c.token_counts[ord('"')] > 0 and c.token_counts[ord("'")] > 0


def test_file_without_markers_is_used_whole_with_warning(tmp_path, caplog):
    path = tmp_path / "plain.txt"
    path.write_text("just some text\n")
    with caplog.at_level(logging.WARNING, logger="runner.data.corpus"):
        assert load_corpus(str(path), "drop").text == "just some text\n"
    assert "no Project Gutenberg START/END markers" in caplog.text


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"  \n", "empty"), (b"\x00\x01\x02binary", "binary"),
    (b"caf\xe9 latin-1", "not UTF-8 (byte 0xe9 at offset 3)"),
])
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_corpus(str(path), "drop")
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"), "drop")


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(corpus_mod.ENV_VAR, "/from/env.txt")
    assert str(resolve_path("/explicit.txt")) == "/explicit.txt"
    assert str(resolve_path(None)) == "/from/env.txt"
    monkeypatch.delenv(corpus_mod.ENV_VAR)
    corpus_mod.CACHE_PATH.parent.mkdir()
    corpus_mod.CACHE_PATH.write_text(SMALL_BOOK)
    assert resolve_path(None) == corpus_mod.CACHE_PATH


def test_download_is_cached(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(corpus_mod.ENV_VAR, raising=False)
    calls = []

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return SMALL_BOOK.encode()

    def fake_urlopen(url, timeout):
        calls.append((url, timeout))
        return Response()

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    assert load_corpus(None, "drop").text.startswith("In my younger")
    assert load_corpus(None, "drop").text.startswith("In my younger")
    assert calls == [(corpus_mod.GUTENBERG_URL, corpus_mod.DOWNLOAD_TIMEOUT_S)]  # second load used data/
    assert (tmp_path / "data" / "pg64317.txt").read_text() == SMALL_BOOK


def test_offline_without_copy_names_the_env_var(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(corpus_mod.ENV_VAR, raising=False)

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(CorpusError, match=f"set {corpus_mod.ENV_VAR}="):
        load_corpus(None, "drop")
    assert not (tmp_path / "data" / "pg64317.txt").exists()


def test_loaded_once_per_process_until_the_file_changes(tmp_path):
    """A sweep's worker reads and cleans the book once for all its runs, but never serves a stale copy."""
    path = tmp_path / "book.txt"
    path.write_text(SMALL_BOOK, encoding="utf-8")
    first = load_corpus(str(path), "drop")
    assert load_corpus(str(path), "drop") is first
    assert load_corpus(str(path), "map") is not first
    path.write_text(SMALL_BOOK.replace("my father", "my grandfather"), encoding="utf-8")
    changed = load_corpus(str(path), "drop")
    assert "grandfather" in changed.text and "grandfather" not in first.text


def test_a_book_that_changed_on_the_way_is_refused_naming_both_hashes(small_book):
    """What a sweep's task does with the bytes the driver sent: they clean to the same corpus as the
    file when intact; one byte changed after the driver hashed them is one line naming both hashes."""
    book = read_book(small_book)
    assert book.sha256 == hashlib.sha256(small_book.read_bytes()).hexdigest()
    sent = corpus_of(book, "drop")
    assert sent == load_corpus(str(small_book), "drop") and sent.file_sha256 == book.sha256
    assert sent.summary()["file_sha256"] == book.sha256
    tampered = Book(book.data[:100] + bytes([book.data[100] ^ 1]) + book.data[101:], book.source, book.sha256)
    with pytest.raises(CorpusError) as refused:
        corpus_of(tampered, "drop")
    message = str(refused.value)
    actual = hashlib.sha256(tampered.data).hexdigest()
    assert "\n" not in message and book.sha256 in message and actual in message and str(small_book) in message
