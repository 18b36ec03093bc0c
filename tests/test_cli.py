import argparse
import fcntl
import json
import re
import subprocess
import sys

import pytest

from runner.cli import _parser, main

from conftest import REPO


def test_smoke_experiment_end_to_end(tmp_path, small_book, capsys):
    runs = tmp_path / "runs"
    args = ["train", str(REPO / "experiments" / "smoke.yaml"), "--runs", str(runs), "--corpus", str(small_book),
            "--quiet"]
    assert main(args) == 0
    (run_dir,) = [d for d in (runs / "smoke").iterdir() if d.is_dir()]
    assert {p.name for p in run_dir.iterdir()} == {"recording.safetensors", "run.json", "train.log", "tokenizer",
                                                   ".lock", "metrics.csv", "metrics.source.json", "models",
                                                   "progress.json", "events.out.tfevents.lilgatsby"}
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["run_id"] == run_dir.name
    assert "final loss" in capsys.readouterr().out
    rows = [json.loads(line) for line in (runs / "smoke" / "index.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in rows] == [run_dir.name]
    # a complete run is not trained again
    mtime = (run_dir / "recording.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert (run_dir / "recording.safetensors").stat().st_mtime_ns == mtime


def _two_smoke_runs(runs, small_book):
    """Two 3-step smoke runs (seeds 1 and 2) under `runs`; returns their experiment directory."""
    for seed in (1, 2):
        assert main(["train", str(REPO / "experiments" / "smoke.yaml"), "--runs", str(runs), "--corpus",
                     str(small_book), "--set", f"train.seed={seed}", "--set", "train.steps=3", "--quiet"]) == 0
    return runs / "smoke"


def test_index_command_rebuilds_from_manifests(tmp_path, small_book, capsys):
    runs = tmp_path / "runs"
    exp_dir = _two_smoke_runs(runs, small_book)
    expected = (exp_dir / "index.jsonl").read_text()
    for name in ("index.jsonl", "index.csv"):
        (exp_dir / name).unlink()
    capsys.readouterr()
    assert main(["index", str(runs)]) == 0  # a runs root: every experiment below it
    assert capsys.readouterr().out == f"{exp_dir}: 2 runs indexed\n"
    assert (exp_dir / "index.jsonl").read_text() == expected
    assert len((exp_dir / "index.csv").read_text().splitlines()) == 3
    assert main(["index", str(exp_dir)]) == 0  # or one experiment's directory
    assert main(["index", str(tmp_path / "nowhere")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_out_and_set(tmp_path, small_book):
    out = tmp_path / "here"
    assert main(["train", str(REPO / "experiments" / "smoke.yaml"), "--out", str(out), "--quiet",
                 "--set", f"corpus.path={small_book}", "--set", "train.steps=3", "--set", "train.lr=3e-4"]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["config"]["train"]["steps"] == 3 and manifest["config"]["train"]["lr"] == 0.0003
    assert manifest["overrides"] == {"corpus.path": str(small_book), "train.steps": 3, "train.lr": 0.0003}
    assert manifest["grid_point"] == {}


def test_verify_an_experiment_directory_verifies_its_runs(tmp_path, small_book, capsys):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        assert main(["train", str(REPO / "experiments" / "smoke.yaml"), "--runs", str(runs), "--corpus",
                     str(small_book), "--set", f"train.seed={seed}", "--set", "train.steps=3", "--quiet"]) == 0
    (runs / "smoke" / "unfinished").mkdir()
    (runs / "smoke" / "unfinished" / "run.json").write_text(json.dumps({"status": "running"}))
    capsys.readouterr()
    assert main(["verify", str(runs / "smoke")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{runs / 'smoke' / 'unfinished'}: running, not verified"
    assert len(lines) == 3 and all(line.endswith(": ok") for line in lines[1:])
    recording = next((runs / "smoke").glob("*/recording.safetensors"))
    with open(recording, "r+b") as f:  # a corrupt run among them fails the command
        f.truncate(recording.stat().st_size - 100)
    assert main(["verify", str(runs)]) == 1
    assert main(["verify", str(tmp_path)]) == 2 and "no recording, run directory" in capsys.readouterr().err


def test_version_and_examples_in_every_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert re.fullmatch(r"lilgatsby \d+\.\d+\.\d+\n", capsys.readouterr().out)
    subcommands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "pull" in subcommands  # the parser's own list, so a new subcommand is checked too
    for command in subcommands:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        examples = capsys.readouterr().out.split("examples:")[1]
        assert f"lilgatsby {command} " in examples, command


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.steps=0"], "--set train.steps: must be between 1"),
    (["--set", "train.step=3"], "--set train.step=3: train.step: unknown key (known: steps,"),
    (["--set", "model.context_length=256"], "model.context_length: must be between 1 and model.n_positions"),
    (["--set", "train.device=tpu"], "train.device: must be one of"),
    (["--corpus", "/no/such/book.txt"], "/no/such/book.txt: corpus file not found"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, extra, message):
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, "-m", "runner.cli", "train", str(REPO / "experiments" / "smoke.yaml"),
                             "--runs", str(runs), *extra], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not runs.exists()


def test_grid_file_is_refused_by_train(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("name: g\ngrid: {train.seed: [1, 2]}\n")
    assert main(["train", str(path), "--runs", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()


def test_unavailable_device_is_refused(tmp_path, small_book):
    assert main(["train", str(REPO / "experiments" / "smoke.yaml"), "--runs", str(tmp_path / "runs"),
                 "--corpus", str(small_book), "--set", "train.device=cuda"]) == 2
    assert not (tmp_path / "runs").exists()


def test_rm_deletes_the_runs_it_names_never_one_being_trained(tmp_path, small_book, capsys):
    runs = tmp_path / "runs"
    exp_dir = _two_smoke_runs(runs, small_book)
    by_seed = {json.loads(line)["train.seed"]: json.loads(line)["run_id"]
               for line in (exp_dir / "index.jsonl").read_text().splitlines()}
    capsys.readouterr()
    for args, message in ((["rm", str(exp_dir)], "name the runs"),
                          (["rm", str(exp_dir), "0123456789ab"], "no run 0123456789ab"),
                          (["rm", str(exp_dir), "--where", "train.nope=1"], "--where train.nope: not a column"),
                          (["rm", str(exp_dir), "--status", "failed"], "no run matches")):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["rm", str(exp_dir), "--where", "train.seed=2", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"would remove {exp_dir / by_seed[2]} (complete, ")
    assert {d.name for d in exp_dir.iterdir() if d.is_dir()} == set(by_seed.values())
    with open(exp_dir / by_seed[2] / ".lock", "w") as held:  # as its trainer holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["rm", str(exp_dir), by_seed[2]]) == 2
        assert "being trained by another process (nothing removed)" in capsys.readouterr().err
    assert (exp_dir / by_seed[2]).is_dir()
    assert main(["rm", str(exp_dir), "--where", "train.seed=2", "--status", "complete"]) == 0
    assert not (exp_dir / by_seed[2]).exists() and (exp_dir / by_seed[1]).is_dir()
    rows = [json.loads(line) for line in (exp_dir / "index.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in rows] == [by_seed[1]]
