"""One trainer per run on a bucket: a lease object taken with a conditional write.

`<run>/.lease` is created with If-None-Match (only one writer succeeds), renewed every
third of its time to live by a background thread with If-Match (only its holder can), and deleted when the run
ends. A trainer that finds the lease held watches it: renewed means its holder is alive (RunLocked); a
trainer that dies stops renewing, its lease lapses after its time to live, and the watcher replaces it
(again with If-Match, so two cannot both take a lapsed lease). A lease's age is the
server's: its Date header minus the object's Last-Modified, so the nodes' clocks do not matter.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from runner.errors import RunLocked
from runner.layout import RunFiles
from runner.settings import lease_ttl_s
from runner.storage.s3 import ObjectInfo, ObjectStore, PreconditionFailed, StorageError
from runner.storage.uri import S3Uri

log = logging.getLogger(__name__)


class Lease:
    """`with Lease(store, run): ...` holds the run's lease (RunLocked when another trainer holds it)."""

    def __init__(self, store: ObjectStore, run: S3Uri, ttl_s: float | None = None):
        self.store, self.uri = store, RunFiles(run).lease
        self.ttl_s = ttl_s or lease_ttl_s()  # seconds it outlives its trainer's last renewal
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "renewed_at": time.time(), "ttl_s": self.ttl_s}).encode()

    def acquire(self) -> None:
        while True:
            try:
                self.etag = self.store.put_bytes(self.uri, self._body(), if_none_match=True)
                break
            except PreconditionFailed:
                pass
            seen = self._await_lapse()
            if seen is None:
                continue  # released meanwhile
            try:  # lapsed: take it over, unless another trainer just did
                self.etag = self.store.put_bytes(self.uri, self._body(), if_match=seen.etag)
                log.warning("%s: took over a lease that lapsed", self.uri.parent)
                break
            except PreconditionFailed:
                continue
        self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._thread.start()

    def _await_lapse(self) -> ObjectInfo | None:
        """Watch a held lease until it lapses (returned, to take over) or disappears (None); RunLocked
        as soon as its holder renews it. A live holder renews within a third of its time to live, so
        a second sweep learns of it in that time, while a retry of a killed trainer (Ray's, on
        another node) waits for the dead trainer's lease to lapse instead of giving up."""
        seen = self.store.head(self.uri)
        if seen is None:
            return None
        held_as = seen.etag
        holder = _parsed(self.store.get_bytes(self.uri))  # once: who holds it and by which time to live
        ttl_s = float(holder.get("ttl_s", self.ttl_s))  # the holder's, as it renews by it
        while seen is not None:
            if seen.etag != held_as:
                raise RunLocked(f"{self.uri.parent}: another process is training this run ({holder.get('host', '?')}, "
                                f"pid {holder.get('pid', '?')}; its lease lapses {ttl_s:.0f} s after it stops "
                                f"renewing)")
            if seen.age_s >= ttl_s:
                return seen
            time.sleep(min(ttl_s - seen.age_s, max(0.2, ttl_s / 12)))
            seen = self.store.head(self.uri)
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.etag = self.store.put_bytes(self.uri, self._body(), if_match=self.etag)
            except PreconditionFailed:
                log.error("%s: lost the run's lease to another trainer", self.uri.parent)
                self.lost.set()
                return
            except StorageError as e:  # the server is away: keep trying; uploads will fail the run
                log.warning("%s: cannot renew the lease: %s", self.uri.parent, e)

    def check(self) -> None:
        """Raise when the lease was lost (before anything is published under it)."""
        if self.lost.is_set():
            raise RunLocked(f"{self.uri.parent}: another trainer took over this run's lease")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost.is_set():
            try:
                self.store.delete([self.uri])
            except StorageError as e:
                log.warning("%s: could not release the lease (it lapses in %.0f s): %s", self.uri.parent,
                            self.ttl_s, e)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _parsed(body: bytes | None) -> dict:
    try:
        holder = json.loads(body or b"{}")
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


def lease_is_live(store: ObjectStore, run: S3Uri) -> bool:
    """Whether a trainer holds the run's lease now (it is there and younger than its time to live)."""
    uri = RunFiles(run).lease
    seen = store.head(uri)
    if seen is None:
        return False
    return seen.age_s < float(_parsed(store.get_bytes(uri)).get("ttl_s", lease_ttl_s()))


def remove_transients(store: ObjectStore, run: S3Uri) -> None:
    """What a run keeps in the bucket only while it trains: its checkpoint, metrics so far, row
    objects (and any unfinished upload there) and lease."""
    files = RunFiles(run)
    store.delete([files.checkpoint, files.partial_metrics])
    store.delete_below(files.parts)
    store.delete([files.lease])
