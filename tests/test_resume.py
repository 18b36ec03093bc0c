"""Nothing lost: interrupted runs resume from their last checkpoint to a bitwise identical recording."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runner.data.corpus
import runner.recording.writer
from runner.errors import ConfigError
from runner.launch.train import run
from runner.layout import CHECKPOINT, RECORDING
from runner.model.bf16_via_fp32 import FORCE_ENV, native_bf16_gemm
from runner.recording.format import PARAMETER_FINGERPRINTS
from runner.recording.verify import read_metadata

from conftest import REPO, flip_byte, load_recording, pwrite_that_fills_the_disk_after, wait_until

pytestmark = pytest.mark.slow
STEPS, EVERY = 200, 7  # a checkpoint every 7 steps, so kills land between, on and just after them


@pytest.fixture(scope="module")
def experiment_file(tmp_path_factory, small_book) -> Path:
    path = tmp_path_factory.mktemp("exp") / "resume.yaml"
    path.write_text(f"include: {REPO / 'experiments' / 'smoke.yaml'}\nname: resume\n"
                    f"corpus: {{path: {small_book}}}\n"
                    f"train: {{steps: {STEPS}, batch_size: 4, checkpoint_every: {EVERY}}}\n")
    return path


@pytest.fixture(scope="module")
def uninterrupted(experiment_file, tmp_path_factory) -> Path:
    from runner.config import load_runs
    (spec,) = load_runs(experiment_file)
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run(spec.experiment, run_dir, progress=False)
    return run_dir


def train_cmd(experiment_file: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "runner.cli", "train", str(experiment_file), "--out", str(out), "--quiet"]


def assert_identical(out: Path, expected: Path) -> None:
    """`out`'s recording equals the run in `expected`: every tensor, every parameter at the end
    (full precision, by the fingerprint in the metadata) and the digests of its bytes."""
    recording, want = load_recording(out / RECORDING), load_recording(expected / RECORDING)
    assert set(recording) == set(want)
    for name, tensor in want.items():
        assert torch.equal(recording[name], tensor), name
    got_metadata, want_metadata = read_metadata(out / RECORDING), read_metadata(expected / RECORDING)
    for key in PARAMETER_FINGERPRINTS.values():
        assert got_metadata[key] == want_metadata[key], key
    assert got_metadata["digests"] == want_metadata["digests"]  # a resume's blocks carried over from its checkpoint
    assert not list(out.glob("*.partial")) and not list(out.glob("checkpoint*"))


def last_logged_step(log: Path) -> int:
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return 0
    steps = [int(m[1]) for line in lines if (m := re.search(r" step (\d+)/", line))]
    return steps[-1] if steps else 0


def kill_then_resume(experiment_file: Path, out: Path, rng: random.Random) -> None:
    """Train in a fresh process, SIGKILL it at a random step, then resume it in another."""
    target = rng.randrange(20, STEPS - 20)
    proc = subprocess.Popen(train_cmd(experiment_file, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: last_logged_step(out / "train.log") >= target or proc.poll() is not None,
               f"the run to log step {target}")
    time.sleep(rng.random() * 0.1)  # a few more steps, so the kill is not always right after a log line
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_logged_step(out / "train.log")
    assert killed_at < STEPS, f"the run finished before the kill (target step {target})"
    assert not (out / RECORDING).exists() and (out / (RECORDING + ".partial")).exists()
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    assert subprocess.run(train_cmd(experiment_file, out), capture_output=True).returncode == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed_from_step"] >= killed_at - EVERY - 10


@pytest.mark.parametrize("trial", [0, pytest.param(1, marks=pytest.mark.long)])  # a second kill point: long tier
def test_sigkill_at_a_random_step_then_resume(experiment_file, uninterrupted, tmp_path, trial):
    kill_then_resume(experiment_file, tmp_path / "run", random.Random(1000 + trial))  # seeded: a failure can be retried
    assert_identical(tmp_path / "run", uninterrupted)


@pytest.mark.long  # 16 s: the resume again, with the other bf16 product path
def test_sigkill_then_resume_with_bf16_products_through_fp32(experiment_file, tmp_path, monkeypatch):
    """The same on the fp32-GEMM path (bf16_via_fp32), forced on any CPU: the processes inherit it."""
    from runner.config import load_runs
    if not native_bf16_gemm(torch.device("cpu")):
        pytest.skip("this CPU takes the fp32-GEMM path by default: the SIGKILL tests above cover it")
    monkeypatch.setenv(FORCE_ENV, "fp32")
    (spec,) = load_runs(experiment_file)
    run(spec.experiment, tmp_path / "uninterrupted", progress=False)
    kill_then_resume(experiment_file, tmp_path / "run", random.Random(2000))
    assert_identical(tmp_path / "run", tmp_path / "uninterrupted")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["implementation"]["bf16_gemm"] == "fp32"


def test_sigkill_during_a_checkpoint_write(experiment_file, uninterrupted, tmp_path):
    """The process dies halfway through writing its third checkpoint; the second one is used. The
    leftover of an older version's crash (safetensors' save_file wrote a `.tmpXXXXXX` beside the
    checkpoint) does not stop the resume either."""
    out = tmp_path / "run"
    killer = f"""
import os, signal, sys
import runner.training.checkpoint as ckpt
calls = []
def dying_serialize(tensors, metadata):
    data = real_serialize(tensors, metadata=metadata)
    calls.append(len(data))
    if len(calls) == 3:
        with open({str(out / "checkpoint.safetensors.tmp")!r}, "wb") as f:
            f.write(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return data
real_serialize, ckpt.serialize = ckpt.serialize, dying_serialize
from runner.cli import main
sys.exit(main({train_cmd(experiment_file, out)[3:]!r}))
"""
    result = subprocess.run([sys.executable, "-c", killer], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    half = (out / "checkpoint.safetensors.tmp").read_bytes()
    assert 0 < len(half) < (out / "checkpoint.safetensors").stat().st_size
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp")) == []  # nothing of safetensors'
    (out / ".tmpf3fBsR").write_bytes(half)
    assert subprocess.run(train_cmd(experiment_file, out), capture_output=True).returncode == 0
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] == 2 * EVERY
    assert_identical(out, uninterrupted)


def test_write_error_mid_run_fails_then_resumes(experiment_file, uninterrupted, tmp_path, monkeypatch):
    from runner.config import load_runs
    (spec,) = load_runs(experiment_file)
    real_pwrite = os.pwrite
    monkeypatch.setattr(runner.recording.writer.os, "pwrite", pwrite_that_fills_the_disk_after(40))
    with pytest.raises(OSError, match="No space left"):
        run(spec.experiment, tmp_path, progress=False)
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["status"] == "failed" and "No space left" in manifest["error"]
    assert not (tmp_path / RECORDING).exists() and (tmp_path / (RECORDING + ".partial")).exists()
    monkeypatch.setattr(runner.recording.writer.os, "pwrite", real_pwrite)
    manifest = run(spec.experiment, tmp_path, progress=False)
    assert manifest["resumed_from_step"] > 0
    assert_identical(tmp_path, uninterrupted)


@pytest.mark.long
def test_restart_ignores_the_checkpoint(experiment_file, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(experiment_file, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: last_logged_step(out / "train.log") >= 50 or proc.poll() is not None,
               "the run to log step 50")
    proc.kill()
    proc.wait()
    assert 50 <= last_logged_step(out / "train.log") < STEPS and (out / "checkpoint.safetensors").exists()
    assert subprocess.run(train_cmd(experiment_file, out) + ["--restart"], capture_output=True).returncode == 0
    assert "resumed_from_step" not in json.loads((out / "run.json").read_text())
    # the restart trained from step 1: its first progress line is logged a second time (a resume
    # would have started after its checkpoint, past step 49, and said so)
    log = (out / "train.log").read_text()
    first = re.search(r" step (\d+)/", log)[1]
    assert log.count(f" step {first}/{STEPS} ") == 2 and "resuming after step" not in log
    assert_identical(out, uninterrupted)


def test_resume_in_a_later_epoch(tmp_path, crash_after_checkpoint):
    """A corpus of 10 batches per epoch: the run crashes right after its checkpoint at step 12 (in
    epoch 2) and resumes there, to the same recording as an uninterrupted run."""
    from runner.config import build_experiment
    from runner.data.batches import WindowSampler
    from runner.data.tokenizer import encode

    book = tmp_path / "tiny.txt"
    book.write_text("It was the green light at the end of Daisy's dock. " * 2)
    exp = build_experiment({"name": "epochs", "corpus": {"path": str(book)}, "model": {"context_length": 16},
                            "train": {"steps": 30, "batch_size": 8, "device": "cpu", "checkpoint_every": 12}})
    text = runner.data.corpus.load_corpus(str(book), "drop").text
    per_epoch = WindowSampler(encode(text), 16, 8, 0).batches_per_epoch
    assert per_epoch < 12 < 2 * per_epoch < 30  # resumes in epoch 2, then crosses into epoch 3
    run(exp, tmp_path / "uninterrupted", progress=False)
    crash_after_checkpoint(exp, tmp_path / "resumed")
    assert run(exp, tmp_path / "resumed", progress=False)["resumed_from_step"] == 12
    assert_identical(tmp_path / "resumed", tmp_path / "uninterrupted")


def test_a_run_leaves_torchs_thread_count_as_it_found_it(make_experiment, tmp_path):
    """A run on 1 thread in a process of 2 (a notebook, this suite): the process's next run, with
    `train.threads` unset, trains on 2 again, as a fresh process would."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run(make_experiment(train={"steps": 2}), tmp_path / "run", threads=1, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_resume_keeps_the_thread_count_it_started_with(make_experiment, tmp_path, crash_after_checkpoint):
    """Started on 1 thread, resumed where 2 are offered: it trains on with 1, to the uninterrupted run's bits."""
    exp = make_experiment(train={"steps": 30, "checkpoint_every": 10})
    run(exp, tmp_path / "uninterrupted", threads=1, progress=False)
    crash_after_checkpoint(exp, tmp_path / "resumed", threads=1)
    manifest = run(exp, tmp_path / "resumed", threads=2, progress=False)
    assert manifest["resumed_from_step"] == 10 and manifest["threads"] == 1
    assert "resuming with the 1 thread it started with (offered 2)" in (tmp_path / "resumed" / "train.log").read_text()
    assert_identical(tmp_path / "resumed", tmp_path / "uninterrupted")


def snapshot_of(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_resume_with_other_kernels_is_refused(make_experiment, tmp_path, crash_after_checkpoint, monkeypatch):
    """A run interrupted under other kernels (older code, same run id) is never continued with mixed
    bits: one line, nothing changed; --restart trains it again from step 0 with today's."""
    import runner.training.loop
    from runner.model.kernels import HF_DEFAULTS, choose

    exp = make_experiment(train={"steps": 30, "checkpoint_every": 10})
    assert choose(exp.train.precision, torch.device("cpu"), exp.train.kernels) != HF_DEFAULTS
    run(exp, tmp_path / "uninterrupted", progress=False)
    monkeypatch.setattr(runner.training.loop, "choose", lambda *args: HF_DEFAULTS)
    crash_after_checkpoint(exp, tmp_path / "resumed")
    monkeypatch.undo()
    before = snapshot_of(tmp_path / "resumed")
    with pytest.raises(ConfigError, match=r"resumed: its checkpoint was trained with other kernels .*--restart"):
        run(exp, tmp_path / "resumed", progress=False)
    assert snapshot_of(tmp_path / "resumed") == before
    manifest = run(exp, tmp_path / "resumed", progress=False, restart=True)
    assert "resumed_from_step" not in manifest
    assert_identical(tmp_path / "resumed", tmp_path / "uninterrupted")


def test_a_resume_with_another_book_is_refused(make_experiment, tmp_path, crash_after_checkpoint, small_book):
    """The same command with another --corpus (the path is not part of the run id): refused in one
    line naming the book's hash, nothing changed, instead of a recording half one book, half the other."""
    other = tmp_path / "other.txt"
    other.write_text(small_book.read_text().replace("father", "mother"))
    exp = make_experiment(train={"steps": 30, "checkpoint_every": 10})
    crash_after_checkpoint(exp, tmp_path / "run")
    before = snapshot_of(tmp_path / "run")
    moved = make_experiment(train={"steps": 30, "checkpoint_every": 10}, corpus={"path": str(other)})
    assert moved.run_id == exp.run_id
    refusal = r"trained with another book \(corpus sha256\) \([0-9a-f]{64}; now [0-9a-f]{64}\)"
    with pytest.raises(ConfigError, match=refusal):
        run(moved, tmp_path / "run", progress=False)
    assert snapshot_of(tmp_path / "run") == before
    assert run(exp, tmp_path / "run", progress=False)["resumed_from_step"] == 10  # its own book resumes it


def test_resume_with_every_optimizer_knob(make_experiment, tmp_path, crash_after_checkpoint):
    """AdamW's two parameter groups, the schedule, clipping and an untied E survive a crash: the
    resumed run ends with the uninterrupted run's bits (E's rows, lr and grad_norm included)."""
    exp = make_experiment(train={"steps": 20, "checkpoint_every": 8, "optimizer": "adamw", "weight_decay": 0.1,
                                 "lr_schedule": "cosine", "warmup_steps": 4, "min_lr": 1e-4, "grad_clip": 0.5},
                          model={"tie_embeddings": False}, record={"model_steps": "none"})
    run(exp, tmp_path / "uninterrupted", progress=False)
    crash_after_checkpoint(exp, tmp_path / "resumed")
    assert run(exp, tmp_path / "resumed", progress=False)["resumed_from_step"] == 8
    assert_identical(tmp_path / "resumed", tmp_path / "uninterrupted")
    assert {"E", "lr", "grad_norm"} <= set(load_recording(tmp_path / "resumed" / RECORDING))


def test_an_unreadable_checkpoint_is_retried_then_fails_the_run_and_is_kept(make_experiment, tmp_path,
                                                                            crash_after_checkpoint, monkeypatch):
    """A transient read error is never taken for a missing checkpoint (the run would start over)."""
    import runner.training.checkpoint as checkpoint
    from runner.training.checkpoint import CheckpointUnreadable

    exp = make_experiment(train={"steps": 12, "checkpoint_every": 4})
    run(exp, tmp_path / "uninterrupted", progress=False)
    crash_after_checkpoint(exp, tmp_path / "resumed")
    monkeypatch.setattr(checkpoint, "RETRY_S", 0.0)
    real_open, failures = checkpoint.safe_open, []

    def flaky(path, **kwargs):
        if len(failures) < checkpoint.READ_ATTEMPTS - 1:  # fails, then reads on the last try
            failures.append(path)
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", flaky)
    assert run(exp, tmp_path / "resumed", progress=False)["resumed_from_step"] == 4
    assert_identical(tmp_path / "resumed", tmp_path / "uninterrupted")

    crash_after_checkpoint(exp, tmp_path / "broken")
    failures.clear()
    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(CheckpointUnreadable, match="kept"):
        run(exp, tmp_path / "broken", progress=False)
    assert (tmp_path / "broken" / CHECKPOINT).exists()
    assert json.loads((tmp_path / "broken" / "run.json").read_text())["status"] == "failed"


def test_an_unreadable_run_json_is_named_and_left_alone(make_experiment, small_book, tmp_path, capsys):
    from runner.cli import main

    runs = tmp_path / "runs"
    args = ["train", str(REPO / "experiments" / "smoke.yaml"), "--runs", str(runs), "--corpus", str(small_book),
            "--set", "train.steps=3", "--quiet"]
    assert main(args) == 0
    (run_dir,) = [d for d in (runs / "smoke").iterdir() if d.is_dir()]
    (run_dir / "run.json").write_text('{"status": "complete", "run_id"')  # torn by some other tool
    capsys.readouterr()
    assert main(args) == 2  # neither trained again nor written over
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{run_dir / 'run.json'}: unreadable" in err
    assert (run_dir / "run.json").read_text() == '{"status": "complete", "run_id"'
    assert main(["index", str(runs)]) == 0
    (row,) = [json.loads(line) for line in (runs / "smoke" / "index.jsonl").read_text().splitlines()]
    assert row["run_id"] == run_dir.name and row["status"] == "unreadable" and "unreadable" in row["error"]


def test_a_partial_recording_changed_after_its_checkpoint_is_refused(make_experiment, tmp_path,
                                                                     crash_after_checkpoint):
    """One bit of W flipped in the partial file before the resume: refused in one line naming the
    tensor and rows (the checkpoint's digests), nothing changed; --restart trains it again whole."""
    exp = make_experiment(train={"steps": 30, "checkpoint_every": 10})
    run(exp, tmp_path / "uninterrupted", progress=False)
    crash_after_checkpoint(exp, tmp_path / "resumed")
    partial = tmp_path / "resumed" / (RECORDING + ".partial")
    flip_byte(partial, "W", 4)
    before = snapshot_of(tmp_path / "resumed")
    with pytest.raises(ConfigError, match=r"recording.safetensors.partial: W: rows 0..10 differ from the digest "
                                          r"written with them \(the checkpoint's\)"):
        run(exp, tmp_path / "resumed", progress=False)
    assert snapshot_of(tmp_path / "resumed") == before
    run(exp, tmp_path / "resumed", progress=False, restart=True)
    assert_identical(tmp_path / "resumed", tmp_path / "uninterrupted")


def test_a_resume_past_a_digest_block_carries_the_checkpoints_digests(make_experiment, tmp_path,
                                                                     crash_after_checkpoint):
    """Checkpoint at row 101 (one complete block of 64 rows, then 37): the resumed recording's
    digests (the first block taken from the checkpoint, the second rebuilt from the file) equal
    an uninterrupted run's, and it verifies."""
    from runner.recording.verify import verify

    exp = make_experiment(train={"steps": 160, "checkpoint_every": 100})
    run(exp, tmp_path / "uninterrupted", progress=False)
    crash_after_checkpoint(exp, tmp_path / "resumed")
    assert run(exp, tmp_path / "resumed", progress=False)["resumed_from_step"] == 100
    assert_identical(tmp_path / "resumed", tmp_path / "uninterrupted")
    assert verify(tmp_path / "resumed") == []
