"""Sweeps submitted as Ray jobs, from a machine that is not a node of the cluster.

`lilgatsby sweep EXPERIMENT --address http://HEAD:8265` (the dashboard's address, as `ray job
submit` takes it): a Ray driver must run on a node, so the sweep's driver runs on the cluster's
head as a Ray job, and the submitting machine (a laptop, the host of a containers' cluster) needs
only the dashboard's port and the cluster's token. What the driver needs travels in the job's
working directory: the experiment (its includes merged into one file) and the book. The submitter
checks the input first (experiment, book, runs root); the job's driver checks, before anything
trains, that it runs the submitter's lilgatsby code and reads the book the submitter hashed
(`check_submission`), then sweeps as it would on the head (every node checked, the book sent to
the tasks through the object store). The submitter follows the job's log and exits with its exit
code; Ctrl-C stops the job the way Ctrl-C stops a sweep (running runs marked cancelled, resumable).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shlex
import socket
import tempfile
import time
from pathlib import Path
from typing import TypeGuard

import yaml

from runner.config import load_runs
from runner.config.loading import experiment_data
from runner.data.corpus import read_book
from runner.errors import ConfigError, UserError
from runner.launch.nodes import identity
from runner.launch.ray_session import TOKEN_HELP, token_mode_on
from runner.launch.sweep import read_books
from runner.storage.location import Location
from runner.text import plural

SCHEMES = ("http://", "https://")
EXPERIMENT_FILE, BOOK_DIR, SUBMISSION_FILE = "experiment.yaml", "book", "submission.json"
# a stopped job gets SIGINT, which a sweep takes as Ctrl-C, and time to mark its runs cancelled
STOP_ENV = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "60"}
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60.0
CHATTY_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                  "ray._private.runtime_env.packaging")  # a line per package made and uploaded, socket closed


def is_job_address(address: str | None) -> TypeGuard[str]:
    """A dashboard's address (http:// or https://) means: submit the sweep as a job."""
    return address is not None and address.startswith(SCHEMES)


def submit(path: Path, overrides: list[str], runs_root: Location, *, address: str, force: bool = False,
           restart: bool = False, max_retries: int = 2, detach: bool = False) -> int:
    """Submit the sweep of `path` to the cluster whose dashboard is at `address` and follow it
    (unless `detach`); returns the sweep's exit code on the head (0, 1 or 2), 130 after Ctrl-C."""
    if runs_root.local is not None and not runs_root.local.is_absolute():
        raise ConfigError(f"--runs {runs_root}: a relative path would be a directory of the job's own on the "
                          f"cluster's head: give s3://bucket/prefix or an absolute path every node mounts")
    runs = load_runs(path, overrides)  # bad input is refused here, before anything is sent
    _, books = read_books(runs)  # read and checked to clean, as a sweep's driver does
    ((where, book),) = books.items()  # one: corpus.path is not part of the run id
    book_name = Path(where).name
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="lilgatsby-job-") as staging:
        work = Path(staging)
        (work / EXPERIMENT_FILE).write_text(yaml.safe_dump(experiment_data(path), sort_keys=False), encoding="utf-8")
        (work / BOOK_DIR).mkdir()
        (work / BOOK_DIR / book_name).write_bytes(book.data)  # the bytes hashed and checked
        (work / SUBMISSION_FILE).write_text(json.dumps({
            "lilgatsby": identity()["lilgatsby"], "book_sha256": book.sha256, "host": socket.gethostname()}))
        kept = [o for o in overrides if not o.replace(" ", "").startswith("corpus.path=")]
        command = ["lilgatsby", "sweep", EXPERIMENT_FILE, "--runs", str(runs_root),
                   "--corpus", f"{BOOK_DIR}/{book_name}", "--submission", SUBMISSION_FILE,
                   "--max-retries", str(max_retries), "--quiet", *[a for o in kept for a in ("--set", o)],
                   *(["--force"] if force else []), *(["--restart"] if restart else [])]
        job_id = f"lilgatsby-{runs[0].experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        _submit_job(client, address, entrypoint=shlex.join(command), submission_id=job_id,
                    runtime_env={"working_dir": staging, "env_vars": STOP_ENV},
                    metadata={"experiment": runs[0].experiment.name})
    print(f"submitted job {job_id} to {address}: {plural(len(runs), 'run')} of {runs[0].experiment.name} "
          f"into {runs_root}", flush=True)
    follow = f"RAY_ADDRESS={address} ray job logs --follow {job_id}"
    if detach:
        print(f"follow it: {follow}; stop it: RAY_ADDRESS={address} ray job stop {job_id}")
        return 0
    try:
        asyncio.run(_print_log(client, job_id))
        info = _finished(client, job_id)
    except KeyboardInterrupt:
        print(f"lilgatsby: stopping job {job_id} (its running runs are marked cancelled; the same command "
              f"resumes them)", flush=True)
        client.stop_job(job_id)
        _finished(client, job_id)
        return 130
    return exit_code(info, follow)


def exit_code(info, follow: str) -> int:
    """The sweep's own exit code (0, 1 or 2) from the job's details; a job that ended otherwise
    (its runtime environment failed, no `lilgatsby` on the head, its driver killed) is a fault of
    the environment: one line, with the command that shows the job's log."""
    code = info.driver_exit_code
    if code in (0, 1, 2) or (code is None and info.status.value == "SUCCEEDED"):
        return code or 0
    how = f"its driver exited with code {code}" if code is not None else _first_line(info.message or "no message")
    raise UserError(f"job {info.submission_id} {info.status.value.lower()}: {how} (its log: {follow})")


def _client(address: str):  # -> JobSubmissionClient
    """The cluster's Jobs API, presenting the token (RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)."""
    try:
        import aiohttp  # noqa: F401  (with requests, what ray[default] adds: the client's HTTP and log stream)
        import requests  # noqa: F401
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise ConfigError(f"--address {address}: submitting a job needs Ray's job client: "
                          f"pip install 'lilgatsby[cluster]' (make setup installs it)") from None
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]
    from ray.exceptions import AuthenticationError

    token_mode_on()
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise ConfigError(f"--address {address}: no Ray token to present: {TOKEN_HELP}")
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise ConfigError(f"--address {address}: the Ray cluster refused this client's token (missing or wrong): "
                          f"{TOKEN_HELP}") from None
    except (ConnectionError, RuntimeError) as e:  # nothing listens there; an HTTP error
        raise ConfigError(f"--address {address}: no Ray dashboard answered there ({_first_line(e)})") from None


def _submit_job(client, address: str, **job) -> None:
    """Submit, waiting up to AGENT_WAIT_S for the head's job agent: a cluster just started has its
    dashboard up before the agent that runs jobs."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() >= deadline:
                raise UserError(f"--address {address}: the cluster did not take the job: {_first_line(e)}") from None
            time.sleep(1.0)


async def _print_log(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _finished(client, job_id: str, timeout_s: float = 120.0):  # -> JobDetails
    """The job's details once it has finished (the log can end a moment before its status does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if info.status.value in FINISHED or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def check_submission(submission: Path, book: str | None) -> None:
    """In the job, before the sweep: this node runs the submitter's lilgatsby code, and the book in
    the job's working directory hashes to what the submitter read (one line naming both, else)."""
    sent = json.loads(submission.read_text(encoding="utf-8"))
    here = identity()["lilgatsby"]
    if sent["lilgatsby"] != here:
        raise ConfigError(f"the cluster's head {socket.gethostname()} runs lilgatsby {here}, not the "
                          f"{sent['lilgatsby']} of the machine that submitted the job ({sent['host']})")
    received = read_book(Path(book or ""))
    if received.sha256 != sent["book_sha256"]:
        raise ConfigError(f"{book}: the book's bytes hash to sha256 {received.sha256} here, not the "
                          f"{sent['book_sha256']} the submitting machine ({sent['host']}) read: changed on the way; "
                          f"nothing is trained on them")


def _first_line(error: object) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
