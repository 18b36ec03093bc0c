"""Sweeps submitted as Ray jobs from a machine that is not a node (`sweep --address http://…`,
runner/launch/job.py; docs/sweeps.md, "From a machine outside the cluster").

The cluster tests start a real head with its dashboard, in its own mount namespace where the
submitting machine's directory (the book, the experiment files) is hidden under an empty tmpfs:
what the job's driver reads must have travelled with the job. They need root and unshare(1), as CI has.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ports import free_port

from runner.cli import main
from runner.config import load_runs
from runner.config.loading import experiment_data
from runner.data.corpus import read_book
from runner.errors import UserError
from runner.launch.job import exit_code
from runner.launch.nodes import identity

from conftest import REPO, alive_nodes, isolated_cluster, ray_cli, sigint_as_in_a_terminal, wait_until

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_the_experiment_as_one_file_gives_the_same_runs(path, tmp_path):
    """What a job carries (includes merged, written as YAML) is read back into the very runs."""
    one_file = tmp_path / "experiment.yaml"
    one_file.write_text(yaml.safe_dump(experiment_data(path), sort_keys=False), encoding="utf-8")
    assert "include" not in yaml.safe_load(one_file.read_text())
    original, carried = load_runs(path), load_runs(one_file)
    assert [r.run_id for r in carried] == [r.run_id for r in original]
    assert [r.experiment for r in carried] == [r.experiment for r in original]


def _submission(tmp_path: Path, book: Path, **changed) -> Path:
    path = tmp_path / "submission.json"
    path.write_text(json.dumps({"lilgatsby": identity()["lilgatsby"], "book_sha256": read_book(book).sha256,
                                "host": "laptop", **changed}))
    return path


def test_the_job_refuses_another_lilgatsby_and_a_changed_book_in_one_line(tmp_path, small_book, capsys):
    """The job's driver checks what the submitter sent before anything (not even Ray) starts."""
    runs = tmp_path / "runs"
    args = ["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--runs", str(runs), "--corpus", str(small_book)]
    other = _submission(tmp_path, small_book, lilgatsby="0.1.0 (code 0123456789ab)")
    assert main([*args, "--submission", str(other)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lilgatsby: error: the sweep's driver on {os.uname().nodename} runs lilgatsby {identity()['lilgatsby']}, "
        f"not the 0.1.0 (code 0123456789ab) of the machine that submitted it (laptop)"]
    changed = _submission(tmp_path, small_book, book_sha256="ab" * 32)
    assert main([*args, "--submission", str(changed)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"hash to sha256 {read_book(small_book).sha256} here, not the {'ab' * 32} the submitting machine " \
           f"(laptop) read" in line
    assert not runs.exists()


@pytest.fixture
def no_ray_env(monkeypatch, tmp_path):
    """No Ray token or address of this session's, token mode on as the submitter turns it on, all of
    it undone after (a later test's Ray in this process must not find token mode without a token);
    Ray's token as this process has cached it forgotten before and after."""
    from ray._raylet import AuthenticationTokenLoader

    for name in [k for k in os.environ if k.startswith(("RAY_AUTH", "RAY_ADDRESS"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token of this machine's
    AuthenticationTokenLoader.instance().reset_cache()
    yield
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.mark.parametrize("extra, error", [
    (["--corpus", "book.txt", "--runs", "runs"],
     "lilgatsby: error: --runs runs: a relative path would be a directory of the job's own on the cluster's head: "
     "give s3://bucket/prefix or an absolute path every node mounts"),
    (["--corpus", "empty.txt"], "empty.txt: corpus file is empty"),
    (["--corpus", "book.txt"], "no Ray token to present: set RAY_AUTH_TOKEN_PATH"),
])
def test_what_the_submitter_refuses_before_sending_anything(extra, error, tmp_path, small_book, no_ray_env,
                                                            monkeypatch, capsys):
    shutil.copy(small_book, tmp_path / "book.txt")
    (tmp_path / "empty.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--runs", str(tmp_path / "runs"),
                 "--address", f"http://127.0.0.1:{free_port()}", *extra]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert error in line


def test_no_dashboard_at_the_address_is_one_line(tmp_path, small_book, no_ray_env, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0123456789abcdef")
    address = f"http://127.0.0.1:{free_port()}"
    assert main(["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--corpus", str(small_book),
                 "--address", address, "--runs", str(tmp_path / "runs")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"lilgatsby: error: --address {address}: no Ray dashboard answered there")


def test_the_submitter_exits_with_the_sweeps_code_and_says_when_the_job_ended_otherwise():
    from ray.job_submission import JobDetails, JobStatus, JobType

    def details(status: JobStatus, code: int | None, message: str = "") -> JobDetails:
        return JobDetails(type=JobType.SUBMISSION, entrypoint="lilgatsby sweep experiment.yaml", submission_id="j",
                          status=status, driver_exit_code=code, message=message)

    assert [exit_code(details(JobStatus.SUCCEEDED, 0), "logs"), exit_code(details(JobStatus.FAILED, 1), "logs"),
            exit_code(details(JobStatus.FAILED, 2), "logs"), exit_code(details(JobStatus.SUCCEEDED, None), "logs")] \
        == [0, 1, 2, 0]
    with pytest.raises(UserError, match=r"^job j failed: its driver exited with code 127 \(its log: logs\)$"):
        exit_code(details(JobStatus.FAILED, 127), "logs")  # e.g. no `lilgatsby` on the head's PATH
    with pytest.raises(UserError, match=r"^job j failed: runtime env setup failed \(its log: logs\)$"):
        exit_code(details(JobStatus.FAILED, None, "runtime env setup failed\nTraceback ..."), "logs")


def test_detach_needs_a_job_address(small_book, capsys):
    assert main(["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--corpus", str(small_book),
                 "--detach"]) == 2
    assert "--detach: only with --slurm or a dashboard's http://HOST:PORT" in capsys.readouterr().err


# --- a real head that sees nothing of the submitting machine ---------------------------------------------------

@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """(dashboard address, submitter's env, the submitter's own directory, a directory both see)."""
    submitter, shared, env = isolated_cluster(tmp_path_factory)
    gcs, dashboard = free_port(), free_port()
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f'mount -t tmpfs none "{submitter}" && cd / && exec "$@"', "sh",
                             *ray_cli("start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                                      "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                      f"--dashboard-port={dashboard}", "--disable-usage-stats",
                                      "--node-ip-address=127.0.0.1")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    probe = "import sys; from ray.job_submission import JobSubmissionClient as C; C(sys.argv[1]).list_jobs()"
    try:
        wait_until(lambda: alive_nodes(f"127.0.0.1:{gcs}", env) == 1
                   and subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True,
                                      timeout=60).returncode == 0,
                   "the head and its Jobs API", timeout_s=180, poll_s=1)
        yield address, env, submitter, shared
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
        subprocess.run(ray_cli("stop", "--force"), env=env, capture_output=True, timeout=120)


SHORT = ["--set", "train.steps=20", "--set", "train.seed=[2]"]
# the submitter, with one byte of the book changed on its way: in the job's working directory, as it is sent
TAMPERING = """
import sys
from pathlib import Path
from ray.job_submission import JobSubmissionClient
submit = JobSubmissionClient.submit_job
def submit_changed(self, **job):
    (book,) = Path(job["runtime_env"]["working_dir"], "book").iterdir()
    book.write_bytes(book.read_bytes().replace(b"younger", b"youngex", 1))
    return submit(self, **job)
JobSubmissionClient.submit_job = submit_changed
from runner.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _experiment(submitter: Path, small_book: Path) -> Path:
    """An experiment file that includes another, next to a book: on the submitter's disk only."""
    shutil.copy(small_book, submitter / "book.txt")
    (submitter / "base.yaml").write_text(f"include: {REPO / 'experiments' / 'smoke.yaml'}\n", encoding="utf-8")
    (submitter / "sweep.yaml").write_text("name: job_sweep\ninclude: base.yaml\ncorpus:\n  path: book.txt\n"
                                          "grid:\n  train.precision: [bf16-true, fp32]\n", encoding="utf-8")
    return submitter / "sweep.yaml"


def _submit(env: dict, args: list[str], code: str | None = None, cwd: Path = REPO, **popen):
    """The submitter, `lilgatsby sweep ARGS` (or `code` standing in for it), in a subprocess."""
    command = [sys.executable, *(["-c", code] if code else ["-m", "runner.cli"]), "sweep", *args]
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


@pytest.mark.long
def test_a_sweep_submitted_from_outside_trains_what_it_would_train_here(head, small_book, tmp_path):
    """The head sees neither the book nor the experiment files; the runs are the ids the submitter
    computes, and a run's recording is bit for bit the one trained here."""
    address, env, submitter, shared = head
    experiment = _experiment(submitter, small_book)
    runs = shared / "runs"
    done = _submit(env, [str(experiment), "--address", address, "--runs", str(runs), *SHORT], cwd=submitter)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out
    assert out.splitlines()[0].startswith("submitted job lilgatsby-job_sweep-") and f"into {runs}" in out
    expected = {r.run_id: r for r in load_runs(experiment, ["train.steps=20", "train.seed=[2]"])}
    manifests = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("job_sweep/*/run.json")}
    assert set(manifests) == set(expected) and {m["status"] for m in manifests.values()} == {"complete"}
    for m in manifests.values():
        assert m["corpus"]["file_sha256"] == read_book(small_book).sha256
        assert not m["corpus"]["source"].startswith(str(submitter))  # read from the job's working directory
    fp32 = next(r for r in expected.values() if r.experiment.train.precision == "fp32")
    here = tmp_path / "here"
    assert main(["train", str(experiment), "--out", str(here), "--corpus", str(small_book), "--quiet",
                 "--set", "train.steps=20", "--set", "train.seed=2", "--set", "train.precision=fp32",
                 "--set", "train.threads=1"]) == 0
    assert main(["compare", str(here), str(runs / "job_sweep" / fp32.run_id)]) == 0


@pytest.mark.long
def test_a_book_changed_on_its_way_fails_the_job_naming_the_hash(head, small_book):
    address, env, submitter, shared = head
    experiment = _experiment(submitter, small_book)
    runs = shared / "tampered"
    done = _submit(env, [str(experiment), "--address", address, "--runs", str(runs), *SHORT], code=TAMPERING,
                   cwd=submitter)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 2, out
    (line,) = [line for line in out.splitlines() if line.startswith("lilgatsby: error:")]
    assert f"not the {read_book(small_book).sha256} the submitting machine" in line
    assert not runs.exists()


@pytest.mark.long
def test_ctrl_c_stops_the_job_and_the_same_command_resumes_it(head, small_book):
    address, env, submitter, shared = head
    experiment = _experiment(submitter, small_book)
    runs = shared / "stopped"
    # 2,000 steps (~40 s here): long enough that runs still train when the stop arrives on a loaded machine
    args = [str(experiment), "--address", address, "--runs", str(runs), "--set", "train.steps=2000",
            "--set", "train.checkpoint_every=50", "--set", "train.seed=[2]"]
    job = _submit(env, args, cwd=submitter, preexec_fn=sigint_as_in_a_terminal)

    def checkpointed() -> bool:
        return any(runs.glob("job_sweep/*/checkpoint.safetensors"))

    wait_until(checkpointed, "a checkpoint of a run of the job", timeout_s=300, poll_s=0.2)
    job.send_signal(signal.SIGINT)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 130, out
    assert "lilgatsby: stopping job lilgatsby-job_sweep-" in out
    statuses = {json.loads(p.read_text())["status"] for p in runs.glob("job_sweep/*/run.json")}
    assert statuses == {"cancelled"}, out
    again = _submit(env, args, cwd=submitter)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    manifests = [json.loads(p.read_text()) for p in runs.glob("job_sweep/*/run.json")]
    assert {m["status"] for m in manifests} == {"complete"}
    assert max(m.get("resumed_from_step") or 0 for m in manifests) >= 50
