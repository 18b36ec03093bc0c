"""`lilgatsby report`: every figure of the smoke sweep, a page that renders in a real browser, and
runs grouped so that no band mixes configs: `--set` runs, moved-in runs, one run, running runs."""

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from runner.analysis.figures import CURVES, TRAJECTORIES
from runner.cli import main
from runner.layout import RECORDING, partial

from conftest import REPO, wait_until

pytestmark = pytest.mark.slow
STEMS = [c.stem for c in CURVES if not c.panels[0][0].startswith("E_")] + [TRAJECTORIES]  # E's: untied runs
FIGURES = [f"{stem}.{ext}" for stem in STEMS for ext in ("svg", "png")]
# Injected into a copy of the page: records every image's natural width and every error or console.error.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => __errors.push(String(e.message || (e.target && e.target.src))), true);
const consoleError = console.error;
console.error = (...args) => { __errors.push(args.join(" ")); consoleError(...args); };
window.addEventListener("load", () => document.documentElement.setAttribute("data-probe",
  JSON.stringify({widths: [...document.images].map(i => i.naturalWidth), errors: __errors})));
</script>"""


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, small_book):
    """The smoke sweep's four runs, trained one by one without Ray (tests/test_sweep.py sweeps it)."""
    runs = tmp_path_factory.mktemp("runs")
    for seed in (1, 2):
        for precision in ("bf16-true", "fp32"):
            assert main(["train", str(REPO / "experiments" / "smoke_sweep.yaml"), "--runs", str(runs), "--corpus",
                         str(small_book), "--set", f"train.seed={seed}", "--set", f"train.precision={precision}",
                         "--quiet"]) == 0
    return runs / "smoke_sweep"


def test_report_of_the_smoke_sweep_has_every_figure(smoke_sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(smoke_sweep), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    page = (out / "report.html").read_text()
    for stem in STEMS:
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert (out / f"{stem}.svg").read_text().startswith("<?xml") and f'src="{stem}.svg"' in page
    assert "http" not in page.replace("http://www.w3.org", "")  # nothing to fetch: it opens offline
    run_ids = [d.name for d in smoke_sweep.iterdir() if (d / "run.json").exists()]
    assert len(run_ids) == 4 and all(run_id in page for run_id in run_ids)
    assert "grouped by train.precision" in page
    loss = (out / "loss.svg").read_text()  # every figure says what its band is, and which seeds made it
    assert "band: min–max over seeds" in loss and loss.count("2 seeds: 1, 2") == 2
    assert "precision=bf16-true" in loss and "precision=fp32" in loss


def chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium (.ci/run installs it)")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    return browser


def test_report_renders_in_chromium(smoke_sweep, tmp_path):
    browser = chromium()
    out = tmp_path / "report"
    assert main(["report", str(smoke_sweep), "--out", str(out)]) == 0
    probe = out / "probe.html"
    probe.write_text((out / "report.html").read_text().replace("<head>", "<head>" + PROBE, 1))
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                             "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                            capture_output=True, text=True, timeout=120)
    match = re.search(r'data-probe="([^"]*)"', result.stdout)
    assert match, result.stderr[-2000:]
    state = json.loads(match[1].replace("&quot;", '"'))
    assert len(state["widths"]) == len(STEMS) and all(w > 0 for w in state["widths"]), state
    assert state["errors"] == []


@pytest.fixture(scope="module")
def two_configs(tmp_path_factory, small_book):
    """The issue's case: smoke.yaml, then the same file with --set train.steps=20 --set
    train.precision=fp32, both seed 42, in one experiment directory."""
    runs = tmp_path_factory.mktemp("runs")
    common = [str(REPO / "experiments" / "smoke.yaml"), "--runs", str(runs), "--corpus", str(small_book), "--quiet"]
    assert main(["train", *common]) == 0
    assert main(["train", *common, "--set", "train.steps=20", "--set", "train.precision=fp32"]) == 0
    return runs / "smoke"


def test_runs_of_two_configs_are_never_averaged(two_configs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(two_configs), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "grouped by train.steps, train.precision" in page
    loss = (out / "loss.svg").read_text()
    for label in ("steps=20, precision=fp32 (seed 42: one run, no band)",
                  "steps=30, precision=bf16-true (seed 42: one run, no band)"):
        assert label in loss and label.split(" (")[0] in page
    assert "seeds" not in loss.replace("over seeds", "")  # no line claims to average seeds
    shared = page.split("Shared by every run plotted")[1].split("What differs")[0]
    assert "batch_size: 8" in shared and "\n  steps:" not in shared and "precision:" not in shared


def test_one_run_a_moved_in_run_and_a_running_run(two_configs, tmp_path, small_book):
    run_a, run_b = sorted(d for d in two_configs.iterdir() if (d / "run.json").exists())
    # one run directory, e.g. from the README's --out example
    out = tmp_path / "one"
    assert main(["report", str(run_a), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {*FIGURES, "report.html"}
    assert "1 run: 1 complete" in (out / "report.html").read_text()
    # an experiment directory whose runs are not named by their run id, and a running run
    exp = tmp_path / "exp"
    shutil.copytree(run_a, exp / "moved-in")
    running = exp / "still-training"
    shutil.copytree(run_b, running)
    manifest = json.loads((running / "run.json").read_text())
    (running / "run.json").write_text(json.dumps({**manifest, "status": "running"}))
    (running / RECORDING).rename(partial(running / RECORDING))
    (running / "progress.json").write_text(json.dumps({"step": 12, "steps": 20, "loss": 3.0, "rows_written": 9}))
    assert main(["report", str(exp), "--out", str(exp / "report")]) == 0
    page = (exp / "report" / "report.html").read_text()
    assert f"{run_a.name} (in moved-in/)" in page and "running, step 12/20" in page
    assert "2 runs: 1 complete, 1 running" in page
    loss = (exp / "report" / "loss.svg").read_text()
    assert "seed 42: running, step 12/20" in loss and "seed 42: one run, no band" in loss


def test_run_choice_and_failed_runs(two_configs, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(two_configs, exp, ignore=shutil.ignore_patterns("report"))
    run_dir = sorted(d for d in exp.iterdir() if (d / "run.json").exists())[0]
    # a failed run is listed in the table and not plotted
    (exp / "000failed000").mkdir()
    (exp / "000failed000" / "run.json").write_text(json.dumps(
        {"run_id": "000failed000", "name": "smoke", "status": "failed", "error": "RuntimeError: boom"}))
    assert main(["report", str(exp)]) == 0
    page = (exp / "report" / "report.html").read_text()
    assert "000failed000" in page and "3 runs: 2 complete, 1 failed" in page and "RuntimeError: boom" in page
    assert main(["report", str(exp), "--run", run_dir.name, "--out", str(tmp_path / "r")]) == 0
    assert f"run {run_dir.name}" in (tmp_path / "r" / "report.html").read_text()
    assert main(["report", str(exp), "--run", "nope", "--out", str(tmp_path / "r")]) == 2


def test_an_experiment_file_names_its_directory(two_configs, capsys):
    assert main(["report", str(REPO / "experiments" / "smoke.yaml"), "--runs", str(two_configs.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(two_configs / "report" / "report.html")


@pytest.mark.parametrize("setup, args, message", [
    (None, ["{tmp}/nowhere"], "not an experiment directory"),
    ("empty", ["{tmp}/exp"], "no run directories"),
    ("failed", ["{tmp}/exp"], "no complete or running run to report (1 run, none complete)"),
])
def test_bad_input_exits_2(tmp_path, capsys, setup, args, message):
    if setup:
        (tmp_path / "exp" / "r1").mkdir(parents=True)
    if setup == "failed":
        (tmp_path / "exp" / "r1" / "run.json").write_text(json.dumps({"run_id": "r1", "status": "failed"}))
    assert main(["report", *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# Injected into the page as the test's server hands it out: each time the page loads, it posts what
# it shows (the runs' status cells and its images' widths) back to the server.
WATCH_PROBE = """<script>
window.addEventListener("load", () => fetch("/seen", {method: "POST", body: JSON.stringify({
  status: [...document.querySelectorAll("td")].map(td => td.textContent).filter(t => t.startsWith("running")),
  widths: [...document.images].map(i => i.naturalWidth)})}));
</script>"""


def _serve_with_probe(directory, seen: list):
    """An HTTP server on loopback for `directory`, report.html with WATCH_PROBE in it; what the
    page posts lands in `seen`."""
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self):
            if self.path.split("?")[0] != "/report.html":
                return super().do_GET()
            page = (directory / "report.html").read_text().replace("<head>", "<head>" + WATCH_PROBE, 1).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _step(status: str) -> int:
    return int(re.search(r"step (\d+)", status)[1])


def test_report_watch_redraws_a_training_run_in_chromium(tmp_path, small_book):
    """`report --watch 1` while a run trains, its page open in a real browser: the page reloads
    itself and shows the run further along each time, its figures loaded."""
    browser = chromium()
    runs, out = tmp_path / "runs", tmp_path / "report"
    lilgatsby = [sys.executable, "-m", "runner.cli"]
    procs = [subprocess.Popen([*lilgatsby, "train", str(REPO / "experiments" / "smoke.yaml"), "--runs", str(runs),
                               "--corpus", str(small_book), "--quiet", "--set", "train.steps=4000",
                               "--set", "train.batch_size=2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    seen: list = []
    server = _serve_with_probe(out, seen)
    try:  # the watcher starts before the run has a row to draw, and waits for one
        procs.append(subprocess.Popen([*lilgatsby, "report", str(runs / "smoke"), "--out", str(out), "--watch", "1"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        wait_until(lambda: (out / "report.html").exists() or procs[1].poll() is not None, "the first page")
        assert procs[1].poll() is None and procs[1].stdout.readline().strip() == str(out / "report.html")
        procs.append(subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu",
                                       f"--user-data-dir={tmp_path / 'profile'}",
                                       f"http://127.0.0.1:{server.server_address[1]}/report.html"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        shown = lambda: {_step(s["status"][0]) for s in seen if s["status"]}  # noqa: E731
        wait_until(lambda: len(shown()) >= 3 or procs[0].poll() is not None,
                   "three loads of the page showing the run at three steps", timeout_s=180, poll_s=0.2)
        assert procs[0].poll() is None, "the run ended before the page had shown it at three steps"
    finally:
        server.shutdown()
        for proc in procs:
            proc.kill()
            proc.wait()
    steps = [_step(s["status"][0]) for s in seen if s["status"]]
    assert steps == sorted(steps) and steps[-1] > steps[0], steps
    assert all(s["widths"] and all(w > 0 for w in s["widths"]) for s in seen), seen
