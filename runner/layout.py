"""The layout of a run directory and of an experiment directory: every file and folder name, and
where each lives. Local disks and buckets share it (docs/runs.md, docs/storage.md):

    <runs root>/<experiment>/                index.jsonl, index.csv, report/, slurm/
    <runs root>/<experiment>/<run id>/       run.json, recording.safetensors, metrics.csv, ...

Nothing else spells a run file's name; this module imports nothing, so every layer can use it.
"""

from __future__ import annotations

import re
from typing import Generic, Protocol, TypeVar

# -- a run directory -----------------------------------------------------------------------------
MANIFEST = "run.json"  # the source of truth: what the run is and where it stands
RECORDING = "recording.safetensors"
CONVERTING = RECORDING + ".converting"  # `lilgatsby compact`'s new recording, until it is renamed over it
PARTIAL = ".partial"  # suffix of a file or folder being written (a recording until it is complete)
TMP = ".tmp"  # suffix of a file being written under a temporary name
CHECKPOINT = "checkpoint.safetensors"
PROGRESS = "progress.json"
METRICS, METRICS_SOURCE = "metrics.csv", "metrics.source.json"
PARTIAL_METRICS = METRICS + PARTIAL  # the metrics so far, appended to as the run trains
# TensorBoard's event file: any name holding "tfevents"; fixed, so a rebuilt one replaces the old
EVENTS = "events.out.tfevents.lilgatsby"
TRAIN_LOG = "train.log"
TOKENIZER = "tokenizer"
MODELS = "models"  # whole-model snapshots: models/step-<N>/
LOCK = ".lock"  # the local trainer's advisory lock
LEASE = ".lease"  # the bucket trainer's lease
PARTS = RECORDING + ".parts"  # in a bucket while a run trains: the recording's header and row objects
PARTS_HEADER = "header"
PROBE_PREFIX = ".lilgatsby-probe-"  # a bucket's write probe (deleted at once)

# -- an experiment directory ---------------------------------------------------------------------
INDEX_JSONL, INDEX_CSV = "index.jsonl", "index.csv"
REPORT, REPORT_PAGE = "report", "report.html"
SLURM = "slurm"  # a Slurm sweep's job directories: slurm/<tag>/ (its batch script, its log)

_ROWS = re.compile(r"rows-(\d+)-(\d+)")
_SNAPSHOT = re.compile(rf"{MODELS}/step-(\d+)/.+")
# What a run keeps in a bucket only while it trains: never part of a copy
_TRANSIENT = re.compile(rf"(.*/)?({re.escape(LEASE)}|{re.escape(CHECKPOINT)}|{re.escape(PARTS)}/.*|"
                        rf"{re.escape(PARTIAL_METRICS)}|{re.escape(PROBE_PREFIX)}.*)")
# What a scratch directory keeps on its node: the lock, the partial recording (shipped as row
# objects), the checkpoint and manifest (shipped on their own) and files being written
_LOCAL_ONLY = re.compile(rf"{re.escape(LOCK)}|.*{re.escape(PARTIAL)}(/.*)?|.*{re.escape(TMP)}|"
                         rf"{re.escape(CHECKPOINT)}|{re.escape(MANIFEST)}")


# Everything a run directory may hold: its files (or one being written: NAME.partial, NAME.tmp,
# .NAME.<random>.tmp, or .tmpXXXXXX, which safetensors' save_file left when a crash cut short a
# checkpoint's write before this project serialized them itself), its folders' contents, and what
# a person's file browser leaves
_RUN_FILES = (MANIFEST, RECORDING, CONVERTING, CHECKPOINT, PROGRESS, METRICS, METRICS_SOURCE, PARTIAL_METRICS, EVENTS,
              TRAIN_LOG, LOCK, LEASE)
_RUN_FOLDERS = (TOKENIZER, MODELS, PARTS, REPORT)
_RUN_FILE = re.compile(rf"\.?({'|'.join(map(re.escape, _RUN_FILES))})({re.escape(PARTIAL)}|(\.[^/]+)?{re.escape(TMP)})?"
                       rf"|({'|'.join(map(re.escape, _RUN_FOLDERS))})({re.escape(PARTIAL)})?/.+"
                       rf"|{re.escape(PROBE_PREFIX)}[^/]*|\.tmp[A-Za-z0-9]{{6}}|(.+/)?\.DS_Store|\.ipynb_checkpoints/.*")


class Joinable(Protocol):
    """A local Path or a `runner.storage.location.Location`: anything that joins names with `/`."""

    def __truediv__(self, name: str) -> Joinable: ...


P = TypeVar("P", bound=Joinable)


class RunFiles(Generic[P]):
    """Where each file of the run directory `root` lives (`root` local or in a bucket)."""

    def __init__(self, root: P):
        self.root = root

    def _at(self, name: str) -> P:
        return self.root / name  # type: ignore[return-value]  # `/` keeps the kind of `root`

    manifest = property(lambda self: self._at(MANIFEST))
    recording = property(lambda self: self._at(RECORDING))
    partial_recording = property(lambda self: self._at(RECORDING + PARTIAL))
    checkpoint = property(lambda self: self._at(CHECKPOINT))
    checkpoint_tmp = property(lambda self: self._at(CHECKPOINT + TMP))
    progress = property(lambda self: self._at(PROGRESS))
    metrics = property(lambda self: self._at(METRICS))
    metrics_source = property(lambda self: self._at(METRICS_SOURCE))
    partial_metrics = property(lambda self: self._at(PARTIAL_METRICS))
    events = property(lambda self: self._at(EVENTS))
    train_log = property(lambda self: self._at(TRAIN_LOG))
    tokenizer = property(lambda self: self._at(TOKENIZER))
    models = property(lambda self: self._at(MODELS))
    lock = property(lambda self: self._at(LOCK))
    lease = property(lambda self: self._at(LEASE))
    parts = property(lambda self: self._at(PARTS))

    def snapshot(self, step: int) -> P:
        return self._at(f"{MODELS}/step-{step}")

    def rows(self, first: int, stop: int) -> P:
        """The bucket object of the recording's rows first..stop-1 while the run trains."""
        return self._at(f"{PARTS}/{rows_key(first, stop)}")


def partial(path: P) -> P:
    """Where a file or folder lives until it is complete (one with the final name always is)."""
    return path.with_name(path.name + PARTIAL)  # type: ignore[attr-defined]


def rows_key(first: int, stop: int) -> str:
    return f"rows-{first:08d}-{stop:08d}"


def row_span(key: str) -> tuple[int, int] | None:
    """(first, stop) of a row object's name under PARTS, None for any other name."""
    match = _ROWS.fullmatch(key)
    return (int(match[1]), int(match[2])) if match else None


def snapshot_step(relative: str) -> int | None:
    """The step of a snapshot file (`models/step-<N>/...`, relative to its run), else None."""
    match = _SNAPSHOT.fullmatch(relative)
    return int(match[1]) if match else None


def is_run_file(relative: str) -> bool:
    """A name a run directory may hold (relative to it): `lilgatsby rm` deletes only directories
    that hold nothing else, and a run trains only into one."""
    return bool(_RUN_FILE.fullmatch(relative))


def is_transient(relative: str) -> bool:
    """A file a run keeps in a bucket only while it trains (lease, checkpoint, row objects, the metrics
    so far, probes)."""
    return bool(_TRANSIENT.fullmatch(relative))


def is_local_only(relative: str) -> bool:
    """A scratch file that never goes to the bucket as it is."""
    return bool(_LOCAL_ONLY.fullmatch(relative)) or f"{PARTIAL}/" in relative


def is_shipped_once(relative: str) -> bool:
    """Snapshot and tokenizer files: written once, so uploaded once."""
    return relative.startswith((f"{MODELS}/", f"{TOKENIZER}/"))


class Place(Joinable, Protocol):
    """What `recording_of` asks of a location (`runner.storage.location.Location` has it)."""

    @property
    def name(self) -> str: ...

    def exists(self) -> bool: ...


L = TypeVar("L", bound=Place)


def recording_of(where: L) -> L:
    """A recording given as itself (a `.safetensors` name, or any file) or as its run directory."""
    return where if where.name.endswith(".safetensors") or where.exists() else RunFiles(where).recording
