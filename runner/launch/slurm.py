"""Sweeps submitted to Slurm from a login node: `lilgatsby sweep EXPERIMENT --runs ROOT --slurm`.

The submitter writes a job directory on the shared filesystem (`<runs root>/<experiment>/slurm/<tag>/`
for a local runs root, `slurm/<experiment>/<tag>/` in the current directory for a bucket): what the
driver needs (`runner.launch.submission`: the experiment as one file, the book, what it checks) and
the batch script (`runner.launch.slurm_script`, which makes the job's Ray token); submits it with
`sbatch` and follows it as an `--address` sweep is followed: the job's state while it waits, then its
log line by line, then the sweep's exit code (which the script leaves in the job directory: Slurm's
own record of it needs accounting, which many clusters do not give their users). Ctrl-C cancels the
job (`scancel`: its runs are marked cancelled and the same command resumes them). With
`--slurm-array`, a job array instead (a task per grid point still to train, `lilgatsby train --point`,
no Ray) and a job after it that rebuilds the index, followed the same way.
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

from runner.errors import ConfigError, UserError
from runner.launch.slurm_script import (
    ARRAY_LOG_PATTERN,
    EXIT_FILE,
    INDEX_LOG_PATTERN,
    LOG_PATTERN,
    SCRIPT_FILE,
    BatchJob,
    render,
    render_array,
)
from runner.launch.submission import check_runs_root, stage, the_book
from runner.launch.sweep import plan
from runner.layout import SLURM
from runner.settings import SBATCH_ARGS, sbatch_args_from_env, split_sbatch_args
from runner.storage.location import Location, at
from runner.text import plural

POLL_S = 1.0
ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "TIMEOUT")
CPU_OPTIONS = ("-c", "--cpus-per-task")
GPU_OPTIONS = ("-G", "--gpus", "--gpus-per-node", "--gres")
OURS = ("-N", "--nodes", "-o", "--output", "-J", "--job-name")  # what the script sets


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
    bad = [a for a in args if _gives([a], OURS)]
    if bad:
        raise ConfigError(f"{where}: {bad[0]}: lilgatsby sets it (--nodes N for the node count)")
    return args


def _command(name: str, flag: str = "--slurm") -> str:
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{flag}: {name} is not on PATH: run the sweep on a Slurm login node")
    return found


def _option_value(args: list[str], names: tuple[str, ...]) -> str | None:
    """The value sbatch takes from `args` for the option spelt `names` (`--long=V`, `--long V`,
    `-s V`, `-sV`; the last one given wins, as in sbatch); None when it is not given."""
    value = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name:
                value = args[i + 1] if i + 1 < len(args) else ""
            elif name.startswith("--") and arg.startswith(name + "="):
                value = arg[len(name) + 1:]
            elif len(name) == 2 and arg.startswith(name) and not arg.startswith("--"):
                value = arg[2:]
    return value


def partition_has_gpus(args: list[str]) -> bool:
    """Whether the nodes of the partition the job asks for (or the default one) offer GPUs."""
    partition = _option_value(args, ("-p", "--partition"))
    out = subprocess.run([_command("sinfo"), "-h", "-o", "%G", *(["-p", partition] if partition else [])],
                         capture_output=True, text=True, check=False).stdout
    return "gpu" in out


def submit(path: Path, overrides: list[str], runs_root: Location, *, nodes: int, sbatch: str | None,
           array: bool = False, array_limit: int | None = None, requeue: bool = False, force: bool = False,
           restart: bool = False, max_retries: int = 2, detach: bool = False) -> int:
    """Write the job directory, submit it and follow it (unless `detach`); returns the sweep's exit
    code (0, 1 or 2; 143 if it was stopped), or 130 after Ctrl-C here. `array`: a job array, a task
    per grid point still to train, and a job after it that rebuilds the index."""
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: at least 1")
    if array_limit is not None and array_limit < 1:
        raise ConfigError(f"--array-limit {array_limit}: at least 1")
    if runs_root.local is not None:
        runs_root = at(runs_root.local.absolute())
    check_runs_root(runs_root, "a Slurm node")
    args = sbatch_args(sbatch)
    runs, todo, exp_dir = plan(path, overrides, runs_root, force)  # bad input is refused here
    exp = runs[0].experiment
    if array and not todo:
        print(f"{exp_dir}: all {plural(len(runs), 'run')} complete; nothing to submit (--force trains them again)")
        return 0
    book = the_book(runs)
    sbatch_bin = _command("sbatch", "--slurm-array" if array else "--slurm")
    job_dir = job_dir_for(runs_root, exp.name, f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
    job_dir.mkdir(parents=True)
    job_id = None
    try:
        command = stage(job_dir, path, overrides, book, runs_root, force=force, restart=restart,
                        command="train" if array else "sweep",
                        options=() if array else ("--max-retries", str(max_retries)))
        gpus = math.ceil(exp.resources.gpus_per_run) if partition_has_gpus(args) and not _gives(args, GPU_OPTIONS) \
            else 0
        job = BatchJob(name=f"lilgatsby-{exp.name}", job_dir=str(job_dir), nodes=nodes,
                       cpus_per_node=None if _gives(args, CPU_OPTIONS) else math.ceil(exp.resources.cpus_per_run),
                       gpus_per_node=gpus, requeue=requeue, sbatch_args=args, bin_dir=str(Path(sys.executable).parent),
                       driver=command, made_by=shlex.join(["lilgatsby", *sys.argv[1:]]))
        todo_ids = {r.run_id for r in todo}
        points = [i for i, r in enumerate(runs) if r.run_id in todo_ids]
        (job_dir / SCRIPT_FILE).write_text(render_array(job, points, array_limit) if array else render(job))
        job_id = _sbatch(sbatch_bin, job_dir, SCRIPT_FILE)
        reindex = shlex.join([str(Path(sys.executable).parent / "lilgatsby"), "index", str(exp_dir)])
        index_id = _sbatch(sbatch_bin, job_dir, f"--dependency=afterany:{job_id}", f"--job-name={job.name}-index",
                           f"--output={job_dir}/{INDEX_LOG_PATTERN}", f"--wrap={reindex}") if array else None
    except BaseException:  # nothing half-submitted: no job (an array without its index job), no directory
        if job_id is not None:
            subprocess.run([_command("scancel"), job_id], check=False)
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    log = job_dir / (ARRAY_LOG_PATTERN.replace("%A", job_id).replace("%a", "*") if array
                     else LOG_PATTERN.replace("%j", job_id))
    what = f"array job {job_id} ({plural(len(points), 'task')}, index job {index_id})" if array else \
        f"job {job_id} ({plural(nodes, 'node')})"
    print(f"submitted Slurm {what}: {plural(len(todo if array else runs), 'run')} of {exp.name} into {runs_root}; "
          f"its script and log: {job_dir}", flush=True)
    jobs = [job_id, *([index_id] if index_id else [])]
    if detach:
        print(f"follow it: tail -f {log}; stop it: scancel {' '.join(jobs)}")
        return 0
    try:
        state = follow(jobs, job_dir, log.name)
    except KeyboardInterrupt:
        print(f"lilgatsby: cancelling Slurm job {job_id} (its running runs are marked cancelled; the same command "
              f"resumes them)", flush=True)
        subprocess.run([_command("scancel"), *jobs], check=False)
        follow(jobs, job_dir, log.name)
        return 130
    if array:
        return array_exit_code(job_dir, job_id, len(points))
    return exit_code(job_dir, job_id, state, job_dir / log.name)


def _sbatch(sbatch_bin: str, job_dir: Path, *args: str) -> str:
    """Submit; the job's id."""
    done = subprocess.run([sbatch_bin, "--parsable", *args], capture_output=True, text=True, cwd=job_dir)
    if done.returncode != 0:
        raise UserError(f"sbatch refused the job: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    return done.stdout.strip().split(";")[0]


def _gives(args: list[str], options: tuple[str, ...]) -> bool:
    return _option_value(args, options) is not None


def job_states(jobs: list[str]) -> list[tuple[str, str, str]] | None:
    """(job id, state, reason or nodes) of each job or array task as squeue has it (none once Slurm
    has forgotten them); None when squeue could not say (the controller busy or restarting: ask again)."""
    done = subprocess.run([_command("squeue"), "-h", "-t", "all", "-j", ",".join(jobs), "-o", "%i|%T|%r|%N"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return [] if "Invalid job id" in done.stderr else None
    states = []
    for line in done.stdout.splitlines():
        job, state, reason, where = (line.strip().split("|") + ["", "", ""])[:4]
        states.append((job.partition("_")[0], state, where if state == "RUNNING" else reason))
    return states


def follow(jobs: list[str], job_dir: Path, log_glob: str) -> str:
    """Print the jobs' states as they change and their logs (`log_glob` in `job_dir`) as they grow,
    until all have ended; the first job's last state."""
    said: list[tuple[str, str, str]] = []
    offsets: dict[Path, int] = {}
    while True:
        states = job_states(jobs)
        if states is None:
            time.sleep(POLL_S)
            continue
        live = [s for s in states if s[1] not in ENDED]
        if live and live != said:
            print("lilgatsby: " + "; ".join(_describe(job, [s for s in live if s[0] == job]) for job in jobs
                                             if any(s[0] == job for s in live)), flush=True)
            said = live
        for log in sorted(job_dir.glob(log_glob)):
            offsets[log] = _print_new(log, offsets.get(log, 0))
        if not live:
            return states[0][1] if states else ""
        time.sleep(POLL_S)


def _describe(job: str, live: list[tuple[str, str, str]]) -> str:
    """`job 12 running (n1)`, or for an array's tasks `job 12: 2 running, 3 pending`."""
    if len(live) == 1:
        _, state, detail = live[0]
        return f"job {job} {state.lower()}" + (f" ({detail})" if detail and detail != "None" else "")
    counts: dict[str, int] = {}
    for _, state, _ in live:
        counts[state.lower()] = counts.get(state.lower(), 0) + 1
    return f"job {job}: " + ", ".join(f"{n} {state}" for state, n in counts.items())


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


def array_exit_code(job_dir: Path, job_id: str, tasks: int) -> int:
    """The highest of the array tasks' exit codes (0 all complete, 1 a run failed, 143 stopped); a
    task that ended before its run did is one line naming it."""
    codes = []
    for task in range(tasks):
        try:
            codes.append(int((job_dir / f"{EXIT_FILE}-{task}").read_text().strip()))
        except (FileNotFoundError, ValueError):
            raise UserError(f"Slurm array task {job_id}_{task} ended before its run did (its log: "
                            f"{job_dir / ARRAY_LOG_PATTERN.replace('%A', job_id).replace('%a', str(task))}); "
                            f"the same command resumes its run") from None
    return max(codes)
