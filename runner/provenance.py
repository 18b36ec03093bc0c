"""What produced a run: package versions, host and code revision, for run.json and the recording."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
from importlib import metadata as pkg_metadata
from pathlib import Path


def environment() -> dict:
    """Versions, host and code revision, so a recording says what produced it."""
    packages = ("torch", "transformers", "tokenizers", "safetensors", "ray", "pyyaml", "tqdm")
    versions = {}
    for name in packages:
        with contextlib.suppress(pkg_metadata.PackageNotFoundError):
            versions[name] = pkg_metadata.version(name)
    return {"python": platform.python_version(), "packages": versions, "host": socket.gethostname(), "pid": os.getpid(),
            "platform": platform.platform(), "git_commit": git_commit(),
            "image": os.environ.get("LILGATSBY_IMAGE")}


def git_commit() -> str:
    if os.environ.get("LILGATSBY_GIT_COMMIT"):
        return os.environ["LILGATSBY_GIT_COMMIT"]  # baked into container images
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
