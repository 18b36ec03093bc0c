"""Nothing wrong is ever called complete: a run directory belongs to one run, snapshots are checked
rather than assumed, `rm` deletes only what runs write, SIGTERM cancels like Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.cli import main
from runner.errors import ConfigError
from runner.interrupt import Terminated, sigterm_as_interrupt
from runner.launch.run_at import train_at
from runner.storage.location import at

from conftest import REPO, flip_byte, pwrite_that_fills_the_disk_after, sigint_as_in_a_terminal, wait_until

SMOKE = str(REPO / "experiments" / "smoke.yaml")


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def weights(run_dir: Path, step: int) -> bytes:
    return (run_dir / "models" / f"step-{step}" / "model.safetensors").read_bytes()


def test_a_directory_of_another_run_is_refused_unless_force(make_experiment, tmp_path):
    """seed 1 then seed 2 into one --out: refused in one line, nothing changed; with --force the old
    run's files go first, and the snapshot is seed 2's (it was seed 1's: the existing one was kept)."""
    seed1, seed2 = (make_experiment(train={"steps": 4, "seed": seed}) for seed in (1, 2))
    shared, fresh = at(tmp_path / "shared"), at(tmp_path / "fresh")
    train_at(seed1, shared, progress=False)
    train_at(seed2, fresh, progress=False)
    before = files_of(tmp_path / "shared")
    with pytest.raises(ConfigError, match=rf"shared: holds run {seed1.run_id} of 'test', not {seed2.run_id}: "
                                          r"--force removes its files"):
        train_at(seed2, shared, progress=False)
    assert files_of(tmp_path / "shared") == before
    manifest = train_at(seed2, shared, progress=False, force=True)
    assert manifest["run_id"] == seed2.run_id and manifest["status"] == "complete"
    seed1_weights = before["models/step-4/model.safetensors"]
    assert weights(tmp_path / "shared", 4) == weights(tmp_path / "fresh", 4) != seed1_weights


def test_a_snapshot_left_by_another_model_is_replaced_not_kept(make_experiment, tmp_path):
    seed1, seed2 = (make_experiment(train={"steps": 4, "seed": seed}) for seed in (1, 2))
    train_at(seed1, at(tmp_path / "one"), progress=False)
    train_at(seed2, at(tmp_path / "two"), progress=False)
    (tmp_path / "planted" / "models").mkdir(parents=True)
    (tmp_path / "one" / "models" / "step-4").rename(tmp_path / "planted" / "models" / "step-4")
    train_at(seed2, at(tmp_path / "planted"), progress=False)
    assert weights(tmp_path / "planted", 4) == weights(tmp_path / "two", 4)


def test_a_directory_with_a_users_files_is_refused_even_with_force(tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("my own work")
    for force in ([], ["--force"]):
        assert main(["train", SMOKE, "--out", str(out), *force]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "thesis: holds files that are not a run's (chapter1.tex)" in err, err
    assert files_of(out) == {"chapter1.tex": b"my own work"}


def test_rm_never_deletes_a_directory_holding_files_no_run_writes(make_experiment, tmp_path, capsys):
    exp_dir = tmp_path / "runs" / "test"
    exp = make_experiment(train={"steps": 2})
    train_at(exp, at(exp_dir / exp.run_id), progress=False)
    (exp_dir / exp.run_id / "notes.md").write_text("what I saw")
    before = files_of(exp_dir)
    capsys.readouterr()
    assert main(["rm", str(exp_dir), "--status", "complete"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds files that are not a run's (notes.md); remove them yourself" in err, err
    assert files_of(exp_dir) == before
    (exp_dir / exp.run_id / "notes.md").unlink()
    assert main(["rm", str(exp_dir), "--status", "complete"]) == 0
    assert not (exp_dir / exp.run_id).exists()


@pytest.mark.slow  # trainings in subprocesses (SIGTERM's in the long tier: `make test` stays under 8 minutes)
@pytest.mark.parametrize("signum, code, said", [
    (signal.SIGINT, 130, "cancelled by the user (Ctrl-C); resumable"),
    pytest.param(signal.SIGTERM, 143, "cancelled by SIGTERM (scancel, a time limit, kill); resumable",
                 marks=pytest.mark.long),
])
def test_ctrl_c_and_sigterm_cancel_the_run_and_the_same_command_resumes_it(tmp_path, small_book, signum, code, said):
    """Exit 130 or 143, the run `cancelled` and resumable (as in a sweep); the samples printed once."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "runner.cli", "train", SMOKE, "--out", str(out), "--corpus", str(small_book),
               "--set", "train.steps=100", "--set", "train.checkpoint_every=20"]
    train = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=sigint_as_in_a_terminal)
    wait_until(lambda: (out / "checkpoint.safetensors").exists(), "the run's first checkpoint", poll_s=0.05)
    train.send_signal(signum)
    output, _ = train.communicate(timeout=120)
    assert train.returncode == code, output
    manifest = json.loads((out / "run.json").read_text())
    assert (manifest["status"], manifest["error"]) == ("cancelled", said), output
    resumed = subprocess.run(command + ["--quiet"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] >= 20
    assert resumed.stdout.count("sample 'Gatsby' -> ") == 1 and "sample" not in resumed.stderr


def test_a_second_sigterm_does_not_cut_short_the_clean_up_of_the_first():
    """`scancel` signals every process of the job and the batch script passes its SIGTERM on: the
    driver's marking of its runs as cancelled, in the handler of the first, must run to its end."""
    cleaned_up = False
    with pytest.raises(Terminated), sigterm_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGTERM)  # the second
            time.sleep(0.05)
            cleaned_up = True
            raise
    assert cleaned_up


def test_a_submitted_driver_takes_sigint_even_when_it_inherited_it_blocked_and_ignored():
    """What `ray job stop` sends a sweep's driver: taken as Ctrl-C (exit 130) though the process that
    started it had SIGINT blocked and ignored, as Ray's own processes have."""
    def as_ray_starts_it() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    code = ("import sys, time\nfrom runner.interrupt import sigint_as_ctrl_c\nsigint_as_ctrl_c()\nprint('ready', "
            "flush=True)\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    sys.exit(130)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              preexec_fn=as_ray_starts_it)
    assert driver.stdout is not None and driver.stdout.readline() == "ready\n"
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=20) == 130


HOSTILE_YAML = [
    ("a: &a [1, 2]\nb: &b [*a, *a]\nname: bomb\n", "line 2: aliases (*a) are not allowed"),
    ("x: &x [*x]\n", "line 1: aliases (*x) are not allowed"),
    ("name: !!binary aGVsbG8=\n", "line 1: binary values are not allowed"),
    ("name: !!set {a, b}\n", "line 1: set values are not allowed"),
    ("name: smoke\ntrain: {steps: 20}\ntrain: {lr: 0.001}\n", "line 3: key 'train' given twice"),
    ("name: g\ngrid: {train.seed: {range: [0, 1180591620717411303424]}}\n",
     "grid.train.seed: range [0, 1180591620717411303424] has more values than a grid may have runs (10,000)"),
    ("name: !!python/object:os.system ls\n", "could not determine a constructor"),
    ("name: big\ngrid: {train.seed: [" + "1, " * 400_000 + "1]}\n",  # a literal list of 400,001 values
     "cannot use as an experiment file: larger than 1 MiB"),
]


@pytest.mark.parametrize("text, message", HOSTILE_YAML)
def test_hostile_experiment_files_are_one_line_and_write_nothing(tmp_path, capsys, text, message):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    assert main(["sweep", str(path), "--dry-run", "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: " in err and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_sweep_over_a_run_json_of_the_wrong_shape_is_one_line_and_trains_nothing(tmp_path, capsys, small_book):
    runs = tmp_path / "runs"
    assert main(["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--runs", str(runs), "--dry-run"]) == 0
    first = capsys.readouterr().out.split()[0]
    (runs / "smoke_sweep" / first).mkdir(parents=True)
    (runs / "smoke_sweep" / first / "run.json").write_text('{"metrics": 5}')
    assert main(["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--runs", str(runs), "--corpus",
                 str(small_book), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{first}/run.json: unreadable (metrics is 5, not an object)" in err, err
    assert [p.name for p in (runs / "smoke_sweep").iterdir()] == [first]


def test_a_date_is_a_string_not_a_timestamp(tmp_path, capsys):
    path = tmp_path / "dated.yaml"
    path.write_text(f"include: {SMOKE}\nname: 2024-01-01\n")
    assert main(["sweep", str(path), "--dry-run", "--runs", str(tmp_path / "runs")]) == 0
    assert not (tmp_path / "runs").exists()


def test_special_files_are_refused_by_type_before_they_are_opened(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block for ever
    include = tmp_path / "includes.yaml"
    include.write_text(f"include: {fifo}\nname: x\n")
    for args, message in ((["sweep", str(fifo), "--dry-run"], f"{fifo}: cannot use as an experiment file: a FIFO"),
                          (["sweep", str(include), "--dry-run"], f"{fifo}: cannot use as an experiment file: a FIFO"),
                          (["train", SMOKE, "--corpus", str(fifo)], f"{fifo}: cannot use as the corpus: a FIFO"),
                          (["train", SMOKE, "--corpus", "/dev/zero"], "/dev/zero: cannot use as the corpus: a "
                                                                      "character device")):
        assert main([*args, "--runs", str(tmp_path / "runs")]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("book", ["x", "a short book " * 10])
def test_a_book_too_short_for_one_batch_is_refused_before_anything_is_written(tmp_path, capsys, book):
    path = tmp_path / "tiny.txt"
    path.write_text(book)
    assert main(["train", SMOKE, "--corpus", str(path), "--runs", str(tmp_path / "runs")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lilgatsby: error:")]
    assert len(errors) == 1 and "tokens, too few for 8 windows of model.context_length + 1 = 129 tokens" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_a_run_json_of_the_wrong_shape_is_named_never_a_traceback(make_experiment, tmp_path, capsys):
    """Valid JSON of the wrong shape: the index names the run unreadable (as for JSON that does not
    parse), and rm and report, left with no run to work on, say so in one line."""
    exp_dir = tmp_path / "runs" / "test"
    exp = make_experiment(train={"steps": 2})
    train_at(exp, at(exp_dir / exp.run_id), progress=False)
    (exp_dir / exp.run_id / "run.json").write_text('{"run_id": "abc", "metrics": 5}')
    capsys.readouterr()
    assert main(["index", str(exp_dir)]) == 0
    (row,) = [json.loads(line) for line in (exp_dir / "index.jsonl").read_text().splitlines()]
    assert row["status"] == "unreadable" and "run.json: unreadable (metrics is 5, not an object)" in row["error"]
    for args, message in ((["rm", str(exp_dir), "--where", "train.seed=1"], "--where train.seed: not a column"),
                          (["report", str(exp_dir), "--out", str(tmp_path / "report")], "no complete or running run")):
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)


# -- end to end, as a user would meet them: real processes, SIGKILL, the same command again ------

def lilgatsby(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, timeout=300)


def killed_after_first_checkpoint(command: list[str], out: Path) -> None:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: (out / "checkpoint.safetensors").exists(), "the run's first checkpoint", poll_s=0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("lilgatsby: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.mark.long
def test_end_to_end_a_killed_run_never_resumes_mixed(tmp_path, small_book):
    """SIGKILL after a checkpoint; the same command with another book, then with one bit of W
    flipped in the partial file: each refused in one line, nothing changed; the untouched run then
    resumes, completes and verifies; one bit flipped in the complete recording's logits fails verify."""
    other = tmp_path / "other.txt"
    other.write_text(small_book.read_text().replace("father", "mother"))
    out = tmp_path / "run"
    command = ["train", SMOKE, "--out", str(out), "--quiet", "--set", "train.steps=150",
               "--set", "train.checkpoint_every=50"]
    killed_after_first_checkpoint([sys.executable, "-m", "runner.cli", *command, "--corpus", str(small_book)], out)
    before = files_of(out)
    assert "trained with another book (corpus sha256)" in one_error_line(lilgatsby(*command, "--corpus", str(other)))
    assert files_of(out) == before
    partial = out / "recording.safetensors.partial"
    flip_byte(partial, "W", 30)
    assert "W: rows 0..50 differ from the digest" in one_error_line(lilgatsby(*command, "--corpus", str(small_book)))
    flip_byte(partial, "W", 30)  # back as it was written
    resumed = lilgatsby(*command, "--corpus", str(small_book))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] == 50
    assert lilgatsby("verify", str(out)).returncode == 0
    flip_byte(out / "recording.safetensors", "logits", 100)
    result = lilgatsby("verify", str(out))
    assert result.returncode == 1 and "logits: rows 64..127 differ from the digest written with them" in result.stdout


@pytest.mark.long
def test_end_to_end_a_directory_is_one_runs_and_rm_deletes_only_runs(tmp_path, small_book):
    """seed 1, then seed 2 into the same --out: refused, then with --force the directory is seed 2's
    alone (its snapshot a fresh seed-2 run's); a user's directory is never trained into nor removed."""
    def train(seed: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return lilgatsby("train", SMOKE, "--out", str(out), "--corpus", str(small_book), "--quiet",
                         "--set", "train.steps=20", "--set", f"train.seed={seed}", *extra)

    shared, fresh = tmp_path / "runs" / "smoke" / "shared", tmp_path / "fresh"
    assert train(1, shared).returncode == 0 and train(2, fresh).returncode == 0
    assert "--force removes its files" in one_error_line(train(2, shared))
    assert train(2, shared, "--force").returncode == 0
    assert weights(shared, 20) == weights(fresh, 20)
    mine = tmp_path / "runs" / "smoke" / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("my own work")
    assert "holds files that are not a run's (thesis.tex)" in one_error_line(train(1, mine))
    assert files_of(mine) == {"thesis.tex": b"my own work"}
    removed = lilgatsby("rm", str(tmp_path / "runs" / "smoke"), "--status", "complete")
    assert removed.returncode == 0, removed.stderr
    assert not shared.exists() and files_of(mine) == {"thesis.tex": b"my own work"}


def test_environment_faults_are_one_line(make_experiment, tmp_path, capsys):
    """A symlink loop as the runs root, /proc as one, a report's --out at a file: one line, exit 2."""
    exp_dir = tmp_path / "runs" / "test"
    exp = make_experiment(train={"steps": 2})
    train_at(exp, at(exp_dir / exp.run_id), progress=False)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "file").write_text("not a directory")
    capsys.readouterr()
    for args, message in ((["sweep", SMOKE, "--runs", str(tmp_path / "a"), "--dry-run"], "cannot resolve the path"),
                          (["rm", str(tmp_path / "a"), "--status", "complete"], "a: not an experiment directory"),
                          (["index", "/proc"], "/proc"),
                          (["report", str(exp_dir / exp.run_id), "--out", str(tmp_path / "file")],
                           f"--out {tmp_path / 'file'}: cannot make the report's directory (File exists)")):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lilgatsby: error: ") and message in err, (args, err)


@pytest.mark.long  # trainings in subprocesses, in a mount namespace of its own
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
def test_a_read_only_runs_root_is_one_line_and_nothing_is_written(tmp_path, small_book):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    script = (f"mount -t tmpfs -o ro none {readonly} && for args in 'train {SMOKE} --corpus {small_book}' "
              f"'sweep {REPO / 'experiments' / 'smoke_sweep.yaml'} --corpus {small_book}'; do "
              f"out=$({sys.executable} -m runner.cli $args --runs {readonly} --quiet 2>&1); code=$?; "
              f"echo \"$out\" | grep -v '^INFO'; echo \"exit $code\"; done")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert lines[0] == f"lilgatsby: error: {readonly / 'smoke'}: Read-only file system", result.stdout
    assert lines[1] == lines[3] == "exit 2", result.stdout
    assert lines[2] == f"lilgatsby: error: {readonly / 'smoke_sweep'}: cannot create the directory " \
                       f"(Read-only file system)", result.stdout
    assert not any(readonly.iterdir())


@pytest.mark.slow  # a training that the full disk stops (~3.5 s)
def test_a_disk_that_fills_up_mid_run_is_one_line(tmp_path, small_book, capsys, monkeypatch):
    """`lilgatsby train` when a write fails with ENOSPC after some chunks: one line naming the error,
    exit 2, the run `failed` and its partial recording kept for the resume (test_resume resumes one)."""
    import runner.recording.writer

    monkeypatch.setattr(runner.recording.writer.os, "pwrite", pwrite_that_fills_the_disk_after(20))
    out = tmp_path / "run"
    assert main(["train", SMOKE, "--out", str(out), "--corpus", str(small_book), "--quiet",
                 "--set", "train.steps=200", "--set", "train.batch_size=4"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lilgatsby: error:")]
    assert errors == ["lilgatsby: error: No space left on device"], errors
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert (out / "recording.safetensors.partial").exists() and not (out / "recording.safetensors").exists()
