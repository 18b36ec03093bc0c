"""Compact recordings: the full format's every bit, from gradients, logits, loss and keyframes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import runner.recording.format
from runner import open_recording
from runner.analysis.compare import compare
from runner.errors import ConfigError
from runner.launch.train import run
from runner.layout import RECORDING
from runner.recording.format import KEYFRAMES, scheduled_keyframes
from runner.recording.replay import AdamReplay
from runner.recording.rows import RowReader
from runner.recording.verify import verify
from runner.runs.rundir import is_complete

from conftest import flip_byte, load_recording, small_experiment

# AdamW with decay, warm-up then cosine, and a clip that bites: every input of the update varies
KNOBS = {"optimizer": "adamw", "weight_decay": 0.1, "lr_schedule": "cosine", "warmup_steps": 5, "min_lr": 1e-4,
         "lr": 3e-3, "grad_clip": 0.5}
STEPS = 40
INTERVAL = 16  # scheduled keyframes at 0, 1, 16, 32: replays across them and between them


@pytest.fixture(autouse=True)
def short_keyframe_interval(monkeypatch):
    monkeypatch.setattr(runner.recording.format, "KEYFRAME_INTERVAL", INTERVAL)


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory, small_book):
    """`_pair` in bf16-true, tied, trained once for the tests that only read it or copy it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner.recording.format, "KEYFRAME_INTERVAL", INTERVAL)
        return _pair(lambda **sections: small_experiment(small_book, **sections), tmp_path_factory.mktemp("pair"),
                     "bf16-true", True)


@pytest.fixture
def compact_copy(bf16_pair, tmp_path):
    """A copy of `bf16_pair`'s compact run, to damage."""
    return Path(shutil.copytree(bf16_pair[0], tmp_path / "compact"))


def _pair(make_experiment, tmp_path, precision, tied, **record):
    """The same run recorded in both formats: (compact run dir, full run dir)."""
    dirs = []
    for fmt in ("compact", "full"):
        exp = make_experiment(train={"steps": STEPS, "precision": precision, **KNOBS},
                              model={"tie_embeddings": tied}, record={"format": fmt, **record})
        run(exp, tmp_path / fmt, progress=False)
        dirs.append(tmp_path / fmt)
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "fp32"])
def test_expansion_equals_the_full_recording(make_experiment, tmp_path, precision, tied):
    compact_dir, full_dir = _pair(make_experiment, tmp_path, precision, tied)
    lines, identical = compare(compact_dir, full_dir)
    assert identical, "\n".join(lines)
    assert verify(compact_dir) == [] and verify(full_dir) == []
    assert (compact_dir / "metrics.csv").read_bytes() == (full_dir / "metrics.csv").read_bytes()
    stored = load_recording(compact_dir / RECORDING)  # any safetensors reader opens it
    assert "W" not in stored and "momentum" not in stored
    assert stored["grads"].dtype == stored[KEYFRAMES].dtype == torch.uint8  # compressed byte strings
    with RowReader(compact_dir / RECORDING) as f:  # what they hold
        assert f.stored["grads"]["dtype"] == ("BF16" if precision == "bf16-true" else "F32")
        assert f.stored[KEYFRAMES]["shape"][:2] == [len(scheduled_keyframes(STEPS + 1)), 3 if tied else 6]
    summary = json.loads((compact_dir / "run.json").read_text())["recording"]
    assert summary["format"] == "compact" and summary["unscheduled_keyframes"] == 0
    assert summary["uncompressed_bytes"] > summary["bytes"]  # the compression took some off
    assert summary["bytes"] < (full_dir / RECORDING).stat().st_size / (2.5 if precision == "bf16-true" else 1.7)


def test_any_row_read_alone_equals_the_full_one(bf16_pair):
    compact_dir, full_dir = bf16_pair
    full = load_recording(full_dir / RECORDING)
    with open_recording(compact_dir) as f:  # the public entry point: a run directory stands for its recording
        for row in (37, 3, 16, 15, 0, 1, 40, 17, 18):  # out of order: from keyframes and from where it stopped
            for name in ("W", "momentum", "variance", "grads"):
                expected = full[name][row:row + 1]
                got = torch.from_numpy(f.rows(name, row, row + 1))
                assert torch.equal(got, expected.float()), (name, row)


@pytest.mark.slow
def test_a_replay_that_differs_makes_keyframes_not_wrong_rows(make_experiment, tmp_path, monkeypatch):
    """The writer's replay, perturbed at some steps, no longer reproduces training there: those rows
    become keyframes and the recording still expands to the run's real states."""
    real_update = AdamReplay.update
    perturbed = {5, 6, 23}

    def update(self, grad, step):
        real_update(self, grad, step)
        if step in perturbed:
            with torch.no_grad():
                self.param.add_(1e-2)

    exp = make_experiment(train={"steps": STEPS, **KNOBS}, record={"format": "compact"})
    monkeypatch.setattr(AdamReplay, "update", update)
    run(exp, tmp_path / "compact", progress=False)
    monkeypatch.setattr(AdamReplay, "update", real_update)
    run(make_experiment(train={"steps": STEPS, **KNOBS}), tmp_path / "full", progress=False)
    meta = json.loads((tmp_path / "compact" / "run.json").read_text())["recording"]
    assert meta["unscheduled_keyframes"] == 3  # rows 6, 7 and 24: each after a perturbed update
    with RowReader(tmp_path / "compact" / RECORDING) as f:
        assert f.compact is not None and {6, 7, 24} <= set(f.compact.keyframe_rows)
    lines, identical = compare(tmp_path / "compact", tmp_path / "full")
    assert identical, "\n".join(lines)


@pytest.mark.slow
def test_resume_equals_the_uninterrupted_compact_run(make_experiment, tmp_path, crash_after_checkpoint):
    exp = make_experiment(train={"steps": STEPS, "checkpoint_every": 20, **KNOBS}, record={"format": "compact"})
    run(exp, tmp_path / "whole", progress=False)
    crash_after_checkpoint(exp, tmp_path / "resumed")
    run(exp, tmp_path / "resumed", progress=False)
    a, b = (load_recording(tmp_path / d / RECORDING) for d in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    digests = [json.loads(RowReader(tmp_path / d / RECORDING).metadata["digests"]) for d in ("whole", "resumed")]
    assert digests[0] == digests[1]
    assert verify(tmp_path / "resumed") == []


def test_a_resumed_run_keeps_the_format_it_began_with(make_experiment, tmp_path, crash_after_checkpoint):
    compact = make_experiment(train={"steps": STEPS, "checkpoint_every": 20}, record={"format": "compact"})
    crash_after_checkpoint(compact, tmp_path / "run")
    full = make_experiment(train={"steps": STEPS, "checkpoint_every": 20})
    assert full.run_id == compact.run_id
    run(full, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["recording"]["format"] == "compact"
    assert verify(tmp_path / "run") == []
    assert is_complete(tmp_path / "run", full) and is_complete(tmp_path / "run", compact)  # either format counts


@pytest.mark.parametrize(("tensor", "row", "message"), [
    ("grads", 20, "grads: rows 0..15: the compressed block does not decompress"),
    ("loss", 3, "loss: rows 0..40 differ"),
    (KEYFRAMES, 2, "keyframes: keyframe 0: the compressed block does not decompress"),
])
def test_verify_names_a_flipped_bit(compact_copy, tensor, row, message):
    flip_byte(compact_copy / RECORDING, tensor, row)
    problems = verify(compact_copy)  # the digests name it (the values replayed from it may break too)
    assert any(message in p for p in problems), problems


def test_a_reader_without_this_project_decompresses_it_as_the_doc_says(bf16_pair):
    """docs/recording.md, "Compression": the stored bytes, blocks at `ends`, zstd, bytes unshuffled,
    give the gradients the full recording holds (bf16-true: the same dtype), bit for bit."""
    import zstandard
    from safetensors import safe_open

    compact_dir, full_dir = bf16_pair
    with safe_open(str(compact_dir / RECORDING), framework="np") as f:
        spec = json.loads(f.metadata()["compression"])
        stored = f.get_tensor("grads")
    grads = spec["tensors"]["grads"]
    assert (spec["codec"], spec["shuffle"], grads["dtype"], grads["block_rows"]) == ("zstd", "byte", "BF16", INTERVAL)
    blocks, begin = [], 0
    for end in grads["ends"]:
        planes = np.frombuffer(zstandard.ZstdDecompressor().decompress(stored[begin:end].tobytes()), np.uint8)
        blocks.append(planes.reshape(2, -1).T.copy().view("<u2"))  # 2 bytes a value: byte 0s, then byte 1s
        begin = end
    assert len(blocks) == 3  # 41 rows in blocks of 16
    decoded = np.concatenate(blocks).reshape(grads["shape"])
    full = load_recording(full_dir / RECORDING, ("grads",))["grads"]
    assert np.array_equal(decoded, full.view(torch.int16).numpy().view("<u2"))


def test_a_compression_index_that_does_not_fit_its_bytes_is_one_line(compact_copy):
    path = compact_copy / RECORDING
    data = path.read_bytes()
    edited = data.replace(b'\\"block_rows\\":16', b'\\"block_rows\\":8 ', 1)  # same length: 6 blocks, not 3
    assert edited != data
    path.write_bytes(edited)
    problems = verify(compact_copy)
    assert len(problems) == 1 and "metadata: compression unusable (grads: its blocks do not cover" in problems[0], \
        problems


def test_verify_refuses_a_truncated_compact_file(compact_copy):
    path = compact_copy / RECORDING
    path.write_bytes(path.read_bytes()[:-100])
    problems = verify(compact_copy)
    assert len(problems) == 1 and "truncated" in problems[0], problems


def test_run_ids_and_refusals(make_experiment):
    assert make_experiment(record={"format": "compact"}).run_id == make_experiment().run_id
    with pytest.raises(ConfigError, match=r"record\.format: compact needs record\.every 1 and W, grads, momentum"):
        make_experiment(record={"format": "compact", "every": 2})
    with pytest.raises(ConfigError, match=r"record\.format: compact needs record\.every 1 and W, grads, momentum"):
        make_experiment(record={"format": "compact", "tensors": ["W", "grads", "loss"]})
    # a subset that keeps what the replay needs is fine: logits are simply not recorded
    exp = make_experiment(record={"format": "compact", "tensors": ["W", "grads", "momentum", "variance", "loss"]})
    assert exp.record.format == "compact"


@pytest.mark.slow
def test_rows_as_numpy_match_for_logits_and_finals(make_experiment, tmp_path):
    compact_dir, full_dir = _pair(make_experiment, tmp_path, "fp32", True)
    with RowReader(compact_dir / RECORDING) as c, RowReader(full_dir / RECORDING) as f:
        assert {n: (t["dtype"], t["shape"]) for n, t in c.tensors.items()} == \
            {n: (t["dtype"], t["shape"]) for n, t in f.tensors.items()}
        for name in ("logits", "loss", "lr", "grad_norm", "W_final"):
            rows = c.tensors[name]["shape"][0]
            assert np.array_equal(c.bits(name, 0, rows), f.bits(name, 0, rows)), name


def test_compact_in_place_then_expand_gives_the_original_back(make_experiment, tmp_path, capsys):
    from runner.analysis.metrics import is_current
    from runner.cli import main

    run(make_experiment(train={"steps": STEPS, **KNOBS}), tmp_path / "run", progress=False)
    original = tmp_path / "original.safetensors"
    original.write_bytes((tmp_path / "run" / RECORDING).read_bytes())
    assert main(["compact", str(tmp_path / "run"), "--quiet"]) == 0
    assert "compact, " in capsys.readouterr().out
    assert (tmp_path / "run" / RECORDING).stat().st_size < original.stat().st_size / 2.5
    assert verify(tmp_path / "run") == [] and is_current(tmp_path / "run")  # metrics.csv still stands
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())["recording"]
    assert manifest["format"] == "compact" and manifest["bytes"] == (tmp_path / "run" / RECORDING).stat().st_size
    assert manifest["uncompressed_bytes"] > manifest["bytes"]  # as training's own run.json says it
    assert main(["compact", str(tmp_path / "run"), "--quiet"]) == 0
    assert "already compact" in capsys.readouterr().out
    assert main(["expand", str(tmp_path / "run"), "--out", str(tmp_path / "expanded.safetensors"), "--quiet"]) == 0
    a, b = load_recording(original), load_recording(tmp_path / "expanded.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert verify(tmp_path / "expanded.safetensors") == []


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, small_book):
    """A full fp32 run, a full bf16-true run and a compact one, trained once."""
    from runner.config import build_experiment

    dirs = {}
    for key, train, record in (("fp32", {"precision": "fp32"}, {}), ("full", {}, {}),
                               ("compact", {}, {"format": "compact"})):
        exp = build_experiment({"name": "c", "corpus": {"path": str(small_book)}, "record": record,
                                "train": {"steps": 12, "batch_size": 4, "device": "cpu", **train}})
        dirs[key] = tmp_path_factory.mktemp(key)
        run(exp, dirs[key], progress=False)
    return dirs


@pytest.mark.parametrize(("args", "message"), [
    (["compact", "{fp32}"], "a full fp32 recording holds W and its gradients rounded to bf16"),
    (["expand", "{full}", "--out", "{tmp}/x.safetensors"], "already in the full format"),
    (["expand", "{compact}", "--out", "{full}/run.json"], "exists already"),
])
def test_conversions_refused_in_one_line(three_runs, tmp_path, capsys, args, message):
    from runner.cli import main

    dirs = three_runs
    before = {d: (d / RECORDING).read_bytes() for d in dirs.values()}
    capsys.readouterr()
    assert main([a.format(tmp=tmp_path, **dirs) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert {d: (d / RECORDING).read_bytes() for d in dirs.values()} == before
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.long
def test_an_interrupted_compact_leaves_the_full_recording(make_experiment, tmp_path):
    """SIGKILL while `compact` writes: the run keeps its full recording, readable and valid; the
    same command then compacts it, and the expansion equals the original."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from runner.layout import CONVERTING, partial

    from conftest import wait_until

    run(make_experiment(train={"steps": STEPS}), tmp_path / "run", progress=False)
    original = (tmp_path / "run" / RECORDING).read_bytes()
    slow_compact = ("import sys, time\nfrom runner.recording.compact import Keyframes\nreal = Keyframes.choose\n"
                    "Keyframes.choose = lambda self, *a: (time.sleep(3), real(self, *a))[1]\n"
                    "from runner.cli import main\nsys.exit(main(['compact', sys.argv[1], '--quiet']))\n")
    command = [sys.executable, "-c", slow_compact, str(tmp_path / "run")]
    killed = subprocess.Popen(command)
    wait_until(lambda: partial(tmp_path / "run" / CONVERTING).exists(), "the compact file being written", 60)
    time.sleep(0.5)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert (tmp_path / "run" / RECORDING).read_bytes() == original and verify(tmp_path / "run") == []
    assert partial(tmp_path / "run" / CONVERTING).exists()  # what it left
    finished = subprocess.run(command, env={**os.environ}, timeout=120)
    assert finished.returncode == 0
    assert not partial(tmp_path / "run" / CONVERTING).exists() and not (tmp_path / "run" / CONVERTING).exists()
    (tmp_path / "original.safetensors").write_bytes(original)
    lines, identical = compare(tmp_path / "run", tmp_path / "original.safetensors")
    assert identical, "\n".join(lines)
    with RowReader(tmp_path / "run" / RECORDING) as f:
        assert f.compact is not None


@pytest.mark.long
def test_sigkill_at_a_random_step_then_resume_compact(tmp_path, small_book):
    """A compact run SIGKILLed mid-run and resumed in a fresh process ends identical to the
    uninterrupted compact run: tensors, parameters, digests (the keyframes' included)."""
    import random
    import subprocess

    from test_resume import EVERY, REPO, STEPS, assert_identical, kill_then_resume, train_cmd

    path = tmp_path / "resume.yaml"
    path.write_text(f"include: {REPO / 'experiments' / 'smoke.yaml'}\nname: resume\ncorpus: {{path: {small_book}}}\n"
                    f"train: {{steps: {STEPS}, batch_size: 4, checkpoint_every: {EVERY}}}\n"
                    "record: {format: compact}\n")
    assert subprocess.run(train_cmd(path, tmp_path / "whole"), capture_output=True).returncode == 0
    kill_then_resume(path, tmp_path / "run", random.Random(7))
    assert_identical(tmp_path / "run", tmp_path / "whole")


@pytest.mark.slow
def test_sigkill_while_the_recording_is_compressed_then_resume(tmp_path, small_book):
    """Killed while its finished recording is compressed, a run has no recording yet (only the
    uncompressed `.partial` and a half-written `.tmp`); the same command ends it as an
    uninterrupted run does, byte for byte."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO, wait_until

    args = ["train", str(REPO / "experiments" / "smoke.yaml"), "--corpus", str(small_book), "--quiet",
            "--set", "train.steps=60", "--set", "train.checkpoint_every=20", "--set", "record.format=compact"]
    stalled = ("import sys, time\nimport runner.recording.writer as w\nreal = w.compress\n"
               "w.compress = lambda source, target: (real(source, target), time.sleep(600))\n"
               "from runner.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    run_dir = tmp_path / "run"
    killed = subprocess.Popen([sys.executable, "-c", stalled, *args, "--out", str(run_dir)])
    tmp = run_dir / (RECORDING + ".tmp")
    wait_until(lambda: tmp.exists() and tmp.stat().st_size > 0, "the compressed recording being written", 120)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (run_dir / RECORDING).exists() and (run_dir / (RECORDING + ".partial")).exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    for out in (run_dir, tmp_path / "whole"):
        assert subprocess.run([sys.executable, "-m", "runner.cli", *args, "--out", str(out)]).returncode == 0
    a, b = (load_recording(d / RECORDING) for d in (run_dir, tmp_path / "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the compressed bytes too
    assert not tmp.exists() and not (run_dir / (RECORDING + ".partial")).exists()
    assert verify(run_dir) == []


def test_compact_of_an_experiment_directory_skips_runs_not_complete(make_experiment, tmp_path, capsys):
    from runner.cli import main
    from runner.runs.rundir import new_manifest, write_manifest

    done, running = make_experiment(), make_experiment(train={"seed": 5})
    run(done, tmp_path / "test" / done.run_id, progress=False)
    (tmp_path / "test" / running.run_id).mkdir()
    write_manifest(tmp_path / "test" / running.run_id, {**new_manifest(running, None, None), "status": "running"})
    capsys.readouterr()
    assert main(["compact", str(tmp_path / "test"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{running.run_id}: running, not compacted" in out and "compact, " in out, out
    assert verify(tmp_path / "test" / done.run_id) == []
    with open_recording(tmp_path / "test" / done.run_id) as f:
        assert f.compact is not None
