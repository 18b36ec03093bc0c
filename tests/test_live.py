"""Live metrics (runner.analysis.live): the table and TensorBoard events written as a run trains,
the same bits as the end-of-run computation, and resumes that leave no step twice and none out."""

import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from runner.analysis.metrics import compute_metrics, load_metrics
from runner.launch.train import run
from runner.layout import EVENTS, METRICS, RECORDING, RunFiles

from conftest import REPO, events_of, wait_until


def assert_events_are_the_table(run_dir) -> None:
    """One event per recorded step for every column, each the table's value (float32), NaNs left out."""
    table = compute_metrics(run_dir / RECORDING)
    events = events_of(run_dir)
    assert set(events) == set(table.columns) - {"step"} - {c for c in table.columns if table[c].isna().all()}
    for tag, points in events.items():
        expected = table[["step", tag]].dropna()
        assert [p.step for p in points] == expected["step"].tolist(), tag
        assert np.array_equal(np.array([p.value for p in points], dtype=np.float32), expected[tag].to_numpy()), tag


@pytest.mark.parametrize("knobs", [
    {"train": {"steps": 40, "checkpoint_every": 9}},
    # lone-row chunks (a checkpoint every step), E's columns, a varying lr and grad_norm
    {"train": {"steps": 20, "checkpoint_every": 1, "lr_schedule": "cosine", "warmup_steps": 4, "grad_clip": 0.5},
     "model": {"tie_embeddings": False}, "record": {"model_steps": "none"}},
], ids=["tied", "untied-every-step"])
def test_the_live_table_is_the_end_of_run_table(make_experiment, tmp_path, knobs):
    exp = make_experiment(**knobs)
    live = run(exp, tmp_path, progress=False)["live_metrics"]
    assert live["rows"] == exp.train.steps + 1 and live["complete"] and live["writer_cpu_s"] > 0
    files = RunFiles(tmp_path)
    assert files.metrics.read_text() == compute_metrics(files.recording).to_csv(index=False)  # to the byte
    assert not files.partial_metrics.exists()
    assert load_metrics(tmp_path).equals(compute_metrics(files.recording))  # metrics.source.json names this recording
    assert_events_are_the_table(tmp_path)


def test_record_live_false_computes_the_same_table_at_the_end(make_experiment, tmp_path):
    live, off = make_experiment(), make_experiment(record={"live": False})
    assert live.run_id == off.run_id  # how the metrics are computed is not what the run is
    run(live, tmp_path / "live", progress=False)
    run(off, tmp_path / "off", progress=False)
    assert (tmp_path / "live" / METRICS).read_bytes() == (tmp_path / "off" / METRICS).read_bytes()
    assert not (tmp_path / "off" / EVENTS).exists()


def test_a_failing_live_view_costs_the_run_nothing(make_experiment, tmp_path, monkeypatch, caplog):
    """Live metrics that raise (here: every chunk) log one warning; the run completes and its
    metrics.csv is computed from the recording, as with `record.live: false`."""
    import runner.analysis.live

    def broken(*args):
        raise OSError("injected")

    monkeypatch.setattr(runner.analysis.live, "_events", broken)
    exp = make_experiment(train={"steps": 20, "checkpoint_every": 5})
    manifest = run(exp, tmp_path, progress=False)
    assert manifest["status"] == "complete" and manifest["live_metrics"]["complete"] is False
    assert (tmp_path / METRICS).read_text() == compute_metrics(tmp_path / RECORDING).to_csv(index=False)
    assert sum("live metrics stopped (OSError: injected)" in r.message for r in caplog.records) == 1


def _lose_table(files):
    files.partial_metrics.unlink()


def _tear_table(files):  # rows past the checkpoint, the last one half-written, as a kill leaves them
    lines = files.partial_metrics.read_bytes().splitlines(keepends=True)
    files.partial_metrics.write_bytes(b"".join(lines + lines[-3:]) + lines[-1][:7])


def _lose_events(files):
    files.events.unlink()


def _damage_events(files):
    files.events.write_bytes(files.events.read_bytes()[:-5])


@pytest.mark.slow  # five in-process trainings and resumes (the inner loop keeps the two above)
@pytest.mark.parametrize("damage", [None, _lose_table, _tear_table, _lose_events, _damage_events],
                         ids=["as-left", "table-lost", "table-torn", "events-lost", "events-torn"])
def test_a_resume_continues_the_table_and_the_events(make_experiment, tmp_path, crash_after_checkpoint, damage):
    exp = make_experiment(train={"steps": 30, "checkpoint_every": 10})
    run(exp, tmp_path / "uninterrupted", progress=False)
    resumed = tmp_path / "resumed"
    crash_after_checkpoint(exp, resumed)
    files = RunFiles(resumed)
    before = {p.step: p.wall_time for p in events_of(resumed)["loss"]}
    assert sorted(before) == list(range(11)), "the crash keeps the rows up to its checkpoint"
    if damage:
        damage(files)
    assert run(exp, resumed, progress=False)["resumed_from_step"] == 10
    assert files.metrics.read_bytes() == (tmp_path / "uninterrupted" / METRICS).read_bytes()
    assert_events_are_the_table(resumed)
    after = {p.step: p.wall_time for p in events_of(resumed)["loss"]}
    if damage in (None, _lose_table, _tear_table):  # the steps before the crash keep their wall time
        assert all(after[step] == wall for step, wall in before.items())
    assert [p.name for p in resumed.glob("events*")] == [EVENTS]


def _rows(points) -> int:
    return len(points.get("loss", [])) if points else 0


@pytest.mark.long  # a SIGKILL fault injection, ~35 s
def test_a_run_seen_live_then_killed_and_resumed(tmp_path, small_book):
    """The issue's run: 2,000 steps of the smoke model. TensorBoard's reader and load_metrics see
    more steps as it trains; SIGKILLed mid-run and resumed, it ends with one point per step, and
    metrics.csv is the end-of-run computation's."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "runner.cli", "train", str(REPO / "experiments" / "smoke.yaml"), "--out", str(out),
           "--corpus", str(small_book), "--quiet", "--set", "train.steps=2000", "--set", "train.batch_size=2",
           "--set", "train.checkpoint_every=500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, tables = [], []
    try:
        wait_until(lambda: (out / EVENTS).exists(), "the event file", timeout_s=60)
        while proc.poll() is None and (not seen or seen[-1] < 1200):
            seen.append(_rows(events_of(out)))
            tables.append(len(load_metrics(out)) if (out / "metrics.csv.partial").exists() else 0)
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    growth = [b for a, b in zip(seen, seen[1:], strict=False) if b > a]
    assert len(growth) >= 3 and seen[-1] < 2001, seen  # seen growing, and the kill came before the end
    assert sorted(tables) == tables and tables[-1] > tables[0], tables
    assert not (out / RECORDING).exists() and json.loads((out / "run.json").read_text())["status"] == "running"
    rows_at_kill = len(load_metrics(out))
    assert rows_at_kill > 1001, "rows past the checkpoint at step 1000, for the resume to drop"

    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] == 1000
    points = events_of(out)
    assert [p.step for p in points["loss"]] == list(range(2001)) == [p.step for p in points["dead_norm"]]
    assert (out / METRICS).read_text() == compute_metrics(out / RECORDING).to_csv(index=False)
    assert all(not math.isnan(p.value) for p in points["dead_norm"])
