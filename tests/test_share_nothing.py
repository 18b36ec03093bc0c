"""Sweeps on clusters that share nothing with the driver: the book travels with the tasks (checked
by its SHA-256), a local runs root is used only where every node sees it, and a node whose code,
Python or Ray is not the driver's is refused in one line (docs/sweeps.md, "Clusters that share
nothing").

The cluster tests build a real two-node Ray cluster on this machine whose worker node runs in its
own mount namespace, with the driver's directory (the book, a local runs root) hidden under an
empty tmpfs, and a third node whose lilgatsby code differs (a changed copy of runner/ mounted over
the checkout). They need root and unshare(1), as CI has.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ports import free_port

import runner.launch.sweep
from runner.cli import main
from runner.data.corpus import read_book
from runner.launch.nodes import identity, mismatch

from conftest import REPO, alive_nodes, isolated_cluster, ray_cli, wait_until

SMOKE_SWEEP = REPO / "experiments" / "smoke_sweep.yaml"
SHORT = ["--set", "train.steps=20", "--set", "train.seed=[1]", "--quiet"]


def test_a_node_of_another_version_is_named_with_both_versions():
    driver = identity()
    assert mismatch(driver, dict(driver), "worker w") is None
    other = {**driver, "lilgatsby": "0.1.0 (code 0123456789ab)"}
    assert mismatch(driver, other, "worker w") == (f"worker w: lilgatsby 0.1.0 (code 0123456789ab) differs from the "
                                                   f"driver's {driver['lilgatsby']}")
    assert mismatch(driver, {**driver, "python": "3.12"}, "node n").startswith("node n: python 3.12 differs")
    assert mismatch(driver, {**driver, "ray": "2.9.0"}, "node n") == f"node n: ray 2.9.0 differs from the driver's " \
                                                                     f"{driver['ray']}"


@pytest.mark.slow
def test_the_tasks_train_on_the_bytes_the_driver_read(tmp_path, small_book, monkeypatch):
    """The driver reads the book, then the file is gone before Ray starts: a task that opened the
    path would fail; each gets the bytes from the object store and run.json names their hash."""
    book = tmp_path / "book" / "pg.txt"
    book.parent.mkdir()
    shutil.copy(small_book, book)
    start = runner.launch.sweep.start_or_join

    def start_without_the_book(address):
        shutil.rmtree(book.parent)
        return start(address)

    monkeypatch.setattr(runner.launch.sweep, "start_or_join", start_without_the_book)
    runs = tmp_path / "runs"
    assert main(["sweep", str(SMOKE_SWEEP), "--runs", str(runs), "--corpus", str(book), *SHORT]) == 0
    manifests = [json.loads(p.read_text()) for p in runs.glob("smoke_sweep/*/run.json")]
    assert len(manifests) == 2 and {m["status"] for m in manifests} == {"complete"}
    for m in manifests:
        assert m["corpus"]["file_sha256"] == read_book(small_book).sha256 and m["corpus"]["source"] == str(book)


@pytest.mark.slow
def test_a_book_changed_after_the_driver_hashed_it_fails_the_runs_naming_the_hash(tmp_path, small_book, monkeypatch,
                                                                                  capsys):
    """The driver hashes and checks the book, then one byte of what it puts in Ray's object store changes."""
    put = ray.put
    monkeypatch.setattr(ray, "put", lambda data: put(data.replace(b"younger", b"youngex", 1)))
    runs = tmp_path / "runs"
    assert main(["sweep", str(SMOKE_SWEEP), "--runs", str(runs), "--corpus", str(small_book), *SHORT]) == 1
    sha256 = read_book(small_book).sha256
    failed = [line for line in capsys.readouterr().out.splitlines() if "FAILED" in line]
    assert len(failed) == 2 and all(f"not the {sha256} the driver read" in line for line in failed), failed
    for path in runs.glob("smoke_sweep/*/run.json"):
        manifest = json.loads(path.read_text())
        assert manifest["status"] == "failed" and sha256 in manifest["error"]
        assert not (path.parent / "recording.safetensors").exists()


# --- a real cluster whose worker sees nothing of the driver's ----------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, env, driver-only directory, shared directory): a head with no CPUs (every task
    runs on the worker) and a worker node that cannot see the driver-only directory."""
    driver_only, shared, env = isolated_cluster(tmp_path_factory)
    address = f"127.0.0.1:{free_port()}"
    common = ["--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    subprocess.run(ray_cli("start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=0",
                        "--include-dashboard=false", *common), env=env,
                   check=True, capture_output=True, timeout=120)
    worker = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f'mount -t tmpfs none "{driver_only}" && exec "$@"', "sh",
                               *ray_cli("start", f"--address={address}", "--num-cpus=2", "--block", *common)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: alive_nodes(address, env) == 2, "the worker node to join", timeout_s=120, poll_s=1)
        yield address, env, driver_only, shared
    finally:
        worker.terminate()
        subprocess.run(ray_cli("stop", "--force"), env=env, capture_output=True, timeout=120)
        worker.wait(timeout=60)


def _sweep(address: str, env: dict, runs: Path, book: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", "sweep", str(SMOKE_SWEEP), "--address", address,
                           "--runs", str(runs), "--corpus", str(book), *SHORT],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("lilgatsby: error:")]


@pytest.mark.long
def test_a_cluster_whose_worker_has_no_book_and_no_runs_directory(cluster, small_book):
    address, env, driver_only, shared = cluster
    book = driver_only / "pg.txt"  # where only the driver sees it
    shutil.copy(small_book, book)
    refused = _sweep(address, env, driver_only / "runs", book)
    assert refused.returncode == 2, refused.stderr
    (line,) = _error_lines(refused)
    assert line.startswith(f"lilgatsby: error: --runs {driver_only / 'runs'}: node ") and "does not see" in line
    assert "use s3://bucket/prefix or a path every node mounts" in line
    assert not list((driver_only / "runs").glob("smoke_sweep/*"))  # nothing trained into it
    done = _sweep(address, env, shared / "runs", book)  # a runs root both see; the book still the driver's only
    assert done.returncode == 0, done.stdout + done.stderr
    manifests = [json.loads(p.read_text()) for p in (shared / "runs").glob("smoke_sweep/*/run.json")]
    assert len(manifests) == 2 and {m["status"] for m in manifests} == {"complete"}
    assert {m["environment"]["pid"] for m in manifests}.isdisjoint({os.getpid()})
    assert all(m["corpus"]["file_sha256"] == read_book(small_book).sha256 for m in manifests)


@pytest.mark.long
def test_a_node_with_other_code_is_refused_in_one_line(cluster, small_book, tmp_path):
    """A third node runs a changed copy of runner/ (one comment added): the sweep names both versions."""
    address, env, _, shared = cluster
    other = tmp_path / "runner"
    shutil.copytree(REPO / "runner", other, ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "text.py", "a", encoding="utf-8") as f:
        f.write("# another build\n")
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f'mount --bind "{other}" "{REPO / "runner"}" && exec "$@"', "sh",
                             *ray_cli("start", f"--address={address}", "--num-cpus=1", "--block",
                                   "--disable-usage-stats", "--node-ip-address=127.0.0.1")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: alive_nodes(address, env) == 3, "the third node to join", timeout_s=120, poll_s=1)
        refused = _sweep(address, env, shared / "other-runs", small_book)
        assert refused.returncode == 2, refused.stderr
        (line,) = _error_lines(refused)
        assert ": lilgatsby 0.1.0 (code " in line and "differs from the driver's 0.1.0 (code " in line, line
        assert not list((shared / "other-runs").glob("smoke_sweep/*"))
    finally:
        node.terminate()
        node.wait(timeout=60)
