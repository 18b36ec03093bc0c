"""Token authentication of the Ray instances the project starts, tested with real clients.

A Ray cluster runs whatever a connected driver sends, so the embedded instance of `lilgatsby
sweep` runs in token mode: a driver in another process, without the token or with a wrong one,
is refused; `lilgatsby sweep --address` says so in one line; the token's holder is admitted.
(make test-container does the same for a cluster of containers and the dashboard's Jobs API.)
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.long  # ~60 s: a refused driver waits out Ray's own retries
HOLD = ("import os, time, ray; from runner.launch.ray_session import start_or_join; start_or_join(None); "
        "print(ray.get_runtime_context().gcs_address, os.environ['RAY_AUTH_TOKEN'], flush=True); time.sleep(600)")
DRIVER = ("import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
          "print('admitted:', ray.get(ray.remote(lambda: 6 * 7).remote()))")


def clean_env(home) -> dict:
    """This environment without any Ray token or mode, with `home` as home (where Ray looks for
    ~/.ray/auth_token). The instance listens on loopback only: a client on this machine reaches it
    with Ray's multi-node mode off (else Ray takes 127.0.0.1 for the machine's reachable IP)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, "HOME": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def embedded_instance(tmp_path_factory):
    """A sweep's embedded instance, held open in its own process and home: (GCS address, its token,
    the holding process's pid)."""
    home = tmp_path_factory.mktemp("owner-home")
    holder = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=clean_env(home), cwd=REPO)
    try:
        address, token = holder.stdout.readline().split()
        assert not (home / ".ray" / "auth_token").exists()  # the token is in memory, not on disk
        yield address, token, holder.pid
    finally:
        holder.kill()
        holder.wait()
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True,
                       env=clean_env(home))


def driver(address: str, env: dict) -> str:
    result = subprocess.run([sys.executable, "-c", DRIVER, address], capture_output=True, text=True, env=env,
                            timeout=180)
    return (result.stdout + result.stderr).strip().splitlines()[-1]


def test_the_embedded_instance_admits_only_its_token(embedded_instance, tmp_path, small_book):
    address, token, _ = embedded_instance
    stranger = clean_env(tmp_path)  # an empty home: no token anywhere
    # plain Ray drivers: no token (Ray's default mode finds none), a wrong one, the instance's
    assert "admitted" not in driver(address, stranger)
    assert "admitted" not in driver(address, {**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
    (tmp_path / "token").write_text(token)
    assert driver(address, {**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}) \
        == "admitted: 42"
    # lilgatsby sweep --address: one line naming what to set, exit code 2, in seconds
    sweep = [sys.executable, "-m", "runner.cli", "sweep", str(REPO / "experiments" / "smoke_sweep.yaml"),
             "--address", address, "--runs", str(tmp_path / "runs"), "--corpus", str(small_book)]
    for env, what in ((stranger, "no Ray token to present"),
                      ({**stranger, "RAY_AUTH_TOKEN": "0" * 64}, "the Ray cluster refused this client's token")):
        result = subprocess.run(sweep, capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 2, result.stderr
        (line,) = [x for x in result.stderr.splitlines() if not x.startswith("INFO ")]
        assert line.startswith(f"lilgatsby: error: --address {address}: {what}") and "RAY_AUTH_TOKEN_PATH" in line


def process_tree(pid: int) -> set[int]:
    parents = [tuple(map(int, line.split())) for line in subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout.splitlines()]
    tree, grown = {pid}, True
    while grown:
        found = {child for child, parent in parents if parent in tree}
        grown = not found <= tree
        tree |= found
    return tree


def test_the_embedded_instance_listens_on_loopback_only(embedded_instance):
    """Every socket its processes listen on (the driver, GCS, raylet, workers, the dashboard
    agents), as `ss` sees them."""
    address, _, pid = embedded_instance
    tree = process_tree(pid)
    listening = []  # (local address, process name)
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines():
        fields = line.split()
        owners = re.findall(r'\("([^"]+)",pid=(\d+)', line)
        listening += [(fields[3], name) for name, owner in owners if int(owner) in tree]
    assert address.startswith("127.0.0.1:") and any(name == "gcs_server" for _, name in listening), listening
    assert all(local.rpartition(":")[0] in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]") for local, _ in listening), \
        listening


def test_sigterm_while_the_driver_waits_for_its_nodes_is_taken_as_ctrl_c(embedded_instance, tmp_path, small_book):
    """A Slurm job's driver waits for the job's nodes (`--expect-nodes`) after joining the head, where
    Ray's own handler would take SIGTERM (a stack dump, exit 1): lilgatsby's takes it, one line, 143."""
    address, token, _ = embedded_instance
    sweep = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--address",
         address, "--expect-nodes", "3", "--runs", str(tmp_path / "runs"), "--corpus", str(small_book)],
        stderr=subprocess.PIPE, text=True, env={**clean_env(tmp_path), "RAY_AUTH_TOKEN": token})
    try:
        sweep.wait(timeout=20)  # joined in a few seconds, then waiting for nodes that never come
    except subprocess.TimeoutExpired:
        sweep.terminate()
    err = sweep.communicate(timeout=60)[1]
    assert sweep.returncode == 143, err
    assert "lilgatsby: terminated (SIGTERM)" in err and "SIGTERM received" not in err, err
    assert not list((tmp_path / "runs").glob("smoke_sweep/*/run.json"))  # nothing had started
