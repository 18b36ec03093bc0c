"""Sweeps on Slurm (`sweep --slurm`, runner/launch/slurm.py and slurm_script.py; docs/sweeps.md,
"On a Slurm cluster").

The refusals and the batch script are checked without Slurm. The rest runs on a real two-node Slurm
(tests/slurm_cluster.py: Debian's slurm-wlm and munge, each node in network namespaces of its own;
needs root; CI installs the packages).
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cli import main
from runner.config import load_runs
from runner.errors import UserError
from runner.launch.slurm import exit_code, follow
from runner.launch.slurm_script import BatchJob, render, render_array

from conftest import REPO, sigint_as_in_a_terminal, wait_until
from slurm_cluster import SlurmCluster, missing

SMOKE_SWEEP = str(REPO / "experiments" / "smoke_sweep.yaml")
LILGATSBY = str(Path(sys.executable).parent / "lilgatsby")


def _job(**changes) -> BatchJob:
    fields = {"name": "lilgatsby-smoke_sweep", "job_dir": "/shared/runs/smoke_sweep/slurm/x", "nodes": 2,
              "cpus_per_node": 1, "gpus_per_node": 0, "requeue": False, "sbatch_args": ["--time=00:05:00"],
              "bin_dir": "/shared/venv/bin", "driver": ["lilgatsby", "sweep", "experiment.yaml", "--set", "a=b c"],
              "made_by": "lilgatsby sweep x.yaml --slurm"}
    return BatchJob(**{**fields, **changes})


def test_the_batch_script_is_valid_bash_with_the_users_options_last(tmp_path):
    script = render(_job())
    path = tmp_path / "sweep.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    options = re.findall(r"^#SBATCH (.+)$", script, flags=re.M)
    assert options[:3] == ["--job-name=lilgatsby-smoke_sweep", "--nodes=2", "--ntasks-per-node=1"]
    assert options[-1] == "--time=00:05:00"  # sbatch takes the last: the user's win
    assert "--cpus-per-task=1" in options and "--no-requeue" in options
    assert not any(o.startswith("--gpus") for o in options)
    assert "DRIVER=(lilgatsby sweep experiment.yaml --set 'a=b c')" in script
    # the token is a file the job's processes read, never a value in the script or on a command line
    assert "TOKEN_FILE=ray-token" in script and 'RAY_AUTH_TOKEN_PATH="$JOB_DIR/$TOKEN_FILE"' in script
    assert "RAY_AUTH_TOKEN=" not in script
    assert "ray stop" not in script.replace("a bare `ray stop`", "")  # never every Ray on the node
    words = render(_job(sbatch_args=["--partition", "gpu", "-A", "lab x", "--exclusive", "-t", "5"]))
    assert re.findall(r"^#SBATCH (.+)$", words, flags=re.M)[-4:] == ["--partition gpu", "-A 'lab x'", "--exclusive",
                                                                      "-t 5"]  # a value on its option's line
    gpu = render(_job(gpus_per_node=2, cpus_per_node=None, requeue=True, sbatch_args=[]))
    assert "#SBATCH --gpus-per-node=2" in gpu and "#SBATCH --requeue" in gpu and "--cpus-per-task" not in gpu


def test_the_array_script_trains_one_point_per_task_and_keeps_its_exit_code(tmp_path):
    script = render_array(_job(driver=["lilgatsby", "train", "experiment.yaml", "--quiet"]), [0, 2, 3], limit=2)
    path = tmp_path / "sweep.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    options = re.findall(r"^#SBATCH (.+)$", script, flags=re.M)
    assert "--array=0-2%2" in options and "--ntasks=1" in options and options[-1] == "--time=00:05:00"
    assert "POINTS=(0 2 3)" in script and 'TRAIN=(lilgatsby train experiment.yaml --quiet)' in script
    assert '"${TRAIN[@]}" --point "${POINTS[$SLURM_ARRAY_TASK_ID]}"' in script


@pytest.mark.parametrize("args, error", [
    (["--nodes", "2"], "--nodes: only with --slurm or --slurm-array"),
    (["--slurm", "--address", "127.0.0.1:6379"], "--slurm: the job runs where Slurm puts it; --address is not for it"),
    (["--array-limit", "2"], "--array-limit: only with --slurm-array"),
    (["--slurm-array", "--nodes", "2"],
     "--slurm-array: a task per run on a node of Slurm's choosing; not with --nodes"),
    (["--slurm-array", "--array-limit", "0"], "--array-limit 0: at least 1"),
    (["--slurm", "--nodes", "0"], "--nodes 0: at least 1"),
    (["--slurm", "--sbatch=--nodes=3"], "--sbatch: --nodes=3: lilgatsby sets it (--nodes N for the node count)"),
    (["--slurm", "--sbatch=--time='1"], "--sbatch: No closing quotation: \"--time='1\""),
    (["--slurm", "--sbatch=-N 3"], "--sbatch: -N: lilgatsby sets it (--nodes N for the node count)"),
    (["--slurm", "--sbatch=-Jname"], "--sbatch: -Jname: lilgatsby sets it (--nodes N for the node count)"),
    (["--slurm"], "--slurm: sbatch is not on PATH: run the sweep on a Slurm login node"),
    (["--slurm-array"], "--slurm-array: sbatch is not on PATH: run the sweep on a Slurm login node"),
])
def test_what_a_slurm_submission_refuses_in_one_line(args, error, tmp_path, small_book, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no Slurm commands
    runs = tmp_path / "runs"
    assert main(["sweep", SMOKE_SWEEP, "--runs", str(runs), "--corpus", str(small_book), *args]) == 2
    assert capsys.readouterr().err.splitlines() == [f"lilgatsby: error: {error}"]
    assert not runs.exists()  # nothing written


def test_sbatch_options_from_the_environment_are_checked_like_a_config_key(tmp_path, small_book, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("LILGATSBY_SBATCH_ARGS", "--partition=gpu --time='1")
    assert main(["sweep", SMOKE_SWEEP, "--runs", str(tmp_path / "runs"), "--corpus", str(small_book), "--slurm"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "lilgatsby: error: LILGATSBY_SBATCH_ARGS: No closing quotation: \"--partition=gpu --time='1\""]
    monkeypatch.setenv("LILGATSBY_SBATCH_ARGS", "--output=x.out")
    assert main(["sweep", SMOKE_SWEEP, "--runs", str(tmp_path / "runs"), "--corpus", str(small_book), "--slurm"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "lilgatsby: error: LILGATSBY_SBATCH_ARGS: --output=x.out: lilgatsby sets it (--nodes N for the node count)"]
    assert not (tmp_path / "runs").exists()


def _fake_slurm(tmp_path: Path, monkeypatch, sbatch: str, sinfo: str = "exit 0") -> None:
    """sbatch and sinfo as shell scripts on PATH: what the submitter makes of their answers."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in (("sbatch", sbatch), ("sinfo", sinfo)):
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")


ON_GPU_PARTITION = """case "$*" in *"-p gpu"*) echo 'gpu:h100:8';; *) echo '(null)';; esac"""


@pytest.mark.parametrize("sinfo, sbatch_option, gpus", [
    ("echo '(null)'", "--time=10", None),
    ("echo 'gpu:a100:4(S:0-1)'", "--time=10", "--gpus-per-node=1"),  # a run's gpus_per_run (1), rounded up
    ("echo 'gpu:a100:4(S:0-1)'", "--gres=gpu:2", None),  # the user's own GPU request wins
    ("echo 'gpu:a100:4(S:0-1)'", "-G 2", None),
    (ON_GPU_PARTITION, "-p gpu", "--gpus-per-node=1"),  # the partition asked for is the one asked about
    (ON_GPU_PARTITION, "--partition=gpu", "--gpus-per-node=1"),
    (ON_GPU_PARTITION, "-pcpu", None),
])
def test_the_submitted_script_asks_for_what_the_experiment_needs(sinfo, sbatch_option, gpus, tmp_path, small_book,
                                                                 capsys, monkeypatch):
    _fake_slurm(tmp_path, monkeypatch, sbatch='echo "4242;cluster"', sinfo=sinfo)
    runs = tmp_path / "runs"
    assert main(["sweep", SMOKE_SWEEP, "--runs", str(runs), "--corpus", str(small_book), "--slurm", "--nodes", "3",
                 f"--sbatch={sbatch_option}", "--detach"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"submitted Slurm job 4242 (3 nodes): 4 runs of smoke_sweep into {runs}; its script and "
                          f"log: ")
    (job_dir,) = (runs / "smoke_sweep" / "slurm").iterdir()
    assert f"follow it: tail -f {job_dir}/slurm-4242.out; stop it: scancel 4242" in out
    assert sorted(p.name for p in job_dir.iterdir()) == ["book", "experiment.yaml", "submission.json", "sweep.sbatch"]
    options = re.findall(r"^#SBATCH (.+)$", (job_dir / "sweep.sbatch").read_text(), flags=re.M)
    assert "--nodes=3" in options and "--cpus-per-task=1" in options and options[-1] == sbatch_option
    assert [o for o in options if o.startswith("--gpus-per-node")] == ([gpus] if gpus else [])


def test_following_a_job_rides_out_squeue_failures_and_prints_its_log(tmp_path, capsys, monkeypatch):
    """squeue's answers in turn: a controller that times out, the job pending, running, completed."""
    answers = tmp_path / "answers"
    answers.write_text("fail\n7|PENDING|Priority|\n7|RUNNING|None|n[1-2]\n7|COMPLETED|None|n[1-2]\n")
    _fake_slurm(tmp_path, monkeypatch, sbatch="exit 1")
    squeue = tmp_path / "bin" / "squeue"
    squeue.write_text(f"""#!/bin/sh
line=$(head -n1 {answers}); [ "$(wc -l < {answers})" -gt 1 ] && sed -i 1d {answers}
[ "$line" = fail ] && {{ echo 'squeue: error: Socket timed out on send/recv operation' >&2; exit 1; }}
echo "$line"
""")
    squeue.chmod(0o755)
    monkeypatch.setattr("runner.launch.slurm.POLL_S", 0.01)
    log = tmp_path / "slurm-7.out"
    log.write_text("train.seed=1 (abc) complete\nhalf a line")
    assert follow(["7"], tmp_path, log.name) == "COMPLETED"
    assert capsys.readouterr().out.splitlines() == [
        "lilgatsby: job 7 pending (Priority)", "train.seed=1 (abc) complete", "lilgatsby: job 7 running (n[1-2])"]
    (tmp_path / "exit-code").write_text("1\n")
    assert exit_code(tmp_path, "7", "COMPLETED", log) == 1
    (tmp_path / "exit-code").unlink()
    with pytest.raises(UserError, match=r"^Slurm job 7 timeout before its sweep did \(its log: .*slurm-7.out\); "
                                        r"the same command resumes its runs$"):
        exit_code(tmp_path, "7", "TIMEOUT", log)


def test_an_array_whose_index_job_is_refused_is_cancelled_and_leaves_nothing(tmp_path, small_book, capsys,
                                                                              monkeypatch):
    """sbatch takes the array, then refuses the job after it: the array is cancelled, not left to run."""
    cancelled = tmp_path / "cancelled"
    _fake_slurm(tmp_path, monkeypatch, sbatch='case "$*" in *--dependency*) echo "sbatch: error: '
                                               'QOSMaxSubmitJobPerUserLimit" >&2; exit 1;; esac; echo 77')
    (tmp_path / "bin" / "scancel").write_text(f'#!/bin/sh\necho "$*" >> {cancelled}\n')
    (tmp_path / "bin" / "scancel").chmod(0o755)
    runs = tmp_path / "runs"
    assert main(["sweep", SMOKE_SWEEP, "--runs", str(runs), "--corpus", str(small_book), "--slurm-array"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "lilgatsby: error: sbatch refused the job: sbatch: error: QOSMaxSubmitJobPerUserLimit"]
    assert cancelled.read_text() == "77\n"
    assert not list((runs / "smoke_sweep" / "slurm").iterdir())


def test_a_job_sbatch_refuses_leaves_nothing(tmp_path, small_book, capsys, monkeypatch):
    _fake_slurm(tmp_path, monkeypatch, sbatch="echo 'sbatch: error: Invalid partition name specified' >&2; exit 1")
    runs = tmp_path / "runs"
    assert main(["sweep", SMOKE_SWEEP, "--runs", str(runs), "--corpus", str(small_book), "--slurm",
                 "--sbatch=--partition=nope"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "lilgatsby: error: sbatch refused the job: sbatch: error: Invalid partition name specified"]
    assert not list((runs / "smoke_sweep" / "slurm").iterdir())  # the job directory is gone, token included


# -- on a real Slurm -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(book_path):
    why = missing()
    if why:
        pytest.skip(why)
    cluster = SlurmCluster().start()
    cluster.env["LILGATSBY_CORPUS"] = str(book_path)
    yield cluster
    cluster.stop()


def _env(cluster: SlurmCluster) -> dict:
    """The submitter's: nothing of this session's Ray or lilgatsby settings but the book."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LILGATSBY_", "SLURM_"))}
    return {**env, **cluster.env}


def _sweep(cluster, runs: Path, *args: str, **popen) -> subprocess.Popen:
    mode = [] if "--slurm-array" in args else ["--slurm"]
    return subprocess.Popen([LILGATSBY, "sweep", SMOKE_SWEEP, "--runs", str(runs), *mode, *args],
                            env=_env(cluster), cwd=cluster.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _finish(proc: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout_s)
    return proc.returncode, out


def _manifests(exp_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(exp_dir.glob("*/run.json"))]


def _job_dir(out: str) -> Path:
    return Path(re.search(r"its script and log: (\S+)", out).group(1))


def _wait_training(proc: subprocess.Popen, exp_dir: Path, past_step: int) -> None:
    """Until a run of the sweep is past `past_step` (a sweep that ends first fails the test, with its output)."""
    def training() -> bool:
        assert proc.poll() is None, proc.communicate()[0]
        return any(json.loads(p.read_text()).get("step", 0) > past_step for p in exp_dir.glob("*/progress.json"))

    wait_until(training, f"a run past step {past_step}", timeout_s=180, poll_s=0.5)


def _nothing_left(cluster: SlurmCluster, job_id: str) -> None:
    """No process of the job on any node, no Ray temp dir in any node's scratch."""
    for name in cluster.names:
        left = [cluster.cmdline(p) for p in cluster.node_pids(name)]
        assert not left, f"{name}: {left}"
        assert not list((cluster.base / "tmp" / name).glob(f"lilgatsby-ray-{job_id}*"))


@pytest.mark.long
def test_a_sweep_on_two_nodes_trains_on_both_the_bits_of_a_local_run_and_leaves_nothing(slurm, tmp_path):
    runs = slurm.base / "runs-two-nodes"
    code, out = _finish(_sweep(slurm, runs, "--nodes", "2"))
    assert code == 0, out
    job_id = re.search(r"submitted Slurm job (\d+) \(2 nodes\)", out).group(1)
    assert "4/4 runs complete" in out and f"job {job_id} running (n[1-2])" in out
    manifests = _manifests(runs / "smoke_sweep")
    assert [m["status"] for m in manifests] == ["complete"] * 4
    assert {m["environment"]["host"] for m in manifests} == {"n1", "n2"}  # both nodes trained
    job_dir = _job_dir(out)
    assert (job_dir / "exit-code").read_text() == "0\n" and not (job_dir / "ray-token").exists()
    assert (job_dir / "sweep.sbatch").read_text().startswith("#!/bin/bash\n")
    _nothing_left(slurm, job_id)

    # the same config trained here, alone, on one CPU as the sweep gave each run: the same bits
    (swept,) = [runs / "smoke_sweep" / m["run_id"] for m in manifests
                if m["config"]["train"]["seed"] == 1 and m["config"]["train"]["precision"] == "bf16-true"]
    local = tmp_path / "local"
    subprocess.run(["taskset", "-c", "0", LILGATSBY, "train", str(REPO / "experiments" / "smoke.yaml"), "--set",
                    "train.seed=1", "--set", "train.precision=bf16-true", "--out", str(local), "--quiet"],
                   env=_env(slurm), check=True, capture_output=True)
    assert main(["compare", str(swept), str(local)]) == 0


@pytest.mark.long
def test_two_sweeps_at_once_on_the_same_nodes_both_complete(slurm):
    """The first submitted with --detach (its submitter returns at once), the second followed."""
    first, second = slurm.base / "runs-a", slurm.base / "runs-b"
    code, detached = _finish(_sweep(slurm, first, "--nodes", "2", "--detach"), timeout_s=60)
    assert code == 0 and "stop it: scancel" in detached, detached
    followed = _sweep(slurm, second, "--nodes", "2")
    both_running = []

    def running_together() -> bool:
        states = subprocess.run(["squeue", "-h", "-o", "%T"], env=_env(slurm), capture_output=True, text=True)
        both_running.append(states.stdout.split().count("RUNNING") == 2)
        return both_running[-1] or followed.poll() is not None

    wait_until(running_together, "both jobs running", timeout_s=120, poll_s=0.5)
    code, out = _finish(followed)
    assert code == 0, out
    assert both_running[-1], "the two jobs did not run at the same time"
    first_dir = _job_dir(detached)
    wait_until(lambda: (first_dir / "exit-code").exists(), "the detached job's end", timeout_s=120, poll_s=0.5)
    assert (first_dir / "exit-code").read_text() == "0\n"
    for runs in (first, second):
        assert [m["status"] for m in _manifests(runs / "smoke_sweep")] == ["complete"] * 4
    logs = [out, next(first_dir.glob("slurm-*.out")).read_text()]
    assert len({re.search(r"Ray head [\d.]+:(\d+)", log).group(1) for log in logs}) == 2  # a port block each


@pytest.mark.long
@pytest.mark.parametrize("stop", ["scancel", "ctrl-c"])
def test_a_cancelled_job_leaves_its_runs_cancelled_and_the_same_command_resumes_them(stop, slurm):
    """`scancel` from anywhere, or Ctrl-C in the submitter (which cancels the job itself)."""
    runs = slurm.base / f"runs-{stop}"
    longer = ("--nodes", "2", "--set", "train.steps=1000", "--set", "train.checkpoint_every=50")
    proc = _sweep(slurm, runs, *longer, preexec_fn=sigint_as_in_a_terminal)
    exp_dir = runs / "smoke_sweep"
    _wait_training(proc, exp_dir, past_step=100)
    (log,) = exp_dir.glob("slurm/*/slurm-*.out")
    job_id = log.stem.removeprefix("slurm-")
    if stop == "scancel":
        subprocess.run(["scancel", job_id], env=_env(slurm), check=True)
    else:
        proc.send_signal(signal.SIGINT)
    code, out = _finish(proc)
    assert code == (143 if stop == "scancel" else 130), out  # the sweep's own; the submitter's after Ctrl-C
    statuses = [m["status"] for m in _manifests(exp_dir)]
    assert "cancelled" in statuses and "complete" not in statuses, out
    assert all("SIGTERM" in m["error"] for m in _manifests(exp_dir) if m["status"] == "cancelled")
    assert (log.parent / "exit-code").read_text() == "143\n"  # the job's own end, within scancel's grace
    _nothing_left(slurm, job_id)

    if stop == "scancel":  # resumed by the script alone, submitted again as it stands
        (log.parent / "exit-code").unlink()
        subprocess.run(["sbatch", "sweep.sbatch"], cwd=log.parent, env=_env(slurm), check=True, capture_output=True)
        wait_until(lambda: (log.parent / "exit-code").exists(), "the resubmitted script's end", timeout_s=300,
                   poll_s=0.5)
        assert (log.parent / "exit-code").read_text() == "0\n"
    else:  # resumed by the same command
        code, out = _finish(_sweep(slurm, runs, *longer))
        assert code == 0, out
    assert [m["status"] for m in _manifests(exp_dir)] == ["complete"] * 4


@pytest.mark.long
def test_a_job_stopped_at_its_time_limit_resumes_on_resubmission_bit_for_bit(slurm, tmp_path):
    """The limit is cut to a minute or two once the runs train (a `--time=1` job could be warned
    before any run had started on a loaded machine: Slurm sends the warning up to a minute early)."""
    runs = slurm.base / "runs-time"
    longer = ("--set", "train.seed=[1]", "--set", "train.steps=3000", "--set", "train.checkpoint_every=100")
    proc = _sweep(slurm, runs, "--nodes", "2", "--sbatch=--time 10", *longer)  # a value as a word
    exp_dir = runs / "smoke_sweep"
    _wait_training(proc, exp_dir, past_step=100)
    (log,) = exp_dir.glob("slurm/*/slurm-*.out")
    job_id = log.stem.removeprefix("slurm-")
    elapsed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%M"], env=_env(slurm), check=True,
                             capture_output=True, text=True).stdout.strip()
    minutes = int(elapsed.split(":")[-2]) + 2  # 1-2 minutes left: inside the 120 s warning at once
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"], env=_env(slurm), check=True)
    code, out = _finish(proc)
    assert code == 143, out
    assert "Slurm warns of the time limit (SIGUSR1)" in out or "TIMEOUT" in out
    assert {m["status"] for m in _manifests(exp_dir)} == {"cancelled"}, out

    code, out = _finish(_sweep(slurm, runs, "--nodes", "2", *longer))
    assert code == 0, out
    manifests = _manifests(exp_dir)
    assert [m["status"] for m in manifests] == ["complete"] * 2
    (fp32,) = [exp_dir / m["run_id"] for m in manifests if m["config"]["train"]["precision"] == "fp32"]
    local = tmp_path / "local"
    subprocess.run(["taskset", "-c", "0", LILGATSBY, "train", str(REPO / "experiments" / "smoke.yaml"), "--set",
                    "train.seed=1", "--set", "train.precision=fp32", "--set", "train.steps=3000", "--set",
                    "train.checkpoint_every=100", "--out", str(local), "--quiet"],
                   env=_env(slurm), check=True, capture_output=True)
    assert main(["compare", str(fp32), str(local)]) == 0  # resumed: the bits of an uninterrupted run


@pytest.mark.long
def test_a_ray_worker_without_the_jobs_token_is_refused_and_the_sweep_completes(slurm, tmp_path):
    runs = slurm.base / "runs-token"
    proc = _sweep(slurm, runs, "--nodes", "2", "--set", "train.steps=600")
    exp_dir = runs / "smoke_sweep"
    _wait_training(proc, exp_dir, past_step=0)
    (log,) = exp_dir.glob("slurm/*/slurm-*.out")
    head = re.search(r"Ray head ([\d.]+:\d+)", log.read_text()).group(1)
    token_file = log.parent / "ray-token"  # the job's, made by its script, readable by its user alone
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip().encode()
    assert len(token) == 64 and not [p for p in Path("/proc").glob("[0-9]*") if token in _cmdline(p)]
    intruder = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={head}", f"--temp-dir={tmp_path}/ray",
         f"--node-ip-address={slurm.ip(1)}", "--num-cpus=1"],
        env={**_env(slurm), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()},
        capture_output=True, text=True, timeout=120)
    assert intruder.returncode != 0
    assert re.search(r"(?i)auth|token", intruder.stdout + intruder.stderr)
    code, out = _finish(proc)
    assert code == 0, out
    manifests = _manifests(exp_dir)
    assert [m["status"] for m in manifests] == ["complete"] * 4
    assert {m["environment"]["host"] for m in manifests} <= {"n1", "n2"}
    assert not token_file.exists()
    assert not [f for f in log.parent.rglob("*") if f.is_file() and token in f.read_bytes()]
    stray = [p for p in Path("/proc").glob("[0-9]*") if f"{tmp_path}/ray".encode() in _cmdline(p)]
    for p in stray:  # what the refused `ray start` may have left, stopped by PID before the assertion
        os.kill(int(p.name), signal.SIGKILL)
    assert not stray


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.long
def test_a_job_array_trains_every_point_once_with_the_sweeps_run_ids_and_indexes_them(slurm, tmp_path):
    runs = slurm.base / "runs-array"
    code, out = _finish(_sweep(slurm, runs, "--slurm-array", "--array-limit", "3"))
    assert code == 0, out
    assert re.search(r"submitted Slurm array job (\d+) \(4 tasks, index job \d+\)", out), out
    exp_dir = runs / "smoke_sweep"
    manifests = _manifests(exp_dir)
    assert sorted(m["run_id"] for m in manifests) == sorted(r.run_id for r in load_runs(SMOKE_SWEEP))
    assert [m["status"] for m in manifests] == ["complete"] * 4
    for m in manifests:  # each trained once, by one task
        assert (exp_dir / m["run_id"] / "train.log").read_text().count(" complete: final loss") == 1
    assert sorted(json.loads(line)["run_id"] for line in (exp_dir / "index.jsonl").read_text().splitlines()) == \
        sorted(m["run_id"] for m in manifests)
    job_dir = _job_dir(out)
    assert sorted(p.name for p in job_dir.glob("exit-code-*")) == [f"exit-code-{i}" for i in range(4)]
    # a task trains as `lilgatsby train` does on the same CPUs: the same bits
    (task_run,) = [exp_dir / m["run_id"] for m in manifests
                   if m["config"]["train"]["seed"] == 2 and m["config"]["train"]["precision"] == "fp32"]
    local = tmp_path / "local"
    subprocess.run([LILGATSBY, "train", str(REPO / "experiments" / "smoke.yaml"), "--set", "train.seed=2", "--set",
                    "train.precision=fp32", "--out", str(local), "--quiet"], env=_env(slurm), check=True,
                   capture_output=True)
    assert main(["compare", str(task_run), str(local)]) == 0
    code, out = _finish(_sweep(slurm, runs, "--slurm-array"))  # again: nothing left to train
    assert code == 0 and "all 4 runs complete; nothing to submit" in out, out


@pytest.mark.long
def test_ctrl_c_cancels_a_job_arrays_runs_and_the_same_command_resumes_them(slurm):
    runs = slurm.base / "runs-array-cancel"
    longer = ("--slurm-array", "--set", "train.steps=600", "--set", "train.checkpoint_every=50")
    proc = _sweep(slurm, runs, *longer, preexec_fn=sigint_as_in_a_terminal)
    exp_dir = runs / "smoke_sweep"
    _wait_training(proc, exp_dir, past_step=100)
    proc.send_signal(signal.SIGINT)
    code, out = _finish(proc)
    assert code == 130 and "lilgatsby: cancelling Slurm job" in out, out
    manifests = _manifests(exp_dir)
    assert manifests and {m["status"] for m in manifests} == {"cancelled"}, out
    assert {p.read_text() for p in _job_dir(out).glob("exit-code-*")} == {"143\n"}  # each task's own end
    code, out = _finish(_sweep(slurm, runs, *longer))
    assert code == 0, out
    assert [m["status"] for m in _manifests(exp_dir)] == ["complete"] * 4
