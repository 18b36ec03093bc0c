"""Sweeps submitted as Ray jobs, from a machine that is not a node of the cluster.

`lilgatsby sweep EXPERIMENT --address http://HEAD:8265` (the dashboard's address, as `ray job
submit` takes it): a Ray driver must run on a node, so the sweep's driver runs on the cluster's
head as a Ray job, and the submitting machine (a laptop, the host of a containers' cluster) needs
only the dashboard's port and the cluster's token. What the driver needs travels in the job's
working directory: the experiment (its includes merged into one file) and the book. The submitter
checks the input first (experiment, book, runs root); the job's driver checks, before anything
trains, that it runs the submitter's lilgatsby code and reads the book the submitter hashed
(`runner.launch.submission`), then sweeps as it would on the head (every node checked, the book sent to
the tasks through the object store). The submitter follows the job's log and exits with its exit
code; Ctrl-C stops the job the way Ctrl-C stops a sweep (running runs marked cancelled, resumable).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shlex
import tempfile
import time
from pathlib import Path
from typing import TypeGuard

from runner.config import load_runs
from runner.errors import ConfigError, UserError
from runner.launch.ray_session import TOKEN_HELP, token_mode_on
from runner.launch.submission import check_runs_root, stage, the_book
from runner.storage.location import Location
from runner.text import plural

SCHEMES = ("http://", "https://")
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
    check_runs_root(runs_root, "the cluster's head")
    runs = load_runs(path, overrides)  # bad input is refused here, before anything is sent
    book = the_book(runs)
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="lilgatsby-job-") as staging:
        command = stage(Path(staging), path, overrides, book, runs_root, force=force, restart=restart,
                        options=("--max-retries", str(max_retries)))
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


def _first_line(error: object) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
