"""`lilgatsby report`: an experiment's runs (or one run) as figures and one HTML page that opens offline.

Runs are grouped so that a band only ever averages seeds of one config (`runner.analysis.groups`);
the figures are `runner.analysis.figures`'. The page says what was grouped and why: the config
every run shares, what sets each group apart, and every run with its status. Running runs are
drawn as far as they have trained (their live metrics, `runner.analysis.live`; in a bucket as of
their last checkpoint). `watch` redraws it on a period while runs train, and the page reloads itself.
"""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path

import pandas as pd
import yaml

from runner.analysis import figures
from runner.analysis.groups import SEED, Group, RunEntry, full_config, group_runs, shared_config, varying_keys
from runner.analysis.metrics import compute_metrics, dead_row_norms, load_metrics, metrics_so_far
from runner.errors import ConfigError, UserError
from runner.files import write_atomic
from runner.layout import INDEX_JSONL, MANIFEST, REPORT, REPORT_PAGE, RunFiles
from runner.runs.index import index_row, read_runs, write_index
from runner.runs.rundir import read_manifest, read_progress
from runner.storage.location import Location, unless_read_only
from runner.text import plural

log = logging.getLogger(__name__)
TABLE_COLUMNS = ["final_loss", "dead_tokens", "dead_row_norm", "live_row_norm", "dead_cosine"]


class NothingToReport(UserError):
    """No run to draw yet (none started, or none has a row): `watch` waits for one."""


def read_entries(path: Location) -> tuple[list[RunEntry], bool]:
    """The runs of an experiment directory, or the one run of a run directory (True)."""
    if not path.is_dir():  # (one that is not there yet, `watch` waits for)
        raise (UserError if path.exists() else NothingToReport)(
            f"{path}: not an experiment directory (runs/<name>/) or run directory")
    manifest = read_manifest(path)
    if manifest is not None:
        return [RunEntry(path, index_row(path, manifest), full_config(manifest))], True
    runs = read_runs(path)
    if not runs:
        raise NothingToReport(f"{path}: no run directories (with {MANIFEST}) found")
    with unless_read_only(path / INDEX_JSONL):  # the report is read from the runs; the index is a by-product
        write_index(path, [row for _, _, row in runs])
    return [RunEntry(d, row, full_config(manifest) if manifest else {}) for d, manifest, row in runs], False


def _running_so_far(entry: RunEntry) -> tuple[pd.DataFrame, str] | None:
    """A running run's metrics as far as it has trained, and its progress note: its live metrics,
    else (a local run trained with `record.live: false`) computed from its partial recording."""
    progress = read_progress(entry.run_dir)
    table = metrics_so_far(entry.run_dir)
    partial = RunFiles(entry.run_dir).partial_recording
    if table is None and partial.local is not None and progress and progress.get("rows_written"):
        try:
            table = compute_metrics(partial, rows=progress["rows_written"])
        except (UserError, OSError, ValueError, KeyError):
            return None  # it finished or restarted meanwhile: reported as it is next time
    if table is None or not len(table):
        return None
    step = max(int(table["step"].iloc[-1]), progress["step"] if progress else 0)
    return table, f"running, step {step}" + (f"/{progress['steps']}" if progress else "")


def report(path: Location, out: Path | None = None, run_id: str | None = None,
           reload_s: int | None = None) -> Path | Location:
    """Write the report of an experiment directory or one run directory into `out` (default:
    `<path>/report/`, uploaded there when `path` is in a bucket); returns where report.html is.
    `reload_s`: the page reloads itself that often (`watch`'s)."""
    if out is not None:
        return _report(path, out, run_id, reload_s)
    with (path / REPORT).staged_dir() as staged:
        _report(path, staged, run_id, reload_s)
    return path / REPORT / REPORT_PAGE


def watch(path: Location, out: Path | None, run_id: str | None, every_s: float,
          on_page=lambda page: None) -> None:
    """`report --watch`: the report redrawn every `every_s` seconds, its page reloading itself as
    often, until interrupted (a sweep may start more runs at any time). Until a run has a row to
    draw it waits; `on_page(page)` is called after the first page is written."""
    first = True
    while True:
        started = time.monotonic()
        try:
            page = report(path, out, run_id, reload_s=max(1, round(every_s)))
            if first:
                on_page(page)
                first = False
        except NothingToReport as e:
            log.info("%s; waiting", e)
        time.sleep(max(0.0, every_s - (time.monotonic() - started)))


def _report(path: Location, out: Path, run_id: str | None, reload_s: int | None) -> Path:
    entries, single = read_entries(path)
    complete = [e for e in entries if e.status == "complete"]
    running = {e.row["run_id"]: so_far for e in entries if e.status == "running" and (so_far := _running_so_far(e))}
    if not complete and not running:
        raise NothingToReport(f"{path}: no complete or running run to report ({plural(len(entries), 'run')}, "
                              f"none complete)")
    shown = [e for e in entries if e.status == "complete" or e.row["run_id"] in running]
    groups, keys = group_runs(shown, entries[0].row.get("name") or path.name)
    chosen = _chosen_run(complete, groups, run_id, path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file there, /proc, read-only
        raise ConfigError(f"--out {out}: cannot make the report's directory ({e.strerror})") from None
    metrics = {e.row["run_id"]: load_metrics(e.run_dir) for e in complete}
    partial = {rid: table for rid, (table, _) in running.items()}
    notes = {rid: note for rid, (_, note) in running.items()}
    styles = figures.group_styles(groups, keys)
    drawn = []
    for spec in figures.CURVES:
        fig = figures.curve_figure(spec, groups, styles, metrics, partial, notes)
        if fig is not None:
            figures.save(fig, out, spec.stem)
            drawn.append((spec.stem, spec.title))
    if chosen is not None and "W" in chosen.config.get("record.tensors", ()):
        title = f"Each dead token's row norm: run {chosen.row['run_id']} ({_describe(chosen, groups)})"
        figures.save(figures.trajectory_figure(dead_row_norms(RunFiles(chosen.run_dir).recording), title), out,
                     figures.TRAJECTORIES)
        drawn.append((figures.TRAJECTORIES, title))
    page = out / REPORT_PAGE
    write_atomic(page, _html(path, entries, shown, groups, keys, running, drawn, single, reload_s))
    log.info("%s: %s, %s (%d complete, %d running)", page, plural(len(drawn), "figure"),
             plural(len(entries), "run"), len(complete), len(running))
    return page


def _chosen_run(complete: list[RunEntry], groups: list[Group], run_id: str | None,
                path: Location) -> RunEntry | None:
    """The run whose dead tokens are drawn one by one: `--run` (a run id or directory name), else
    the first complete run in group order."""
    in_order = [e for g in groups for e in g.runs if e.status == "complete"]
    if run_id is None:
        return in_order[0] if in_order else None
    chosen = next((e for e in complete if run_id in (e.row["run_id"], e.run_dir.name)), None)
    if chosen is None:
        raise UserError(f"--run {run_id}: not a complete run of {path} "
                        f"(complete: {', '.join(e.row['run_id'] for e in in_order) or 'none'})")
    return chosen


def _describe(entry: RunEntry, groups: list[Group]) -> str:
    return f"{_group_of(entry, groups)}, seed {entry.config.get(SEED)}"


def _group_of(entry: RunEntry, groups: list[Group]) -> str:
    return next((g.label for g in groups if entry in g.runs), "")


def _html(path: Location, entries: list[RunEntry], shown: list[RunEntry], groups: list[Group], keys: list[str],
          running: dict[str, tuple[pd.DataFrame, str]], drawn: list[tuple[str, str]], single: bool,
          reload_s: int | None) -> str:
    """The page: figures, the groups, every run (failed and incomplete ones too) and the config of
    the runs shown (complete and running); reloading itself every `reload_s` seconds when given."""
    counts = {"complete": 0, "running": 0}
    for e in entries:
        counts[e.status] = counts.get(e.status, 0) + 1
    status_text = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    name = entries[0].row.get("name") or path.name
    title = html.escape(f"Lil Gatsby report: {name}" + (f", run {entries[0].row['run_id']}" if single else ""))
    images = "\n".join(
        f'<figure><img src="{html.escape(stem)}.svg" alt="{html.escape(caption)}"><figcaption>'
        f'{html.escape(caption)} (<a href="{html.escape(stem)}.svg">SVG</a>, <a href="{html.escape(stem)}.png">PNG</a>)'
        f"</figcaption></figure>" for stem, caption in drawn)
    group_table = pd.DataFrame([{"group": g.label, **g.values, "seeds": ", ".join(str(s) for s in g.seeds),
                                 "runs plotted": len(g.runs)} for g in groups])
    run_table = pd.DataFrame([{
        "run": e.row["run_id"] + ("" if e.run_dir.name == e.row["run_id"] else f" (in {e.run_dir.name}/)"),
        "group": _group_of(e, groups), "seed": e.config.get(SEED),
        "status": running[e.row["run_id"]][1] if e.row["run_id"] in running else e.status,
        **{c: e.row.get(c) for c in TABLE_COLUMNS}, "error": e.row.get("error") or ""} for e in entries])
    _, passive = varying_keys(shown)
    passive_text = (f"<p>Differ between runs without changing what they compute: {html.escape(', '.join(passive))}.</p>"
                    if passive else "")
    if len(shown) == 1:
        grouping = "One run: its line is its own, with no band"
    else:
        grouping = ("Runs are " + (f"grouped by {html.escape(', '.join(keys))} (the keys whose values differ among "
                                   f"the runs)" if keys else "of one config except the seed")
                    + "; each line is the mean over a group's seeds, its band the min–max over them (one run: no band)")
    reload = (f'<meta http-equiv="refresh" content="{reload_s}">' if reload_s else "")
    drawn_at = (f"<p>Drawn at {time.strftime('%Y-%m-%d %H:%M:%S')}; redrawn every {reload_s} s while "
                f"<code>lilgatsby report --watch</code> runs, and this page reloads itself as often.</p>"
                if reload_s else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{reload}<title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
img{{max-width:100%}}table{{border-collapse:collapse;font-size:.85em}}td,th{{border:1px solid #ccc;padding:2px 6px}}
pre{{background:#f6f6f6;padding:1em}}figcaption{{font-size:.85em;color:#444}}</style></head>
<body><h1>{title}</h1>
<p>{plural(len(entries), "run")}: {html.escape(status_text)}. {grouping}; running runs are dotted,
drawn as far as they have trained. Steps on a logarithmic axis.</p>
{drawn_at}<h2>Figures</h2>
{images}
<h2>Groups</h2>
{group_table.to_html(index=False, na_rep="")}
<h2>Runs</h2>
{run_table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}")}
<h2>Config</h2>
<h3>Shared by every run plotted</h3>
<pre>{html.escape(yaml.safe_dump(shared_config(shown), sort_keys=False))}</pre>
<h3>What differs</h3>
<p>{html.escape(", ".join(keys) or "Nothing but the seed")}{": see Groups." if keys else "."}</p>
{passive_text}
</body></html>
"""
