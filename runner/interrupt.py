"""SIGTERM taken as Ctrl-C: what Slurm's `scancel` and time limits, Kubernetes, `timeout` and
`kill` send. A run it reaches stops where it is, is marked `cancelled` and resumes from its last
checkpoint, as after Ctrl-C; `lilgatsby` then exits with 143 (128 + SIGTERM), as shells report it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled wherever Ctrl-C is (a KeyboardInterrupt), told apart where it is said."""

    def __init__(self) -> None:
        super().__init__("SIGTERM")


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (elsewhere signal handlers
    cannot be set: the block runs as it is); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def how_cancelled(interrupt: KeyboardInterrupt) -> str:
    """run.json's `error` of a run cancelled by `interrupt`."""
    by = "SIGTERM (scancel, a time limit, kill)" if isinstance(interrupt, Terminated) else "the user (Ctrl-C)"
    return f"cancelled by {by}; resumable"
