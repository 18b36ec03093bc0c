"""Sweeps on a real local Ray instance."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from runner.cli import main
from runner.config import build_experiment
from runner.launch import ray_session
from runner.launch.sweep import task_options
from runner.layout import CHECKPOINT
from runner.runs.index import load_index

from conftest import REPO, load_recording, sigint_as_in_a_terminal, wait_until

pytestmark = pytest.mark.slow
SMOKE_SWEEP = REPO / "experiments" / "smoke_sweep.yaml"


def index_records(path) -> list[dict]:
    rows = load_index(path)
    assert isinstance(rows, pd.DataFrame) and list(rows.columns[:3]) == ["run_id", "name", "status"]
    return rows.to_dict("records")


def test_smoke_sweep_then_resume(tmp_path, small_book, capsys):
    runs = tmp_path / "runs"
    args = ["sweep", str(SMOKE_SWEEP), "--runs", str(runs), "--corpus", str(small_book), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for label in ("train.seed=1 train.precision=bf16-true", "train.seed=2 train.precision=fp32"):
        assert re.search(rf"^{label} \([0-9a-f]{{12}}\) complete on cpu: final loss", out, re.M), out
    exp_dir = runs / "smoke_sweep"
    rows = index_records(exp_dir)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"complete"}
    assert [(r["train.seed"], r["train.precision"]) for r in rows] == [  # in grid order
        (1, "bf16-true"), (1, "fp32"), (2, "bf16-true"), (2, "fp32")]
    assert rows[1]["grid_point"] == "train.seed=1 train.precision=fp32"
    for row in rows:
        assert row["swept"] == "train.seed,train.precision" and row["device"] == "cpu"
        assert row["final_loss"] > 0 and row["steps_per_s"] > 0 and row["dead_tokens"] > 0
        rec = load_recording(row["recording_path"], ("W", "loss"))
        assert rec["W"].shape == (31, 128, 64) and rec["loss"][-1].item() == pytest.approx(row["final_loss"])
        manifest = json.loads((exp_dir / row["run_id"] / "run.json").read_text())
        assert manifest["threads"] == 1  # torch threads = the one CPU Ray assigned
        assert manifest["environment"]["openmp_wait"] == "GOMP_SPINCOUNT=3000"  # a Ray worker sets it too
        # the config as written (as `train` keeps it); where the driver read the book, beside it
        assert manifest["config"]["corpus"]["path"] == str(small_book)
        assert manifest["corpus"]["source"] == str(small_book.resolve())
    csv_lines = (exp_dir / "index.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("run_id,name,status,grid_point,swept,seed")
    mtimes = {p: p.stat().st_mtime_ns for p in exp_dir.glob("*/recording.safetensors")}
    capsys.readouterr()
    assert main(args) == 0  # a finished sweep trains nothing (and does not even start Ray)
    assert "all 4 runs complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in exp_dir.glob("*/recording.safetensors")} == mtimes
    # the time of new runs of the same shape is estimated from the speed these runs measured
    assert main([*args, "--set", "train.steps=60", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(re.search(r"  todo  .*  ~\d+ s$", line) for line in out[:4]), out
    assert re.fullmatch(r"time: ~(\d+ min )?\d+ s of training one run at a time on this machine "
                        r"\(speed of 2 runs of the same shape measured here\)", out[5]), out


def test_failed_run_does_not_stop_the_others(tmp_path, small_book):
    exp = tmp_path / "fails.yaml"
    # 60,000 windows cannot be drawn from the small book: that run is refused before it writes anything
    exp.write_text(f"include: {SMOKE_SWEEP}\nname: fails\n"
                   "grid: {train.seed: [1], train.precision: [fp32], train.batch_size: [4, 60000]}\n")
    assert main(["sweep", str(exp), "--runs", str(tmp_path / "runs"), "--corpus", str(small_book), "--quiet"]) == 1
    rows = {r["train.batch_size"]: r for r in index_records(tmp_path / "runs" / "fails")}
    assert rows[4]["status"] == "complete"
    assert rows[60000]["status"] == "failed"
    assert "too few for 60000 windows of model.context_length + 1 = 129 tokens" in rows[60000]["error"]
    assert [p.name for p in (tmp_path / "runs" / "fails" / rows[60000]["run_id"]).iterdir()] == ["run.json"]


def test_dry_run_lists_runs_and_disk(tmp_path, capsys):
    assert main(["sweep", str(REPO / "experiments" / "seed_sweep.yaml"), "--runs", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    # 8 compact bf16-true recordings of 163 MiB, 8 of bf16-mixed of 321 MiB (fp32 gradients)
    assert len(out) == 18
    assert out[-2] == ("16 runs, 16 to train, 3.79 GiB of recordings to write "
                       "(record.format: compact, before compression)")
    assert out[-1].startswith("time: unknown for 16 runs: no run of their shape")
    assert main(["sweep", str(REPO / "experiments" / "seed_sweep.yaml"), "--runs", str(tmp_path), "--dry-run",
                 "--set", "record.format=full"]) == 0
    assert capsys.readouterr().out.splitlines()[-2] == ("16 runs, 16 to train, 14.73 GiB of recordings to write "
                                                        "(record.format: full; with record.format: compact: 3.79 GiB)")
    assert not any(tmp_path.iterdir())


def test_a_sweep_that_does_not_fit_the_disk_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    import shutil

    free = 5 * 2**30
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - free, free))
    assert main(["sweep", str(REPO / "experiments" / "seed_sweep.yaml"), "--runs", str(tmp_path),
                 "--set", "record.format=full", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("the recordings of 16 runs need 14.73 GiB but only 5.00 GiB are free on that disk; "
                        "with record.format: compact: 4.10 GiB, which fits"), err  # 16 recordings, one compressed copy
    assert not (tmp_path / "seed_sweep").exists()


def test_task_options_pick_the_device():
    exp = build_experiment({"name": "x", "resources": {"cpus_per_run": 2, "gpus_per_run": 0.25}})
    assert task_options(exp, {"CPU": 8, "GPU": 2}) == {"num_cpus": 2, "num_gpus": 0.25}
    assert task_options(exp, {"CPU": 8, "mps": 1}) == {"num_cpus": 2, "resources": {"mps": 0.25}}
    assert task_options(exp, {"CPU": 8}) == {"num_cpus": 2}
    cpu_only = build_experiment({"name": "x", "train": {"device": "cpu"}})
    assert task_options(cpu_only, {"CPU": 8, "GPU": 2}) == {"num_cpus": 1}
    with pytest.raises(Exception, match="needs the Ray resource 'GPU'"):
        task_options(build_experiment({"name": "x", "train": {"device": "cuda"}}), {"CPU": 8})


def _sweep_cmd(exp, runs):
    return [sys.executable, "-m", "runner.cli", "sweep", str(exp), "--runs", str(runs), "--quiet"]


@pytest.fixture
def long_sweep(tmp_path, small_book):
    """Two runs long enough (several seconds each) to be interrupted."""
    exp = tmp_path / "long.yaml"
    exp.write_text(f"include: {SMOKE_SWEEP}\nname: long\ncorpus: {{path: {small_book}}}\n"
                   "train: {steps: 300, batch_size: 4, checkpoint_every: 20}\n"
                   "grid: {train.seed: [1, 2], train.precision: [fp32]}\n")
    return exp


def signal_a_trainer_after_its_checkpoint(sweep: subprocess.Popen, runs: Path, signum: int) -> Path:
    """Send `signum` to the Ray worker training a run of the sweep once that run has a checkpoint;
    the run's directory."""
    signalled: list[Path] = []

    def signal_one() -> bool:
        for manifest_path in runs.glob("long/*/run.json"):
            manifest = json.loads(manifest_path.read_text())
            if (manifest_path.parent / CHECKPOINT).exists() and manifest["status"] == "running":
                os.kill(manifest["environment"]["pid"], signum)  # the Ray worker training it
                signalled.append(manifest_path.parent)
                return True
        assert sweep.poll() is None, f"the sweep ended before a trainer got signal {signum}: {sweep.stdout.read()}"
        return False

    wait_until(signal_one, "a run with a checkpoint", poll_s=0.05)
    return signalled[0]


@pytest.mark.long
def test_killed_worker_is_retried_and_resumes(long_sweep, tmp_path):
    runs = tmp_path / "runs"
    sweep = subprocess.Popen(_sweep_cmd(long_sweep, runs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = signal_a_trainer_after_its_checkpoint(sweep, runs, signal.SIGKILL)
    out, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, out
    rows = index_records(runs / "long")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"complete"}
    assert json.loads((killed / "run.json").read_text())["resumed_from_step"] >= 20


@pytest.mark.long
def test_two_sweeps_on_one_runs_dir_never_train_a_run_twice(long_sweep, tmp_path):
    runs = tmp_path / "runs"
    sweeps = [subprocess.Popen(_sweep_cmd(long_sweep, runs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in sweeps]
    busy = ["being trained by another process" in out for out in outputs]
    assert any(busy), outputs  # the sweeps overlapped: one found a run the other was training
    for sweep_process, found_busy, out in zip(sweeps, busy, outputs, strict=True):
        # each exits 1 exactly when it found a run being trained by the other
        assert sweep_process.returncode == (1 if found_busy else 0), out
        assert found_busy or "2/2 runs complete" in out, out
    rows = index_records(runs / "long")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"complete"}, outputs
    for row in rows:  # each run was trained exactly once: one "complete" line in its log
        log = (runs / "long" / row["run_id"] / "train.log").read_text()
        assert log.count(" complete: final loss") == 1, log


@pytest.mark.long
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_cancels_cleanly_and_the_sweep_resumes(long_sweep, tmp_path, signum, code):
    runs = tmp_path / "runs"
    sweep = subprocess.Popen(_sweep_cmd(long_sweep, runs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=sigint_as_in_a_terminal)
    wait_until(lambda: bool(list(runs.glob("long/*/checkpoint.safetensors"))), "a run's first checkpoint",
               poll_s=0.05)
    sweep.send_signal(signum)
    out, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == code, out
    assert "Token authentication" not in out  # Ray's token mode is on, chosen explicitly: no warning
    statuses = {json.loads(p.read_text())["status"] for p in runs.glob("long/*/run.json")}
    assert statuses <= {"complete", "cancelled"} and "cancelled" in statuses, out
    assert subprocess.run(_sweep_cmd(long_sweep, runs), capture_output=True).returncode == 0
    rows = index_records(runs / "long")
    assert {r["status"] for r in rows} == {"complete"}
    assert any(json.loads((runs / "long" / r["run_id"] / "run.json").read_text()).get("resumed_from_step")
               for r in rows)


def test_joining_a_cluster_waits_for_it_to_come_up(monkeypatch):
    """A sweep submitted right after `make cluster-up` retries until the head answers."""
    attempts = []

    def head_starting(**options):
        attempts.append(options["address"])
        if len(attempts) < 3:
            raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray_session.ray, "init", head_starting)
    monkeypatch.setattr(ray_session, "CONNECT_RETRY_S", 0.01)
    ray_session.start_or_join("auto")
    assert attempts == ["auto"] * 3


def test_no_cluster_at_the_address_is_a_clear_error(monkeypatch, tmp_path, small_book, capsys):
    monkeypatch.setattr(ray_session, "CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(ray_session, "CONNECT_RETRY_S", 0.1)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0123456789abcdef" * 4)  # a client with a token (without: test_ray_auth.py)
    args = ["sweep", str(SMOKE_SWEEP), "--runs", str(tmp_path / "runs"), "--corpus", str(small_book), "--quiet",
            "--address", "auto"]
    assert main(args) == 2
    assert "--address auto: no Ray cluster answered within 0.5 s" in capsys.readouterr().err


def test_the_driver_does_not_import_the_model_stack():
    """The sweep driver plans, watches and indexes; transformers (~1.6 s, ~100 MiB) is for workers."""
    code = "import sys, runner.cli, runner.launch.sweep; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


@pytest.mark.long
def test_sigterm_to_a_worker_cancels_its_run_resumably(long_sweep, tmp_path):
    """What Slurm or Kubernetes does to one node's processes: the run that worker trains is
    cancelled (resumable), the other completes, the sweep exits 1; the same command completes it."""
    runs = tmp_path / "runs"
    sweep = subprocess.Popen(_sweep_cmd(long_sweep, runs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    terminated = signal_a_trainer_after_its_checkpoint(sweep, runs, signal.SIGTERM)
    out, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 1 and "cancelled on its worker (SIGTERM); the same command resumes it" in out, out
    manifest = json.loads((terminated / "run.json").read_text())
    assert manifest["status"] == "cancelled" and "SIGTERM" in manifest["error"], manifest
    assert subprocess.run(_sweep_cmd(long_sweep, runs), capture_output=True).returncode == 0
    assert json.loads((terminated / "run.json").read_text())["resumed_from_step"] >= 20


def test_waiting_for_nodes_that_do_not_come_is_one_line(monkeypatch):
    """A Slurm job's driver waits for the job's nodes to join; a node that never does is named by count."""
    alive = [{"Alive": True}, {"Alive": False}]
    monkeypatch.setattr(ray_session.ray, "nodes", lambda: alive)
    with pytest.raises(ray_session.ConfigError, match=r"^--expect-nodes 2: 1 of 2 nodes joined the Ray cluster "
                                                      r"within 0.2 s \(a Slurm job's directory has each node's "
                                                      r"ray-NODE.log\)$"):
        ray_session.wait_for_nodes(2, timeout_s=0.2)
    alive[1]["Alive"] = True
    ray_session.wait_for_nodes(2, timeout_s=0.2)  # both: returns
