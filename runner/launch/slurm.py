"""Sweeps submitted to Slurm from a login node: `lilgatsby sweep EXPERIMENT --runs ROOT --slurm`.

The submitter writes a job directory on the shared filesystem (`<runs root>/<experiment>/slurm/<tag>/`
for a local runs root, `slurm/<experiment>/<tag>/` in the current directory for a bucket): what the
driver needs (`runner.launch.submission`: the experiment as one file, the book, what it checks) and
the batch script (`runner.launch.slurm_script`, which makes the job's Ray token); submits it with
`sbatch` and follows it as an `--address` sweep is followed: the job's state while it waits, then its
log line by line, then the sweep's exit code (which the script leaves in the job directory: Slurm's
own record of it needs accounting, which many clusters do not give their users). Ctrl-C cancels the
job (`scancel`: its runs are marked cancelled and the same command resumes them).
"""

from __future__ import annotations

import math
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from runner.config import load_runs
from runner.errors import ConfigError, UserError
from runner.launch.slurm_script import EXIT_FILE, LOG_PATTERN, SCRIPT_FILE, BatchJob, render
from runner.launch.submission import check_runs_root, stage, the_book
from runner.layout import SLURM
from runner.settings import SBATCH_ARGS, sbatch_args_from_env, split_sbatch_args
from runner.storage.location import Location, at
from runner.text import plural

POLL_S = 1.0
ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "TIMEOUT")
CPU_OPTIONS = ("-c", "--cpus-per-task")
GPU_OPTIONS = ("-G", "--gpus", "--gpus-per-node", "--gres")


def job_dir_for(runs_root: Location, experiment: str, tag: str) -> Path:
    """Where the job's files go: beside its runs on a local runs root (a path every node mounts),
    else in the current directory (the submit directory, which Slurm's nodes start in)."""
    if runs_root.local is not None:
        return runs_root.local / experiment / SLURM / tag
    return Path.cwd() / SLURM / experiment / tag


def sbatch_args(given: str | None) -> list[str]:
    """sbatch options from --sbatch, else from $LILGATSBY_SBATCH_ARGS; one line if they do not parse."""
    args, where = (split_sbatch_args(given, "--sbatch"), "--sbatch") if given is not None else \
        (sbatch_args_from_env(), SBATCH_ARGS)
    bad = [a for a in args if a.split("=")[0] in ("--nodes", "-N", "--output", "-o", "--job-name", "-J")]
    if bad:
        raise ConfigError(f"{where}: {bad[0]}: lilgatsby sets it (--nodes N for the node count)")
    return args


def _command(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"--slurm: {name} is not on PATH: run the sweep on a Slurm login node")
    return found


def partition_has_gpus(args: list[str]) -> bool:
    """Whether the nodes of the partition the job asks for (or the default one) offer GPUs."""
    partition = next((a.split("=", 1)[1] for a in args if a.startswith("--partition=")), None)
    out = subprocess.run([_command("sinfo"), "-h", "-o", "%G", *(["-p", partition] if partition else [])],
                         capture_output=True, text=True, check=False).stdout
    return "gpu" in out


def submit(path: Path, overrides: list[str], runs_root: Location, *, nodes: int, sbatch: str | None,
           requeue: bool = False, force: bool = False, restart: bool = False, max_retries: int = 2,
           detach: bool = False) -> int:
    """Write the job directory, submit it and follow it (unless `detach`); returns the sweep's exit
    code on the head node (0, 1 or 2), or 130 after Ctrl-C here."""
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: at least 1")
    if runs_root.local is not None:
        runs_root = at(runs_root.local.absolute())
    check_runs_root(runs_root, "a Slurm node")
    args = sbatch_args(sbatch)
    runs = load_runs(path, overrides)  # bad input is refused here, before anything is written
    book = the_book(runs)
    exp = runs[0].experiment
    sbatch_bin = _command("sbatch")
    tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    job_dir = job_dir_for(runs_root, exp.name, tag)
    job_dir.mkdir(parents=True)
    try:
        driver = stage(job_dir, path, overrides, book, runs_root, force=force, restart=restart,
                       max_retries=max_retries)
        gpus = math.ceil(exp.resources.gpus_per_run) if partition_has_gpus(args) and not _gives(args, GPU_OPTIONS) \
            else 0
        script = job_dir / SCRIPT_FILE
        script.write_text(render(BatchJob(
            name=f"lilgatsby-{exp.name}", job_dir=str(job_dir), nodes=nodes,
            cpus_per_node=None if _gives(args, CPU_OPTIONS) else math.ceil(exp.resources.cpus_per_run),
            gpus_per_node=gpus, requeue=requeue, sbatch_args=args, bin_dir=str(Path(sys.executable).parent),
            driver=driver, made_by=shlex.join(["lilgatsby", *sys.argv[1:]]))))
        done = subprocess.run([sbatch_bin, "--parsable", str(script)], capture_output=True, text=True, cwd=job_dir)
        if done.returncode != 0:
            raise UserError(f"sbatch refused the job: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)  # nothing half-written: no job, no directory
        raise
    job_id = done.stdout.strip().split(";")[0]
    log = job_dir / LOG_PATTERN.replace("%j", job_id)
    print(f"submitted Slurm job {job_id} ({plural(nodes, 'node')}): {plural(len(runs), 'run')} of {exp.name} "
          f"into {runs_root}; its script and log: {job_dir}", flush=True)
    if detach:
        print(f"follow it: tail -f {log}; stop it: scancel {job_id}")
        return 0
    try:
        state = follow(job_id, log)
    except KeyboardInterrupt:
        print(f"lilgatsby: cancelling Slurm job {job_id} (its running runs are marked cancelled; the same command "
              f"resumes them)", flush=True)
        subprocess.run([_command("scancel"), job_id], check=False)
        follow(job_id, log)
        return 130
    return exit_code(job_dir, job_id, state, log)


def _gives(args: list[str], options: tuple[str, ...]) -> bool:
    return any(a.split("=")[0] in options for a in args)


def job_state(job_id: str) -> tuple[str, str] | None:
    """(state, reason or nodes) of the job as squeue has it; ("", "") once Slurm has forgotten it;
    None when squeue could not say (the controller busy or restarting: ask again)."""
    done = subprocess.run([_command("squeue"), "-h", "-t", "all", "-j", job_id, "-o", "%T|%r|%N"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return ("", "") if "Invalid job id" in done.stderr else None
    state, _, rest = done.stdout.strip().partition("|")
    reason, _, where = rest.partition("|")
    return state, (where if state == "RUNNING" else reason)


def follow(job_id: str, log: Path) -> str:
    """Print the job's state as it changes and its log as it grows, until it has ended; its last state."""
    said, offset = ("", ""), 0
    while True:
        answer = job_state(job_id)
        if answer is None:
            time.sleep(POLL_S)
            continue
        state, detail = answer
        if (state, detail) != said and state and state not in ENDED:
            print(f"lilgatsby: job {job_id} {state.lower()}" + (f" ({detail})" if detail and detail != "None" else ""),
                  flush=True)
            said = (state, detail)
        offset = _print_new(log, offset)
        if not state or state in ENDED:
            _print_new(log, offset)
            return state
        time.sleep(POLL_S)


def _print_new(log: Path, offset: int) -> int:
    """Print the log's complete lines after `offset`; the offset after them."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    complete = data[: data.rfind(b"\n") + 1]
    if complete:
        sys.stdout.write(complete.decode("utf-8", "replace"))
        sys.stdout.flush()
    return offset + len(complete)


def exit_code(job_dir: Path, job_id: str, state: str, log: Path) -> int:
    """The sweep's own exit code, which the script wrote; a job that ended before its sweep did
    (cancelled while it waited, its node failed, killed at its time limit) is one line."""
    try:
        return int((job_dir / EXIT_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        how = state.lower() if state else "ended"
        raise UserError(f"Slurm job {job_id} {how} before its sweep did (its log: {log}); the same command "
                        f"resumes its runs") from None
