"""No secret in what the project writes: with a Ray token and AWS credentials in the environment,
none of them appears in run.json, train.log, the recording, the index, the report, the figures
or the console of train, sweep, index and report."""

import os
import secrets
import subprocess
import sys

import pytest

from runner.cli import main

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.long  # 23 s: a training, a sweep and every command, searched for the secrets
def test_secrets_in_the_environment_are_never_written(tmp_path, small_book, capsys):
    fake = {"RAY_AUTH_TOKEN": secrets.token_hex(32), "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30), "AWS_SESSION_TOKEN": secrets.token_urlsafe(60)}
    env = {**os.environ, **fake}
    runs = tmp_path / "runs"
    common = ["--runs", str(runs), "--corpus", str(small_book)]
    consoles = []
    for command in (["train", str(REPO / "experiments" / "smoke.yaml"), "--set", "train.steps=5", *common],
                    ["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--set", "train.seed=1",
                     "--set", "train.steps=5", *common]):
        result = subprocess.run([sys.executable, "-m", "runner.cli", *command], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        consoles += [result.stdout, result.stderr]
    for command in (["index", str(runs)], ["report", str(runs / "smoke_sweep")], ["verify", str(runs)]):
        assert main(command) == 0
    captured = capsys.readouterr()
    consoles += [captured.out, captured.err]
    written = sorted(p for p in runs.rglob("*") if p.is_file())
    kinds = {p.suffix for p in written}
    assert {".json", ".log", ".safetensors", ".jsonl", ".csv", ".html", ".svg", ".png"} <= kinds, kinds
    for name, value in fake.items():
        for path in written:
            assert value.encode() not in path.read_bytes(), f"{name} in {path}"
        assert not any(value in text for text in consoles), f"{name} on the console"
