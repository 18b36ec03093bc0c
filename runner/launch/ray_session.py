"""Starting or joining Ray for a sweep, with token authentication on.

A Ray cluster runs whatever code a client that reaches it sends, so every cluster the project
starts or joins runs with Ray's token authentication (`RAY_AUTH_MODE=token`): the embedded local
instance with a random token of its own, held in memory by the sweep's processes only (Ray's
default would write one, readable per the umask, to `~/.ray/auth_token`); a cluster with the token
its nodes were given (`make cluster-up` writes one; clients present it with `RAY_AUTH_TOKEN_PATH`
or `RAY_AUTH_TOKEN`). An explicit `RAY_AUTH_MODE` or token in the environment is respected. A
missing or wrong token is a one-line error, not a minute of retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import ray
import torch

from runner.cpus import granted_cpus
from runner.errors import ConfigError

log = logging.getLogger(__name__)
WORKER_SETUP_HOOK = "runner.launch.train.prepare_worker"  # named, so that the driver does not import it
CONNECT_TIMEOUT_S, CONNECT_RETRY_S, NODES_TIMEOUT_S = 60.0, 2.0, 120.0
LOOPBACK = "127.0.0.1"
TOKEN_HELP = ("set RAY_AUTH_TOKEN_PATH to the cluster's token file (`make cluster-up` writes docker/cluster-token) "
              "or RAY_AUTH_TOKEN to the token")


def start_or_join(address: str | None) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start an embedded instance sized to
    the CPUs this process is granted, listening on loopback only (never another one found running;
    a Mac offers its GPU as `mps`). Returns whether it joined a cluster. Workers get nothing of the
    driver's environment: the book travels with the tasks."""
    address = address or os.environ.get("RAY_ADDRESS")
    env: dict = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
                               "runtime_env": env}
    token_mode_on()
    if address:
        _connect(address, options)
        return True
    else:
        if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this instance's; its processes inherit it
        mps: dict[str, float] | None = {"mps": 1} if torch.backends.mps.is_available() else None
        with _loopback_only():
            ray.init(address="local", num_cpus=granted_cpus(), resources=mps, _node_ip_address=LOOPBACK, **options)
        return False


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """An embedded instance that listens on loopback alone. Ray 2.60 binds its servers (GCS,
    raylet, object manager, workers) to the node's IP, and takes a loopback `_node_ip_address` for
    the machine's reachable IP unless multi-node clusters are off, as Ray has them on macOS and
    Windows (`ray_constants.ENABLE_RAY_CLUSTER`, read when the address is resolved). Off while this
    instance starts, then as it was: a later `--address` sweep in the same process joins a real
    cluster with the node's IP."""
    import ray._private.ray_constants as ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def wait_for_nodes(count: int, timeout_s: float = NODES_TIMEOUT_S) -> None:
    """Wait until the cluster just joined has `count` alive nodes: a Slurm job's workers join its
    head while the driver starts, and a sweep started before them would train on the head alone."""
    deadline = time.monotonic() + timeout_s
    while (alive := sum(bool(n.get("Alive")) for n in ray.nodes())) < count:
        if time.monotonic() >= deadline:
            raise ConfigError(f"--expect-nodes {count}: {alive} of {count} nodes joined the Ray cluster within "
                              f"{timeout_s:g} s (a Slurm job's directory has each node's ray-NODE.log)")
        time.sleep(1.0)


def token_mode_on() -> None:
    """RAY_AUTH_MODE=token unless set: Ray's default for a new local instance, but chosen here, so
    that Ray neither warns about its default on every sweep nor lets a client join a cluster
    without presenting a token. (Ray reads the mode into its config when imported; re-reading it is
    what Ray itself does when it turns the mode on.)"""
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")


def _connect(address: str, options: dict) -> None:
    """Join the cluster at `address`, waiting up to CONNECT_TIMEOUT_S for it to come up: a sweep
    submitted right after `make cluster-up` finds the head still starting."""
    deadline, waiting = time.monotonic() + CONNECT_TIMEOUT_S, False
    while True:
        try:
            _check_token(address)
            ray.init(address=address, **options)
            return
        except ray.exceptions.AuthenticationError:  # token mode on and no token at all
            raise ConfigError(f"--address {address}: no Ray token to present: {TOKEN_HELP}") from None
        except ConnectionError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"--address {address}: no Ray cluster answered within {CONNECT_TIMEOUT_S:g} s "
                                  f"({str(e).splitlines()[0]})") from None
            if not waiting:
                log.warning("no Ray cluster at %s yet; waiting up to %g s", address, CONNECT_TIMEOUT_S)
                waiting = True
            time.sleep(CONNECT_RETRY_S)


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for a moment (C++ code writes to it directly)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _check_token(address: str) -> None:
    """Ask the cluster's GCS, if something listens at its address, whether it takes this client's
    token: Ray itself retries a refused token for ~20 s and then reports a connection error (and
    aborts the process when token mode is on and it has no token at all)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return
    from ray._private.services import canonicalize_bootstrap_address
    from ray._raylet import AuthenticationTokenLoader, GcsClient  # type: ignore[attr-defined]

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise ConfigError(f"--address {address}: no Ray token to present: {TOKEN_HELP}")
    try:
        gcs = canonicalize_bootstrap_address(address)
    except (ValueError, ConnectionError):
        return  # ray.init says what is wrong with it
    if gcs is None:
        return
    host, _, port = gcs.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2.0).close()
    except OSError:
        return  # nothing listens yet: ray.init fails fast and _connect waits
    try:
        with _stderr_silenced():  # Ray's C++ client logs the refusal on its own
            GcsClient(address=gcs)
    except ray.exceptions.AuthenticationError:
        raise ConfigError(f"--address {address}: the Ray cluster refused this client's token "
                          f"(missing or wrong): {TOKEN_HELP}") from None
