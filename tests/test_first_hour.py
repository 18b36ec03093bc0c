"""What a new user meets in the first hour, each found in a trial and fixed at its root: one line
and exit 2 for a mistyped path, suggestions for a mistyped key, the including file named, values
printed as they are written."""

import pytest

from runner import load_index
from runner.cli import main
from runner.errors import UserError

from conftest import REPO

SMOKE = str(REPO / "experiments" / "smoke.yaml")


@pytest.mark.parametrize("args, message", [
    (["rm", "runs/smok", "--status", "failed", "--dry-run"], "runs/smok: not an experiment directory"),
    (["rm", SMOKE, "--status", "failed"], f"{SMOKE}: not an experiment directory"),
    (["verify", "runs/smok"], "runs/smok: no such recording, run directory or experiment directory"),
    (["train", SMOKE, "--set", "train.step=3"], "unknown key (known: steps, "),
    (["train", SMOKE, "--set", "train.step=3"], "; did you mean 'steps'?"),
])
def test_mistyped_paths_and_keys_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_an_unknown_key_in_a_file_gets_a_suggestion(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text(f"include: {SMOKE}\nname: typo\ntrain: {{stpes: 5}}\n")
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert "train.stpes: unknown key (known: " in capsys.readouterr().err


def test_a_missing_include_names_the_file_that_includes_it(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("include: base.yaml\nname: mine\n")
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: include: base.yaml: no such experiment file ({tmp_path / 'base.yaml'})" in err, err


def test_the_dry_run_prints_values_as_yaml_writes_them(tmp_path, capsys):
    path = tmp_path / "live.yaml"
    path.write_text(f"include: {SMOKE}\nname: live\ngrid: {{model.tie_embeddings: [true, false]}}\n")
    assert main(["sweep", str(path), "--dry-run", "--runs", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[-1] for line in lines[:2]] == ["model.tie_embeddings=true", "model.tie_embeddings=false"]


def test_load_index_of_an_experiment_never_trained_says_so(tmp_path):
    with pytest.raises(UserError, match=r"runs/smoke: no such experiment directory: no run of it has been trained"):
        load_index(tmp_path / "runs" / "smoke")
    (tmp_path / "runs" / "smoke").mkdir(parents=True)
    with pytest.raises(UserError, match=r"index.jsonl: no such index \(`lilgatsby index .*runs/smoke` rebuilds it\)"):
        load_index(tmp_path / "runs" / "smoke")
