"""The environment variables the project reads, each validated like a config key: a bad value is one
line naming the variable (exit code 2), checked by every command before it writes anything
(`check_environment`) and again where a worker reads it. docs/troubleshooting.md lists them.

`LILGATSBY_IMAGE` and `LILGATSBY_GIT_COMMIT` (set in container images, recorded as provenance)
are free text and need no check; Ray's and AWS's own variables are theirs.
"""

from __future__ import annotations

import math
import os
import shlex
import tempfile
from pathlib import Path

from runner.errors import ConfigError

CORPUS = "LILGATSBY_CORPUS"  # the book, when no corpus.path or --corpus names it
LEASE_TTL = "LILGATSBY_LEASE_TTL_S"  # seconds a bucket run's lease outlives its trainer's last renewal
SCRATCH = "LILGATSBY_SCRATCH"  # where a bucket run trains on a node
BF16_GEMM = "LILGATSBY_BF16_GEMM"  # force bf16 products native or through fp32 GEMMs
SBATCH_ARGS = "LILGATSBY_SBATCH_ARGS"  # sbatch options of `sweep --slurm`, when --sbatch gives none
BF16_GEMM_CHOICES = ("native", "fp32")
LEASE_TTL_RANGE = (1.0, 86_400.0)


def _set(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def corpus_path() -> Path | None:
    value = _set(CORPUS)
    return Path(value) if value else None


def lease_ttl_s() -> float:
    """Default 60 s; between 1 s and a day."""
    value = _set(LEASE_TTL)
    if value is None:
        return 60.0
    low, high = LEASE_TTL_RANGE
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not low <= seconds <= high:
        raise ConfigError(f"{LEASE_TTL}={value!r}: must be a number of seconds between {low:g} and {high:g} "
                          f"(or unset: 60)")
    return seconds


def scratch_root() -> Path:
    """Default: the system's temporary directory / lilgatsby-scratch."""
    value = _set(SCRATCH)
    if value is None:
        return Path(tempfile.gettempdir()) / "lilgatsby-scratch"
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{SCRATCH}={value!r}: exists and is not a directory")
    return path


def bf16_gemm() -> str | None:
    """None: the CPU decides."""
    value = _set(BF16_GEMM)
    if value is not None and value not in BF16_GEMM_CHOICES:
        raise ConfigError(f"{BF16_GEMM}={value!r}: expected one of {', '.join(BF16_GEMM_CHOICES)} "
                          f"(or unset: the CPU decides)")
    return value


def split_sbatch_args(text: str, where: str) -> list[str]:
    """sbatch options as a shell would split them; one line naming `where` if they do not split."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}: {text!r}") from None


def sbatch_args_from_env() -> list[str]:
    """Default: none."""
    return split_sbatch_args(_set(SBATCH_ARGS) or "", SBATCH_ARGS)


def check_environment() -> None:
    """Every variable above, before a command writes anything."""
    corpus_path()
    lease_ttl_s()
    scratch_root()
    bf16_gemm()
    sbatch_args_from_env()
