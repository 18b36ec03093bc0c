"""What every node of a cluster is checked for before it trains: the driver's lilgatsby code, Python
minor version and Ray version (a mismatch is one line naming both, not a pickle error deep in Ray),
and, for a local runs root, that it sees the directory the driver writes to.

The rule for a local runs root (`--runs DIR`) on a cluster: every alive node must read back a probe
file the driver writes there (a random token, at the same path); a node that cannot is named and
the sweep refused before anything trains: use `s3://bucket/prefix` or a path every node mounts.
The embedded local instance is this machine, so it has nothing to check. Each training task
checks its own node again (a node may join after the sweep started).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from runner.errors import ConfigError, UserError
from runner.layout import PROBE_PREFIX
from runner.storage.location import Location

CHECK_TIMEOUT_S = 120.0
PACKAGE = Path(__file__).resolve().parents[1]  # runner/


class NodeMismatch(UserError):
    """A node runs other code than the driver's: its runs would not be the driver's."""


@functools.cache
def code_sha256() -> str:
    """The SHA-256 of this node's lilgatsby code (every .py file under runner/, by relative path):
    two nodes with the same hash train the same bits; the package version alone would not say so."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def identity() -> dict[str, str]:
    """What must match between the driver and each node."""
    try:
        release = version("lilgatsby")
    except PackageNotFoundError:  # run from a checkout that was not installed
        release = "unknown"
    return {"lilgatsby": f"{release} (code {code_sha256()[:12]})",
            "python": f"{sys.version_info.major}.{sys.version_info.minor}", "ray": ray.__version__}


def mismatch(driver: dict[str, str], node: dict[str, str], where: str) -> str | None:
    """One line naming the first of lilgatsby, Python and Ray whose version differs, or None."""
    for key in ("lilgatsby", "python", "ray"):
        if driver.get(key) != node.get(key):
            return f"{where}: {key} {node.get(key)} differs from the driver's {driver.get(key)}"
    return None


def check_this_node(driver: dict[str, str]) -> None:
    """Inside a task, before anything else: refuse to train on a node that is not the driver's match."""
    problem = mismatch(driver, identity(), f"worker {socket.gethostname()}")
    if problem:
        raise NodeMismatch(problem)


@ray.remote(num_cpus=0, max_retries=0)
def _inspect(probe: str | None, token: str) -> dict:
    """A node's identity, and why it does not see the driver's probe file (None: it does, or no probe)."""
    unseen = None
    if probe is not None:
        try:
            unseen = None if Path(probe).read_text(encoding="utf-8") == token else "it holds another file there"
        except OSError as e:
            unseen = f"it cannot read the probe file the driver wrote there: {e.strerror}"
    return {"identity": identity(), "host": socket.gethostname(), "unseen": unseen}


def check_nodes(runs_root: Location) -> None:
    """Ask every alive node of the cluster (see the module docstring): one-line ConfigErrors."""
    driver, token = identity(), secrets.token_hex(16)
    probe = runs_root.local / f"{PROBE_PREFIX}{token}" if runs_root.local is not None else None
    if probe is not None:
        runs_root.make_dir()
        probe.write_text(token, encoding="utf-8")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        answers = [_inspect.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                    ).remote(str(probe) if probe else None, token) for n in nodes]
        for node, answer in zip(nodes, answers, strict=True):
            where = f"node {node.get('NodeManagerAddress')}"
            try:
                found = ray.get(answer, timeout=CHECK_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise ConfigError(f"{where}: did not answer the node check within {CHECK_TIMEOUT_S:g} s") from None
            except ray.exceptions.RayError as e:  # e.g. its lilgatsby has no such check: another version
                raise ConfigError(f"{where}: cannot run this lilgatsby's node check ({str(e).splitlines()[0]}); "
                                  f"the driver runs lilgatsby {driver['lilgatsby']}") from None
            where = f"node {node.get('NodeManagerAddress')} ({found['host']})"
            problem = mismatch(driver, found["identity"], where)
            if problem:
                raise ConfigError(problem)
            if found["unseen"]:
                raise ConfigError(f"--runs {runs_root}: {where} does not see this directory ({found['unseen']}): "
                                  f"use s3://bucket/prefix or a path every node mounts")
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
