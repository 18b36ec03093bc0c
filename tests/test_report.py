"""`lilgatsby report`: every figure of the smoke sweep, and a page that renders in a real browser."""

import json
import os
import re
import shutil
import subprocess

import pytest

from runner.analysis.report import CURVES, TRAJECTORIES
from runner.cli import main

from conftest import REPO

pytestmark = pytest.mark.slow
FIGURES = [name for name, *_ in CURVES] + [TRAJECTORIES]
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
    runs = tmp_path_factory.mktemp("runs")
    assert main(["sweep", str(REPO / "experiments" / "smoke_sweep.yaml"), "--runs", str(runs), "--corpus",
                 str(small_book), "--quiet"]) == 0
    return runs / "smoke_sweep"


def test_report_of_the_smoke_sweep_has_every_figure(smoke_sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(smoke_sweep), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    page = (out / "report.html").read_text()
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f'src="{name}"' in page
    assert "http" not in page  # nothing to fetch: it opens offline
    run_ids = [d.name for d in smoke_sweep.iterdir() if (d / "run.json").exists()]
    assert len(run_ids) == 4 and all(run_id in page for run_id in run_ids)
    assert "train.precision" in page and "bf16-true" in page and "fp32" in page


def test_report_renders_in_chromium(smoke_sweep, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium (.ci/run installs it)")
        pytest.skip("chromium is not installed (.ci/run installs it)")
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
    assert len(state["widths"]) == len(FIGURES) and all(w > 0 for w in state["widths"]), state
    assert state["errors"] == []


def test_single_run_report_and_run_choice(tmp_path, small_book):
    runs = tmp_path / "runs"
    assert main(["train", str(REPO / "experiments" / "smoke.yaml"), "--runs", str(runs), "--corpus",
                 str(small_book), "--set", "train.steps=5", "--quiet"]) == 0
    # an experiment file names its directory under --runs
    assert main(["report", str(REPO / "experiments" / "smoke.yaml"), "--runs", str(runs)]) == 0
    (run_dir,) = [d for d in (runs / "smoke").iterdir() if (d / "run.json").exists()]
    assert {p.name for p in (runs / "smoke" / "report").iterdir()} == {*FIGURES, "report.html"}
    # a failed run, sorted first, is listed in the table and not plotted
    (runs / "smoke" / "000failed000").mkdir()
    (runs / "smoke" / "000failed000" / "run.json").write_text(json.dumps(
        {"run_id": "000failed000", "name": "smoke", "status": "failed", "error": "RuntimeError: boom"}))
    assert main(["report", str(runs / "smoke")]) == 0
    page = (runs / "smoke" / "report" / "report.html").read_text()
    assert "000failed000" in page and "2 runs, 1 complete" in page
    assert main(["report", str(runs / "smoke"), "--run", run_dir.name, "--out", str(tmp_path / "r")]) == 0
    assert main(["report", str(runs / "smoke"), "--run", "nope", "--out", str(tmp_path / "r")]) == 2


@pytest.mark.parametrize("setup, args, message", [
    (None, ["{tmp}/nowhere"], "not an experiment directory"),
    ("empty", ["{tmp}/exp"], "no run directories"),
    ("failed", ["{tmp}/exp"], "no complete run to report"),
])
def test_bad_input_exits_2(tmp_path, capsys, setup, args, message):
    if setup:
        (tmp_path / "exp" / "r1").mkdir(parents=True)
    if setup == "failed":
        (tmp_path / "exp" / "r1" / "run.json").write_text(json.dumps({"run_id": "r1", "status": "failed"}))
    assert main(["report", *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
