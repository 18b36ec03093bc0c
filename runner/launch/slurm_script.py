"""The batch script a Slurm sweep runs: a standalone `sbatch` file, written beside the job's log.

People read and reuse it, so it is plain bash in the shape of Ray's own Slurm recipe (`ray start
--head` on the allocation's first node, `srun ray start --address` on the others), with what that
recipe leaves to its users done here: ports and a Ray temp directory of the job's own (two jobs on
one node never collide: ray#59551), token authentication with the job's token file (never on a
command line), nodes addressed by IP, the sweep's driver on the head node, and on the sweep's end,
on `scancel` (SIGTERM) or on Slurm's warning before the time limit (SIGUSR1), the driver stopped as
after Ctrl-C (runs marked cancelled, resumable) and this job's Ray alone stopped on every node (a
bare `ray stop` would kill other jobs' Ray), its temp directories and the token removed. A job
array's script (`render_array`) is simpler: each task trains one grid point with `lilgatsby train`.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass

EXIT_FILE, TOKEN_FILE, SCRIPT_FILE = "exit-code", "ray-token", "sweep.sbatch"
LOG_PATTERN = "slurm-%j.out"  # sbatch's %j: the job id
ARRAY_LOG_PATTERN = "slurm-%A_%a.out"  # an array's id and the task's index
INDEX_LOG_PATTERN = "index-%j.out"  # the job that rebuilds an array's index
WARN_BEFORE_LIMIT_S = 120  # Slurm may send it up to 60 s earlier than asked


@dataclass(frozen=True)
class BatchJob:
    """What the script is made of; `sbatch_args` are written as #SBATCH lines after the project's
    own, so that theirs win."""

    name: str
    job_dir: str  # absolute, on a filesystem every node mounts
    nodes: int
    cpus_per_node: int | None  # None: the user's --sbatch says
    gpus_per_node: int
    requeue: bool
    sbatch_args: list[str]
    bin_dir: str  # the venv's bin: lilgatsby and ray, on a path every node mounts
    driver: list[str]  # the sweep's command, paths relative to job_dir
    made_by: str  # the command that wrote it, for the header


def render(job: BatchJob) -> str:
    """The whole script of a sweep on Ray in one allocation."""
    options = [f"--nodes={job.nodes}", "--ntasks-per-node=1",
               *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []),
               f"--signal=B:USR1@{WARN_BEFORE_LIMIT_S}"]
    settings = {"REQUEUE": "1" if job.requeue else "", "TOKEN_FILE": TOKEN_FILE}
    return _header(job, options, LOG_PATTERN, settings) + f"DRIVER=({shlex.join(job.driver)})\n" + BODY


def render_array(job: BatchJob, points: list[int], limit: int | None) -> str:
    """The whole script of a job array: task i trains grid point points[i] with `lilgatsby train`."""
    options = [f"--array=0-{len(points) - 1}" + (f"%{limit}" if limit else ""), "--ntasks=1",
               *([f"--gpus={job.gpus_per_node}"] if job.gpus_per_node else [])]
    return (_header(job, options, ARRAY_LOG_PATTERN, {}) + f"POINTS=({' '.join(map(str, points))})\n"
            + f"TRAIN=({shlex.join(job.driver)})\n" + ARRAY_BODY)


def _header(job: BatchJob, shape: list[str], log_pattern: str, settings: dict[str, str]) -> str:
    """The comment, the #SBATCH lines (the job's `shape` among the options both scripts share, the
    user's last) and the variables the body reads."""
    options = [f"--job-name={job.name}", *shape,
               *([f"--cpus-per-task={job.cpus_per_node}"] if job.cpus_per_node else []),
               f"--output={job.job_dir}/{log_pattern}", "--open-mode=append",
               "--requeue" if job.requeue else "--no-requeue", *job.sbatch_args]
    settings = {"JOB_DIR": job.job_dir, "LILGATSBY_BIN": job.bin_dir, "EXIT_FILE": EXIT_FILE, **settings}
    return (f"#!/bin/bash\n# {job.name}: a lilgatsby sweep on Slurm, written {time.strftime('%Y-%m-%d %H:%M %Z')} by\n"
            f"#   {job.made_by}\n"
            "# `sbatch` this file again to resume it: finished runs are skipped, interrupted ones resume from\n"
            "# their checkpoints. What it does and needs: docs/sweeps.md, \"On a Slurm cluster\".\n"
            + "".join(f"#SBATCH {line}\n" for line in _option_lines(options)) + "\n"
            + "".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items()))


def _option_lines(args: list[str]) -> list[str]:
    """One #SBATCH line per option, its value beside it when it came as a word of its own
    (`--partition gpu`, `-p gpu`): sbatch reads each line as a command line of its own."""
    lines: list[list[str]] = []
    for arg in args:
        if lines and not arg.startswith("-"):
            lines[-1].append(arg)
        else:
            lines.append([arg])
    return [shlex.join(words) for words in lines]


ARRAY_BODY = r"""
# One grid point per array task, trained by `lilgatsby train` without Ray; SIGTERM (scancel, the time
# limit) cancels its run resumably, as Ctrl-C does
set -u
export PATH="$LILGATSBY_BIN:$PATH"
trap : TERM  # this shell outlives the signal (its child gets it too) to write the exit code
cd "$JOB_DIR" && rm -f "$EXIT_FILE-$SLURM_ARRAY_TASK_ID"
"${TRAIN[@]}" --point "${POINTS[$SLURM_ARRAY_TASK_ID]}"
code=$?
echo $code > "$EXIT_FILE-$SLURM_ARRAY_TASK_ID"
exit $code
"""


BODY = r"""
set -u
export JOB_DIR PATH="$LILGATSBY_BIN:$PATH"
# Every Ray process of this job presents its token, made below, read from a file (mode 0600), never an argument
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$JOB_DIR/$TOKEN_FILE"
# A block of 200 ports and a Ray temp directory (in the node's TMPDIR, else /tmp) of this job's own on
# every node: jobs sharing a node do not collide (two jobs whose ids are equal modulo 100 would); ports
# 12000-31999, below Linux's ephemeral range
export PORT=$((12000 + SLURM_JOB_ID % 100 * 200))
# Ray's gRPC does not read /etc/hosts: nodes are addressed by IP, this node's first address
export HEAD_IP=$(hostname -I | awk '{print $1}')
export NODE_CPUS=${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}
# On SIGTERM, `ray start` would first drain its node for 30 s: as long as scancel's grace period (KillWait)
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

ray_node() {  # $1: head or worker. Ray on this node until SIGTERM; then its processes and temp dir go.
  # What `ray start` says: ray-<node>.log in the job directory
  local role=(--address="$HEAD_IP:$PORT") temp="${TMPDIR:-/tmp}/lilgatsby-ray-$SLURM_JOB_ID"
  [ "$1" = head ] && role=(--head --port="$PORT" --ray-client-server-port=$((PORT + 1)) --include-dashboard=false)
  ray start "${role[@]}" --block --node-ip-address="$(hostname -I | awk '{print $1}')" --temp-dir="$temp" \
    --num-cpus="$NODE_CPUS" --node-manager-port=$((PORT + 2)) --object-manager-port=$((PORT + 3)) \
    --runtime-env-agent-port=$((PORT + 4)) --dashboard-agent-grpc-port=$((PORT + 5)) \
    --dashboard-agent-listen-port=$((PORT + 6)) --metrics-export-port=$((PORT + 7)) \
    --min-worker-port=$((PORT + 10)) --max-worker-port=$((PORT + 199)) >"$JOB_DIR/ray-$SLURMD_NODENAME.log" 2>&1 &
  local ray=$!
  # on SIGTERM, `ray start` stops the processes it started; USR2: srun passes it on as it is
  trap 'kill -TERM $ray 2>/dev/null' TERM USR2
  wait_for $ray
  rm -rf "$temp"
}
wait_for() {  # wait for process $1 to end, through the signals this script traps; its exit status
  local code
  while :; do wait "$1"; code=$?; kill -0 "$1" 2>/dev/null || return $code; done
}
export -f ray_node wait_for

stopping="" warned=""
# SIGTERM, not SIGINT, which bash has its background processes ignore; lilgatsby takes it as Ctrl-C
stop() { stopping=1; [ -n "${driver:-}" ] && kill -TERM "$driver" 2>/dev/null; }
trap 'echo "lilgatsby: Slurm warns of the time limit (SIGUSR1): stopping the sweep; its runs resume when resubmitted"
      warned=1; stop' USR1
trap stop TERM INT

cd "$JOB_DIR" && rm -f "$EXIT_FILE"
(umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")  # this run's
echo "lilgatsby: Slurm job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: Ray head $HEAD_IP:$PORT"
ray_node head &
head=$!
workers=""
if [ "$SLURM_JOB_NUM_NODES" -gt 1 ]; then
  srun --nodes=$((SLURM_JOB_NUM_NODES - 1)) --ntasks=$((SLURM_JOB_NUM_NODES - 1)) --exclude="$SLURMD_NODENAME" \
    --kill-on-bad-exit=0 bash -c 'ray_node worker' &
  workers=$!
fi
code=143  # 128 + SIGTERM: stopped before the sweep began
if [ -z "$stopping" ]; then
  "${DRIVER[@]}" --address "$HEAD_IP:$PORT" --expect-nodes "$SLURM_JOB_NUM_NODES" &
  driver=$!
  wait_for $driver; code=$?
  # stopped, its runs cancelled by their workers' SIGTERM before its own arrived: the code of a stop
  [ -n "$stopping" ] && [ $code = 1 ] && code=143
fi
# Ray stopped: SIGUSR2 through srun to the workers' ray_node (a SIGTERM to srun cancels the step: SIGKILL,
# no clean-up), SIGTERM to the head's; what must outlive a scancel's grace period (KillWait) comes first
[ -n "$workers" ] && kill -USR2 $workers 2>/dev/null
kill -TERM $head 2>/dev/null; wait_for $head
if [ -n "$warned" ] && [ -n "$REQUEUE" ]; then
  echo "lilgatsby: requeueing job $SLURM_JOB_ID (--requeue)"
  [ -n "$workers" ] && wait_for $workers
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
rm -f "$RAY_AUTH_TOKEN_PATH"
echo $code > "$EXIT_FILE"
[ -n "$workers" ] && wait_for $workers
exit $code
"""
