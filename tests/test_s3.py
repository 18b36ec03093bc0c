"""Runs roots on S3, against a real server (SeaweedFS, tests/s3_server.py): training, reading,
resuming on another node, faults and bad input."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import boto3
import pytest

from runner.analysis.metrics import load_metrics
from runner.cli import main
from runner.layout import EVENTS
from runner.runs.index import load_index
from runner.storage import s3
from runner.storage.lease import Lease
from runner.storage.location import at
from runner.storage.uri import S3Uri, parse_location

from conftest import REPO, events_of, wait_until
from s3_server import READER, SeaweedFS

SMOKE = str(REPO / "experiments" / "smoke.yaml")


def _objects(root: S3Uri) -> dict[str, int]:
    return s3.store().objects(root)


def _train(runs: str, small_book, *extra: str) -> list[str]:
    return ["train", SMOKE, "--runs", runs, "--corpus", str(small_book), "--set", "train.steps=12",
            "--set", "train.checkpoint_every=4", "--quiet", *extra]


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.mark.slow  # trains two runs
def test_a_run_in_a_bucket_has_the_local_layout_and_every_command_reads_it(s3_root, s3_server, tmp_path, small_book,
                                                                          capsys):
    assert main(_train(str(s3_root), small_book)) == 0
    assert main(_train(str(tmp_path / "runs"), small_book)) == 0
    (local,) = [d for d in (tmp_path / "runs" / "smoke").iterdir() if d.is_dir()]
    remote = s3_root / "smoke" / local.name
    local_files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()} - {".lock"}
    # the same names, and nothing else: no checkpoint, row objects, lease or unfinished upload is left
    assert set(_objects(remote)) == local_files
    assert set(_objects(s3_root)) - {f"smoke/{local.name}/{name}" for name in local_files} == {
        "smoke/index.jsonl", "smoke/index.csv"}
    assert not _client(s3_server.endpoint).list_multipart_uploads(Bucket=s3_root.bucket).get("Uploads")
    assert not any((tmp_path / "scratch").rglob("*.safetensors*"))  # the scratch copy is gone
    manifest = json.loads(s3.store().get_bytes(remote / "run.json"))
    assert manifest["status"] == "complete" and manifest["recording"]["bytes"] == _objects(remote)[
        "recording.safetensors"]

    capsys.readouterr()
    assert main(["compare", str(remote), str(local)]) == 0, capsys.readouterr().out  # bit for bit
    assert main(["compare", str(local), str(remote)]) == 0, capsys.readouterr().out  # a bucket either side
    index = load_index(str(s3_root / "smoke"))
    assert index["status"].tolist() == ["complete"]
    assert index["recording_path"][0] == str(remote / "recording.safetensors")
    assert load_metrics(str(remote)).equals(load_metrics(local))
    assert main(["verify", str(s3_root / "smoke")]) == 0 and capsys.readouterr().out.endswith(": ok\n")
    assert main(["index", str(s3_root)]) == 0 and "1 run indexed" in capsys.readouterr().out

    # a complete run is not trained again: its recording object is untouched
    etag = s3.store().head(remote / "recording.safetensors").etag
    assert main(_train(str(s3_root), small_book)) == 0
    assert s3.store().head(remote / "recording.safetensors").etag == etag

    # the report, from the bucket, into a local directory or into the bucket
    assert main(["report", str(s3_root / "smoke"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").exists() and (tmp_path / "report" / "row_norms.svg").exists()
    assert main(["report", str(s3_root / "smoke")]) == 0
    assert "report/report.html" in _objects(s3_root / "smoke")

    # brought down, it is a local runs root that every command reads
    assert main(["pull", str(s3_root / "smoke"), "--runs", str(tmp_path / "copy"), "--quiet"]) == 0
    copy = tmp_path / "copy" / "smoke" / local.name
    assert {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()} == local_files
    assert main(["verify", str(tmp_path / "copy")]) == 0
    assert main(["compare", str(copy), str(local)]) == 0
    assert load_index(tmp_path / "copy" / "smoke")["recording_path"][0] == str(copy / "recording.safetensors")
    assert load_metrics(copy).equals(load_metrics(local))  # its metrics.csv is current: not recomputed
    assert main(["pull", str(remote), "--runs", str(tmp_path / "one"), "--quiet"]) == 0
    assert (tmp_path / "one" / "smoke" / local.name / "recording.safetensors").exists()


def test_metrics_missing_in_the_bucket_are_computed_from_the_recording_there(s3_root, small_book):
    assert main(_train(str(s3_root), small_book)) == 0
    (run_id,) = s3.store().children(s3_root / "smoke")
    remote = s3_root / "smoke" / run_id
    expected = load_metrics(str(remote))
    s3.store().delete([remote / "metrics.csv", remote / "metrics.source.json"])
    assert load_metrics(str(remote)).equals(expected)  # streamed by ranged reads, then stored again
    assert "metrics.csv" in _objects(remote)


@pytest.mark.parametrize("case", ["unreachable", "credentials", "bucket", "read-only", "uri", "scheme"])
def test_bad_storage_is_one_line_before_anything_is_written(case, s3_root, s3_server, monkeypatch, small_book,
                                                            capsys):
    runs, expected = str(s3_root), {
        "unreachable": "cannot reach the server", "credentials": "refused the credentials",
        "bucket": "the bucket does not exist", "read-only": "access denied", "uri": "not an S3 bucket name",
        "scheme": "unsupported scheme 'gs'"}[case]
    if case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    elif case == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    elif case == "bucket":
        runs = "s3://no-such-bucket/runs"
    elif case == "read-only":
        for key, value in READER.items():
            monkeypatch.setenv(key, value)
    elif case == "uri":
        runs = "s3://Not_A_Bucket/runs"
    else:
        runs = "gs://bucket/runs"
    s3.store.cache_clear()
    capsys.readouterr()
    assert main(_train(runs, small_book)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and expected in err, err
    s3.store.cache_clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    for key, value in {"AWS_ACCESS_KEY_ID": "lilgatsby-test", "AWS_SECRET_ACCESS_KEY": "lilgatsby-test-secret"}.items():
        monkeypatch.setenv(key, value)
    assert _objects(s3_root) == {}  # nothing trained, nothing half-written


def test_sweep_refuses_an_unreachable_bucket_before_ray_starts(s3_root, monkeypatch, small_book, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3.store.cache_clear()
    assert main(["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--runs", str(s3_root), "--corpus",
                 str(small_book), "--quiet"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err


def test_the_probe_names_a_server_that_ignores_conditional_writes(s3_root, monkeypatch, caplog):
    assert s3.store().probe(s3_root) is True  # SeaweedFS honours If-None-Match
    real_put = s3.store().client.put_object

    def ignoring_conditions(**kwargs):
        kwargs.pop("IfNoneMatch", None)
        return real_put(**kwargs)

    monkeypatch.setattr(s3.store().client, "put_object", ignoring_conditions)
    with caplog.at_level(logging.WARNING):
        at(s3_root).probe()
    assert "ignores conditional writes" in caplog.text and "train the same run twice" in caplog.text


@pytest.mark.slow  # waits for a lease to lapse (~2.5 s)
def test_one_lease_per_run_and_a_dead_trainers_lease_lapses(s3_root):
    from runner.runs.rundir import RunLocked

    run = s3_root / "exp" / "run"
    with Lease(s3.store(), run, ttl_s=3):  # a live holder: the second trainer sees it renew
        with pytest.raises(RunLocked, match="another process is training this run"):
            Lease(s3.store(), run, ttl_s=30).acquire()
    assert s3.store().head(run / ".lease") is None  # released
    dead = Lease(s3.store(), run, ttl_s=2)
    dead.acquire()
    dead._stop.set()  # it stops renewing, as a killed trainer does
    with Lease(s3.store(), run, ttl_s=30) as taker:  # waits for the dead trainer's lease to lapse, then takes it
        assert s3.store().head(run / ".lease").age_s < 2
        assert json.loads(s3.store().get_bytes(run / ".lease"))["token"] == taker.holder["token"]
        with pytest.raises(s3.PreconditionFailed):  # the old holder can no longer renew it
            s3.store().put_bytes(run / ".lease", b"{}", if_match=dead.etag)


def _train_process(runs: str, small_book, env: dict, steps: int = 400) -> subprocess.Popen:
    """`lilgatsby train` of the smoke experiment (and `env`'s LILGATSBY_TEST_SET, a --set of the test's)."""
    extra = ["--set", env["LILGATSBY_TEST_SET"]] if "LILGATSBY_TEST_SET" in env else []
    return subprocess.Popen([sys.executable, "-m", "runner.cli", "train", SMOKE, "--runs", runs, "--corpus",
                             str(small_book), "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=10",
                             *extra, "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _checkpoint_step(run: S3Uri) -> int:
    from safetensors import safe_open

    data = s3.store().get_bytes(run / "checkpoint.safetensors")
    if data is None:
        return 0
    path = f"/dev/shm/ckpt-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(data)
    with safe_open(path, framework="pt") as f:
        step = int(f.metadata()["step"])
    os.unlink(path)
    return step


def _events_in(run: S3Uri, tmp_path) -> dict[str, list[int]]:
    """The steps of each scalar in the run's event file in the bucket, as TensorBoard reads them."""
    local = tmp_path / f"events-{len(list(tmp_path.glob('events-*')))}"
    local.mkdir()
    (local / EVENTS).write_bytes(s3.store().get_bytes(run / EVENTS))
    return {tag: [e.step for e in points] for tag, points in events_of(local).items()}


@pytest.mark.slow  # trains into the bucket
def test_a_bucket_run_is_seen_live_as_of_its_last_checkpoint(s3_root, tmp_path, small_book, monkeypatch):
    """While a bucket run trains, each checkpoint ships its metrics so far and its event file:
    load_metrics, TensorBoard's reader and the report see it there (looked at from inside the
    training, right after the checkpoint at step 8 is shipped). Complete, the bucket holds
    metrics.csv and one event per step, and no metrics.csv.partial."""
    from runner.analysis.metrics import compute_metrics
    from runner.launch.staging import Publisher

    seen = {}
    ship = Publisher.checkpoint_saved

    def ship_then_look(self, step):
        ship(self, step)
        if step == 8:
            run = self.home.root
            seen["rows"] = load_metrics(run)["step"].tolist()
            seen["events"] = _events_in(run.s3, tmp_path)["dead_norm"]
            assert main(["report", str(run.parent), "--out", str(tmp_path / "report")]) == 0
            seen["page"] = (tmp_path / "report" / "report.html").read_text()

    monkeypatch.setattr(Publisher, "checkpoint_saved", ship_then_look)
    assert main(_train(str(s3_root), small_book)) == 0
    assert seen["rows"][:9] == list(range(9)) and seen["events"][:9] == list(range(9))  # at least up to step 8
    assert "1 run: 1 running" in seen["page"] and "running, step" in seen["page"]
    run = s3_root / "smoke" / s3.store().children(s3_root / "smoke")[0]
    objects = _objects(run)
    assert "metrics.csv" in objects and "metrics.csv.partial" not in objects
    assert _events_in(run, tmp_path)["loss"] == list(range(13))
    assert s3.store().get_bytes(run / "metrics.csv").decode() == compute_metrics(str(run / "recording.safetensors")
                                                                                 ).to_csv(index=False)


@pytest.mark.long
@pytest.mark.parametrize("record_format", ["full", "compact"])
def test_a_killed_trainer_resumes_on_another_node_bitwise(s3_root, tmp_path, small_book, capsys, record_format):
    """SIGKILL after a checkpoint reached the bucket; the run resumes with another node's (empty)
    scratch once the dead trainer's lease lapses, and ends bit-identical to an uninterrupted run
    (in the compact format: to the uninterrupted compact run, and reads as the full one does).
    Meanwhile a second trainer is refused: one trainer per run."""
    env = {**os.environ, "LILGATSBY_LEASE_TTL_S": "3", "LILGATSBY_SCRATCH": str(tmp_path / "node-a"),
           "LILGATSBY_TEST_SET": f"record.format={record_format}"}
    first = _train_process(str(s3_root), small_book, env)
    run = s3_root / "smoke"
    wait_until(lambda: s3.store().children(run), "the run directory", timeout_s=120, poll_s=0.1)
    run = run / s3.store().children(run)[0]
    wait_until(lambda: _checkpoint_step(run) >= 10, "a checkpoint in the bucket", timeout_s=120, poll_s=0.1)
    second = _train_process(str(s3_root), small_book, {**env, "LILGATSBY_SCRATCH": str(tmp_path / "node-b")})
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2 and "another process is training this run" in out, out
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert json.loads(s3.store().get_bytes(run / "run.json"))["status"] == "running"
    assert "recording.safetensors" not in _objects(run)
    resumed = _train_process(str(s3_root), small_book, {**env, "LILGATSBY_SCRATCH": str(tmp_path / "node-b")})
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    manifest = json.loads(s3.store().get_bytes(run / "run.json"))
    assert manifest["status"] == "complete" and manifest["resumed_from_step"] >= 10
    assert not any(key.startswith(("checkpoint", "recording.safetensors.parts", ".lease", "metrics.csv.partial"))
                   for key in _objects(run))
    assert _events_in(run, tmp_path)["loss"] == list(range(401))  # the restored event file, continued
    assert main(["train", SMOKE, "--out", str(tmp_path / "uninterrupted"), "--corpus", str(small_book),
                 "--set", "train.steps=400", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["compare", str(run), str(tmp_path / "uninterrupted")]) == 0, capsys.readouterr().out
    if record_format == "compact":
        assert manifest["recording"]["format"] == "compact"
        assert main(["train", SMOKE, "--out", str(tmp_path / "compact"), "--corpus", str(small_book),
                     "--set", "train.steps=400", "--set", "record.format=compact", "--quiet"]) == 0
        whole = (tmp_path / "compact" / "recording.safetensors").read_bytes()
        resumed = s3.store().get_bytes(run / "recording.safetensors")
        header = 8 + int.from_bytes(whole[:8], "little")  # the tensors' bytes: identical
        assert whole[header:] == resumed[8 + int.from_bytes(resumed[:8], "little"):]


@pytest.mark.long
def test_the_server_stopping_mid_run_fails_it_and_the_next_run_resumes(tmp_path, small_book, monkeypatch, capsys):
    server = SeaweedFS(tmp_path / "server")
    server.start()
    try:
        from s3_server import ADMIN

        env = {**os.environ, **ADMIN, "AWS_ENDPOINT_URL": server.endpoint, "LILGATSBY_SCRATCH": str(tmp_path / "s"),
               "LILGATSBY_LEASE_TTL_S": "3"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s3.store.cache_clear()
        _client(server.endpoint).create_bucket(Bucket="runs")
        root = S3Uri("runs", "root")
        trainer = _train_process(str(root), small_book, env, steps=400)
        wait_until(lambda: s3.store().children(root / "smoke"), "the run directory", timeout_s=120, poll_s=0.1)
        run = root / "smoke" / s3.store().children(root / "smoke")[0]
        wait_until(lambda: _checkpoint_step(run) >= 10, "a checkpoint in the bucket", timeout_s=120, poll_s=0.1)
        server.stop()
        out, _ = trainer.communicate(timeout=300)
        assert trainer.returncode == 2 and f"S3 server {server.endpoint}" in out.splitlines()[-1], out
        server.start()
        assert json.loads(s3.store().get_bytes(run / "run.json"))["status"] != "complete"
        assert "recording.safetensors" not in _objects(run)
        resumed = _train_process(str(root), small_book, env, steps=400)
        out, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, out
        assert json.loads(s3.store().get_bytes(run / "run.json"))["resumed_from_step"] >= 10
        assert main(["train", SMOKE, "--out", str(tmp_path / "uninterrupted"), "--corpus", str(small_book),
                     "--set", "train.steps=400", "--quiet"]) == 0
        capsys.readouterr()
        assert main(["compare", str(run), str(tmp_path / "uninterrupted")]) == 0, capsys.readouterr().out
    finally:
        server.stop()
        s3.store.cache_clear()


@pytest.mark.long
def test_a_sweep_into_a_bucket(s3_root, small_book, capsys):
    assert main(["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--runs", str(s3_root), "--corpus",
                 str(small_book), "--quiet"]) == 0
    index = load_index(str(s3_root / "smoke_sweep"))
    assert (index["status"] == "complete").all() and len(index) == 4  # its grid
    assert "index: s3://" in capsys.readouterr().out
    assert main(["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--runs", str(s3_root), "--corpus",
                 str(small_book), "--quiet"]) == 0
    assert "nothing to train" in capsys.readouterr().out


@pytest.mark.long
def test_two_concurrent_sweeps_on_one_bucket_train_every_run_once(s3_root, small_book, tmp_path):
    """Two sweeps of one grid into one bucket, started together, each with its own Ray and scratch
    (two nodes): every run is trained by exactly one of them; the other is told another process is
    training it, or finds it completed by another process. All four runs end complete."""
    grid = str(REPO / "experiments" / "smoke_sweep.yaml")
    sweeps = [subprocess.Popen([sys.executable, "-m", "runner.cli", "sweep", grid,
                                "--runs", str(s3_root), "--corpus", str(small_book), "--quiet",
                                "--set", "train.steps=400", "--set", "train.checkpoint_every=50"],
                               env={**os.environ, "LILGATSBY_LEASE_TTL_S": "6",
                                    "LILGATSBY_SCRATCH": str(tmp_path / f"node-{i}")},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [sweep.communicate(timeout=600)[0] for sweep in sweeps]
    lines = [line for out in outs for line in out.splitlines()]
    trained = [m.group(1) for line in lines if (m := re.search(r"\((\w+)\) complete on ", line))]
    assert len(trained) == 4 and len(set(trained)) == 4, outs
    assert any("being trained by another process" in line or "completed by another process" in line
               for line in lines), outs  # the two sweeps did contend for runs
    assert all(sweep.returncode in (0, 1) for sweep in sweeps) and "FAILED" not in "".join(outs), outs
    index = load_index(str(s3_root / "smoke_sweep"))
    assert len(index) == 4 and (index["status"] == "complete").all()


def test_uris():
    assert parse_location("s3://bucket/a/b/") == S3Uri("bucket", "a/b")
    assert parse_location("s3://bucket") / "x" == S3Uri("bucket", "x")
    assert str(S3Uri("bucket", "a") / "b") == "s3://bucket/a/b"
    assert parse_location("runs/x").as_posix() == "runs/x"


# --- the bucket's edges: read-only credentials, environment faults, bad variables, leftovers ---------------------

def _as(monkeypatch, identity: dict) -> None:
    for key, value in identity.items():
        monkeypatch.setenv(key, value)
    s3.store.cache_clear()


@pytest.mark.slow  # trains into the bucket
def test_read_only_credentials_read_everything_and_write_nothing(s3_root, tmp_path, small_book, monkeypatch, capsys):
    """report (to a local --out), verify, compare, index, pull, load_index and load_metrics with an
    identity that may read and list only; what they would write back is skipped with one line."""
    assert main(_train(str(s3_root), small_book)) == 0
    (run_id,) = s3.store().children(s3_root / "smoke")
    remote = s3_root / "smoke" / run_id
    expected = load_metrics(str(remote))
    s3.store().delete([remote / "metrics.csv", remote / "metrics.source.json", s3_root / "smoke" / "index.jsonl"])
    before = _objects(s3_root)
    _as(monkeypatch, READER)
    capsys.readouterr()
    commands = [["report", str(s3_root / "smoke"), "--out", str(tmp_path / "report")], ["verify", str(remote)],
                ["compare", str(remote), str(remote)], ["index", str(s3_root)],
                ["pull", str(s3_root / "smoke"), "--runs", str(tmp_path / "copy"), "--quiet"]]
    for command in commands:
        assert main(command) == 0, (command, capsys.readouterr())
        said = capsys.readouterr().err
        assert "rror" not in said and "Denied" not in said, said  # what it skipped, it said in one line each:
        skipped = [line for line in said.splitlines() if "not written" in line]
        assert all(line.endswith(": not written: these credentials may only read there") for line in skipped)
    assert (tmp_path / "report" / "report.html").exists() and (tmp_path / "copy" / "smoke" / run_id).is_dir()
    assert load_metrics(str(remote)).equals(expected)  # computed from the recording there, not stored
    with pytest.raises(Exception, match="no such index"):
        load_index(str(s3_root / "smoke"))  # nothing wrote one: the reader could not
    assert _objects(s3_root) == before
    _as(monkeypatch, {"AWS_ACCESS_KEY_ID": "lilgatsby-test", "AWS_SECRET_ACCESS_KEY": "lilgatsby-test-secret"})
    assert main(["index", str(s3_root)]) == 0
    _as(monkeypatch, READER)
    assert load_index(str(s3_root / "smoke"))["status"].tolist() == ["complete"]


class _Answers500(http.server.BaseHTTPRequestHandler):
    def _fail(self) -> None:
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _fail

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server_answering_500():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers500)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow  # boto3 retries each request with back-off
@pytest.mark.parametrize("fault", ["down", "500", "no bucket"])
def test_every_read_command_exits_2_for_an_environment_fault(fault, s3_root, tmp_path, monkeypatch, capsys,
                                                              server_answering_500):
    where = {"down": "http://127.0.0.1:9", "500": server_answering_500}.get(fault)
    root = S3Uri("no-such-bucket", "runs") if fault == "no bucket" else s3_root
    if where:
        monkeypatch.setenv("AWS_ENDPOINT_URL", where)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3.store.cache_clear()
    for command in (["report", str(root / "smoke"), "--out", str(tmp_path / "r")], ["verify", str(root / "smoke")],
                    ["index", str(root)], ["pull", str(root / "smoke"), "--runs", str(tmp_path / "p"), "--quiet"]):
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("lilgatsby: error: "), (command, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("value", ["abc", "-5", "0", "inf"])
def test_a_bad_lease_time_to_live_is_one_line_before_anything_is_written(value, tmp_path, small_book, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("LILGATSBY_LEASE_TTL_S", value)
    assert main(_train(str(tmp_path / "runs"), small_book)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"LILGATSBY_LEASE_TTL_S={value!r}: must be a number of seconds" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # trains into the bucket
def test_leftovers_of_a_complete_run_are_removed_and_scratch_stays_bounded(s3_root, tmp_path, small_book):
    """A trainer killed after publishing run.json leaves its lease, checkpoint and row objects in the
    bucket; one killed mid-run leaves its scratch directory on the node. The next train removes
    the lapsed ones, keeps a live lease's, and leaves no empty folders behind."""
    scratch = tmp_path / "scratch"  # the s3_root fixture's LILGATSBY_SCRATCH
    stale = scratch / "other-bucket" / "runs" / "x" / "0123456789ab"
    (stale / "models").mkdir(parents=True)
    (stale / "recording.safetensors.partial").write_bytes(b"\0" * 1000)
    stale.with_name(stale.name + ".claim").touch()  # its trainer died: no one holds the lock
    assert main(_train(str(s3_root), small_book)) == 0
    assert not (scratch / "other-bucket").exists()  # removed, with the folders above it
    assert [p for p in scratch.rglob("*")] == []  # and the run's own scratch: not even empty folders
    (run_id,) = s3.store().children(s3_root / "smoke")
    run = s3_root / "smoke" / run_id
    for name in ("checkpoint.safetensors", "recording.safetensors.parts/rows-00000000-00000005"):
        s3.store().put_bytes(run / name, b"left behind")
    s3.store().put_bytes(run / ".lease", json.dumps({"host": "dead", "pid": 1, "ttl_s": 1}).encode())
    wait_until(lambda: s3.store().head(run / ".lease").age_s >= 1, "the dead trainer's lease to lapse", poll_s=0.2)
    assert main(_train(str(s3_root), small_book)) == 0  # "already complete"
    assert not {".lease", "checkpoint.safetensors"} & set(_objects(run))
    assert not any(key.startswith("recording.safetensors.parts/") for key in _objects(run))
    s3.store().put_bytes(run / "checkpoint.safetensors", b"a live trainer's")
    s3.store().put_bytes(run / ".lease", json.dumps({"host": "alive", "pid": 1, "ttl_s": 600}).encode())
    assert main(_train(str(s3_root), small_book)) == 0
    assert {".lease", "checkpoint.safetensors"} <= set(_objects(run))  # a live lease's run is left alone


@pytest.mark.slow  # trains into the bucket
def test_rm_in_a_bucket_waits_for_no_live_lease_and_leaves_nothing(s3_root, small_book, capsys):
    assert main(_train(str(s3_root), small_book)) == 0
    (run_id,) = s3.store().children(s3_root / "smoke")
    run = s3_root / "smoke" / run_id
    s3.store().put_bytes(run / ".lease", json.dumps({"host": "alive", "pid": 1, "ttl_s": 600}).encode())
    capsys.readouterr()
    assert main(["rm", str(s3_root / "smoke"), run_id]) == 2
    assert "being trained by another process" in capsys.readouterr().err and "run.json" in _objects(run)
    s3.store().delete([run / ".lease"])
    assert main(["rm", str(s3_root / "smoke"), run_id]) == 0
    assert _objects(run) == {} and load_index(str(s3_root / "smoke")).empty


@pytest.mark.long  # trains two runs, converts in the bucket
def test_compact_and_expand_in_a_bucket(s3_root, tmp_path, small_book, capsys):
    """`compact` replaces a bucket run's full recording by the compact one (which reads the same bit
    for bit); `expand` writes it back, identical to the full recording, from the bucket to a file
    and into the bucket."""
    assert main(_train(str(s3_root), small_book)) == 0
    assert main(_train(str(tmp_path / "runs"), small_book)) == 0
    (local,) = [d for d in (tmp_path / "runs" / "smoke").iterdir() if d.is_dir()]
    remote = s3_root / "smoke" / local.name
    full_bytes = _objects(remote)["recording.safetensors"]
    capsys.readouterr()
    assert main(["compact", str(s3_root / "smoke"), "--quiet"]) == 0
    assert "compact," in capsys.readouterr().out
    assert _objects(remote)["recording.safetensors"] < full_bytes / 2.5
    manifest = json.loads(s3.store().get_bytes(remote / "run.json"))
    assert manifest["recording"]["format"] == "compact"
    assert manifest["recording"]["bytes"] == _objects(remote)["recording.safetensors"]
    assert main(["verify", str(remote)]) == 0
    assert main(["compare", str(remote), str(local)]) == 0, capsys.readouterr().out
    assert main(["expand", str(remote), "--out", str(tmp_path / "full.safetensors"), "--quiet"]) == 0
    assert main(["expand", str(remote), "--out", str(s3_root / "full.safetensors"), "--quiet"]) == 0
    capsys.readouterr()
    for expanded in (str(tmp_path / "full.safetensors"), str(s3_root / "full.safetensors")):
        assert main(["compare", expanded, str(local)]) == 0, capsys.readouterr().out
    assert load_metrics(str(remote)).equals(load_metrics(str(local)))
