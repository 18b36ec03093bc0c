"""`lilgatsby verify` and the checks that decide whether a run is complete."""

import json
import shutil
import struct

import pytest
import torch

from runner.cli import main
from runner.launch.train import run
from runner.layout import RECORDING
from runner.recording.verify import verify
from runner.recording.writer import DiskSpaceError
from runner.runs.index import rebuild_index
from runner.runs.rundir import RunLocked, is_complete, run_lock

from conftest import flip_byte, offset_of


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, small_book):
    from runner.config import build_experiment
    exp = build_experiment({"name": "v", "corpus": {"path": str(small_book)},
                            "train": {"steps": 16, "batch_size": 4, "device": "cpu"}})
    run_dir = tmp_path_factory.mktemp("good") / exp.run_id
    run(exp, run_dir, progress=False)
    return exp, run_dir


def damaged_copy(good_run, tmp_path, damage):
    exp, run_dir = good_run
    copy = tmp_path / exp.name / run_dir.name  # where `lilgatsby train --runs tmp_path` puts it
    shutil.copytree(run_dir, copy)
    damage(copy / RECORDING)
    return exp, copy


def set_bytes_of(path, name, values, row=0, dtype=torch.float32):
    """Overwrite tensor `name`'s elements from row `row` on, in place, with `values` in its `dtype`."""
    with open(path, "r+b") as f:
        f.seek(offset_of(path, name, row))
        f.write(torch.tensor(values, dtype=dtype).view(torch.uint8).numpy().tobytes())


def test_valid_recording(good_run, capsys):
    exp, run_dir = good_run
    assert verify(run_dir) == [] and verify(run_dir / RECORDING) == []
    assert is_complete(run_dir, exp)
    assert main(["verify", str(run_dir)]) == 0 and "ok" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "not a readable safetensors file"),       # truncated
    (lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), "not a readable safetensors file"),  # header size
    (lambda p: p.write_bytes(p.read_bytes()[:8] + b"[" + p.read_bytes()[9:]), "not a readable safetensors file"),
    (lambda p: p.unlink(), "missing"),
    (lambda p: set_bytes_of(p, "loss", [float("nan")]), "loss: NaN or Inf in rows 0..16"),
    (lambda p: set_bytes_of(p, "momentum", [1.0] * 64 * 128 * 2), "entries break Adam's update rule"),
])
def test_damage_is_reported_and_run_is_not_complete(good_run, tmp_path, capsys, damage, message):
    exp, copy = damaged_copy(good_run, tmp_path, damage)
    problems = verify(copy)
    assert problems and any(message in p for p in problems), problems
    assert main(["verify", str(copy)]) == 1
    assert message in capsys.readouterr().out
    if "NaN" not in message:  # the quick check (used to decide "complete") skips the NaN scan
        assert not is_complete(copy, exp)
        assert rebuild_index(copy.parent)[0]["status"] == "invalid"


def test_truncated_recording_is_trained_again(good_run, tmp_path, small_book):
    exp, copy = damaged_copy(good_run, tmp_path, lambda p: p.write_bytes(p.read_bytes()[:-1000]))
    assert not is_complete(copy, exp)
    assert main(["train", str(_write_experiment(tmp_path, small_book)), "--runs", str(tmp_path), "--quiet"]) == 0
    assert verify(copy) == [] and is_complete(copy, exp)


def _write_experiment(tmp_path, small_book):
    path = tmp_path / "v.yaml"
    path.write_text(f"name: v\ncorpus: {{path: {small_book}}}\ntrain: {{steps: 16, batch_size: 4, device: cpu}}\n")
    return path


def test_not_enough_disk_is_refused_before_training(make_experiment, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskSpaceError, match=r"needs [\d.,]+ MiB but only 0.0 MiB are free"):
        run(make_experiment(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_run_being_trained_is_locked(make_experiment, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with run_lock(run_dir):
        with pytest.raises(RunLocked, match="another process is training this run"):
            run(make_experiment(), run_dir, progress=False)
    run(make_experiment(), run_dir, progress=False)  # released: trains


def without_digests(path):
    """The recording as one written before digests were kept: its metadata without them."""
    data = path.read_bytes()
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_size])
    del header["__metadata__"]["digests"]
    path.write_bytes(data[:8] + json.dumps(header).encode().ljust(header_size) + data[8 + header_size:])


@pytest.mark.parametrize("name, row, message", [
    ("loss", 5, "loss: rows 0..16 differ from the digest written with them"),
    ("logits", 3, "logits: rows 0..16 differ from the digest written with them"),
    ("W", 9, "W: rows 0..16 differ from the digest written with them"),
    ("W_final", 100, "W_final: differs from the digest written with it"),
])
def test_every_byte_is_checked_against_its_digest(good_run, tmp_path, capsys, name, row, message):
    """One bit flipped anywhere (a value still finite, Adam's relation still within rounding where
    it is checked) fails `verify`, naming the tensor and its rows."""
    exp, copy = damaged_copy(good_run, tmp_path, lambda p: flip_byte(p, name, row))
    problems = verify(copy)
    assert problems == [f"{copy / RECORDING}: {message}"], problems
    assert main(["verify", str(copy)]) == 1 and message in capsys.readouterr().out


def test_a_recording_without_digests_verifies_as_before_and_says_so(good_run, tmp_path, capsys):
    exp, copy = damaged_copy(good_run, tmp_path, without_digests)
    assert verify(copy) == [] and is_complete(copy, exp)
    assert main(["verify", str(copy)]) == 0
    assert "ok (written before recordings held digests: its values are checked, not every byte)" in \
        capsys.readouterr().out


def test_adams_relation_is_checked_at_every_step(good_run, tmp_path):
    """A gradient changed at a step the quick check does not sample (it samples rows 1, 3, 5, ...;
    grads[6] enters only rows 6->7) is found by `verify`, which checks every step."""
    def damage(path):
        without_digests(path)
        set_bytes_of(path, "grads", [1.0] * 64, row=6, dtype=torch.bfloat16)

    exp, copy = damaged_copy(good_run, tmp_path, damage)
    assert verify(copy, full=False) == []
    assert verify(copy) == [f"{copy / RECORDING}: rows 6->7: 64 entries break Adam's update rule"]

