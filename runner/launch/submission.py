"""What a sweep submitted to run elsewhere carries, and what its driver checks there first.

A sweep's driver may run on another machine than the one it was started from: the head of a Ray
cluster (`runner.launch.job`, a Ray job) or the first node of a Slurm allocation
(`runner.launch.slurm`). Either way the submitter writes one directory that the driver reads: the
experiment with its includes merged into one file, the book (the driver's machine need not have it)
and `submission.json` (the submitter's lilgatsby code and the book's SHA-256). The driver's first
act, before anything trains, is `check_submission`: the same code, the same book bytes.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import yaml

from runner.config import Run
from runner.config.loading import experiment_data
from runner.data.corpus import Book, read_book
from runner.errors import ConfigError
from runner.launch.nodes import identity
from runner.launch.sweep import read_books
from runner.storage.location import Location

EXPERIMENT_FILE, BOOK_DIR, SUBMISSION_FILE = "experiment.yaml", "book", "submission.json"


def check_runs_root(runs_root: Location, where: str) -> None:
    """A sweep's driver elsewhere writes to `runs_root` as it is named here: a relative path would
    be relative to the driver's directory, not this one's."""
    if runs_root.local is not None and not runs_root.local.is_absolute():
        raise ConfigError(f"--runs {runs_root}: a relative path would be a directory of the job's own on {where}: "
                          f"give s3://bucket/prefix or an absolute path every node mounts")


def the_book(runs: list[Run]) -> tuple[str, Book]:
    """The sweep's book (its file name, its bytes), read and checked to clean as a sweep's driver
    does: before anything is sent."""
    _, books = read_books(runs)
    ((where, book),) = books.items()  # one: corpus.path is not part of the run id
    return Path(where).name, book


def stage(work: Path, path: Path, overrides: list[str], book: tuple[str, Book], runs_root: Location, *,
          force: bool, restart: bool, command: str = "sweep", options: tuple[str, ...] = ()) -> list[str]:
    """Write the experiment, the book and submission.json into `work`; return the driver's `lilgatsby
    command` (sweep, or train for one point), with paths relative to `work` (the directory it runs in)."""
    book_name, book_bytes = book
    (work / EXPERIMENT_FILE).write_text(yaml.safe_dump(experiment_data(path), sort_keys=False), encoding="utf-8")
    (work / BOOK_DIR).mkdir()
    (work / BOOK_DIR / book_name).write_bytes(book_bytes.data)  # the bytes hashed and checked
    (work / SUBMISSION_FILE).write_text(json.dumps({
        "lilgatsby": identity()["lilgatsby"], "book_sha256": book_bytes.sha256, "host": socket.gethostname()}))
    kept = [o for o in overrides if not o.replace(" ", "").startswith("corpus.path=")]
    return ["lilgatsby", command, EXPERIMENT_FILE, "--runs", str(runs_root),
            "--corpus", f"{BOOK_DIR}/{book_name}", "--submission", SUBMISSION_FILE, *options,
            "--quiet", *[a for o in kept for a in ("--set", o)],
            *(["--force"] if force else []), *(["--restart"] if restart else [])]


def check_submission(submission: Path, book: str | None) -> None:
    """In the driver, before the sweep: this machine runs the submitter's lilgatsby code, and the
    book it was given hashes to what the submitter read (one line naming both, else)."""
    sent = json.loads(submission.read_text(encoding="utf-8"))
    here = identity()["lilgatsby"]
    if sent["lilgatsby"] != here:
        raise ConfigError(f"the sweep's driver on {socket.gethostname()} runs lilgatsby {here}, not the "
                          f"{sent['lilgatsby']} of the machine that submitted it ({sent['host']})")
    received = read_book(Path(book or ""))
    if received.sha256 != sent["book_sha256"]:
        raise ConfigError(f"{book}: the book's bytes hash to sha256 {received.sha256} here, not the "
                          f"{sent['book_sha256']} the submitting machine ({sent['host']}) read: changed on the way; "
                          f"nothing is trained on them")
