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


_received = False  # whether SIGTERM arrived in the current block (Ray re-raises a KeyboardInterrupt as its own)


def _raise_terminated(signum: int, frame: object) -> None:
    """The first SIGTERM only: `scancel` signals every process of a job, and its batch script passes
    its own on, so a second one would otherwise cut short the clean-up (runs marked cancelled) of the first."""
    global _received
    if _received:
        return
    _received = True
    raise Terminated()


def by_sigterm(interrupt: KeyboardInterrupt) -> bool:
    """Whether `interrupt` is SIGTERM's, also where Ray caught it and raised a KeyboardInterrupt
    of its own (`ray.wait` and `ray.get` do)."""
    return isinstance(interrupt, Terminated) or _received


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (elsewhere signal handlers
    cannot be set: the block runs as it is); the previous handler is restored after, or the
    default where the previous one was not Python's (Ray's C++ core installs its own, which
    aborts: a block entered after `ray.init` takes SIGTERM back from it)."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = False
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def sigint_as_ctrl_c() -> None:
    """SIGINT raises KeyboardInterrupt in this process from now on, whatever it inherited. `ray job
    stop` sends a sweep's driver SIGINT (RAY_JOB_STOP_SIGNAL), but Ray blocks SIGINT in its own
    processes and its job supervisor unblocks it in the job's only where its own environment names
    that signal: twice in CI a stopped job's driver ran on to its end, the signal never taken."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)


def how_cancelled(interrupt: KeyboardInterrupt) -> str:
    """run.json's `error` of a run cancelled by `interrupt`."""
    by = "SIGTERM (scancel, a time limit, kill)" if by_sigterm(interrupt) else "the user (Ctrl-C)"
    return f"cancelled by {by}; resumable"
