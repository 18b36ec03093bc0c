"""`lilgatsby report`: an experiment's runs as figures and one HTML page that opens offline.

Curves against the step (logarithmic: the early steps are where the dead rows move most), one
line per value of each swept key other than the seed, the mean across seeds with a min-max band;
each dead token's row norm in one run; the run table and the experiment's config. Figures are
drawn with matplotlib's `Figure` (no pyplot, no display needed) and saved as PNG beside the page.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import pandas as pd
import yaml
from matplotlib.figure import Figure

from runner.analysis.metrics import dead_row_norms, load_metrics
from runner.errors import UserError
from runner.recording.format import RECORDING
from runner.runs.index import rebuild_index
from runner.runs.rundir import MANIFEST

log = logging.getLogger(__name__)
SEED = "train.seed"
# file, title, y label, [(metrics column, line label)], y axis scale
CURVES = [
    ("loss.png", "Training loss", "cross-entropy (nats)", [("loss", "loss")], "linear"),
    ("row_norms.png", "Row norm of W: dead vs live tokens", "mean L2 norm of a row",
     [("dead_norm", "dead"), ("live_norm", "live")], "linear"),
    ("dead_cosine.png", "How alike the dead rows become", "mean pairwise cosine of dead rows",
     [("dead_cosine", "dead")], "linear"),
    ("adam_update.png", "Adam's update direction per row: dead vs live", "mean row norm of m̂/(√v̂+ε)",
     [("dead_update", "dead"), ("live_update", "live")], "log"),
    ("logits.png", "Mean logit at the last position: dead vs live tokens", "mean logit",
     [("dead_logit", "dead"), ("live_logit", "live")], "linear"),
]
TRAJECTORIES = "dead_token_trajectories.png"
TABLE_COLUMNS = ["run_id", "status", "final_loss", "dead_tokens", "dead_row_norm", "live_row_norm", "dead_cosine"]


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Complete runs grouped by the values of the swept keys other than the seed."""
    swept = sorted({k for r in rows for k in (r["swept"] or "").split(",") if k and k != SEED})
    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = ", ".join(f"{k}={r.get(k)}" for k in swept) or r["name"]
        groups.setdefault(label, []).append(r)
    return groups


def _band(tables: list[pd.DataFrame], column: str) -> pd.DataFrame:
    """Mean, min and max across runs of one column, by step."""
    return pd.concat([t[["step", column]] for t in tables]).groupby("step")[column].agg(["mean", "min", "max"])


def _curve_figure(title: str, ylabel: str, series: list[tuple[str, str]], yscale: str,
                  groups: dict[str, list[pd.DataFrame]]) -> Figure | None:
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    styles, drawn = ["-", "--", ":"], False
    for color, (label, tables) in enumerate(groups.items()):
        for (column, kind), style in zip(series, styles, strict=False):
            if not all(column in t for t in tables):
                continue  # not recorded (record.tensors): absent, not an error
            band = _band(tables, column)
            name = f"{label} ({kind})" if len(series) > 1 else label
            if len(tables) > 1:
                name += f", mean of {len(tables)} seeds"
                ax.fill_between(band.index, band["min"], band["max"], color=f"C{color}", alpha=0.2, linewidth=0)
            ax.plot(band.index, band["mean"], style, color=f"C{color}", label=name, linewidth=1.2)
            drawn = True
    if not drawn:
        return None
    ax.set(title=title, xlabel="step", ylabel=ylabel, yscale=yscale)
    ax.set_xscale("symlog", linthresh=1)  # step 0 stays on the axis
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _trajectory_figure(run_dir: Path, run_id: str) -> Figure:
    norms = dead_row_norms(run_dir / RECORDING)
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    for i, token in enumerate(norms.columns[1:]):
        ax.plot(norms["step"], norms[token], linewidth=0.8, color=f"C{i % 10}", label=token)
    ax.set(title=f"Each dead token's row norm, run {run_id}", xlabel="step", ylabel="L2 norm of the row of W")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3, loc="upper left", bbox_to_anchor=(1.01, 1), title="token", title_fontsize=7)
    return fig


def resolve_experiment_dir(path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: not an experiment directory (runs/<name>/)")
    if not any((d / MANIFEST).exists() for d in path.iterdir() if d.is_dir()):
        raise UserError(f"{path}: no run directories (with {MANIFEST}) found")
    return path


def report(experiment_dir: Path, out: Path | None = None, run_id: str | None = None) -> Path:
    """Write the report of `experiment_dir` into `out` (default: `<experiment_dir>/report/`);
    returns the path of report.html."""
    experiment_dir = resolve_experiment_dir(experiment_dir)
    rows = rebuild_index(experiment_dir)
    complete = [r for r in rows if r["status"] == "complete"]
    if not complete:
        raise UserError(f"{experiment_dir}: no complete run to report ({len(rows)} runs, none complete)")
    chosen = next((r for r in complete if r["run_id"] == run_id), None) if run_id else complete[0]
    if chosen is None:
        raise UserError(f"--run {run_id}: not a complete run of {experiment_dir} "
                        f"(complete: {', '.join(r['run_id'] for r in complete)})")
    out = out or experiment_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {r["run_id"]: load_metrics(experiment_dir / r["run_id"]) for r in complete}
    groups = {label: [metrics[r["run_id"]] for r in runs] for label, runs in _groups(complete).items()}
    figures = []
    for name, title, ylabel, series, yscale in CURVES:
        fig = _curve_figure(title, ylabel, series, yscale, groups)
        if fig is not None:
            fig.savefig(out / name, dpi=110)
            figures.append((name, title))
    if "W" in chosen["record.tensors"]:  # the index row holds the run's config, flattened
        _trajectory_figure(experiment_dir / chosen["run_id"], chosen["run_id"]).savefig(out / TRAJECTORIES, dpi=110)
        figures.append((TRAJECTORIES, f"Each dead token's row norm (run {chosen['run_id']})"))
    page = out / "report.html"
    page.write_text(_html(experiment_dir, rows, chosen, figures), encoding="utf-8")
    log.info("%s: %d figures, %d runs (%d complete)", page, len(figures), len(rows), len(complete))
    return page


def _html(experiment_dir: Path, rows: list[dict], shown: dict, figures: list[tuple[str, str]]) -> str:
    """The page: figures, every run (failed and incomplete ones too) and the config of `shown`."""
    swept = sorted({k for r in rows for k in (r["swept"] or "").split(",") if k})
    table = pd.DataFrame([{c: r.get(c) for c in TABLE_COLUMNS[:1] + swept + TABLE_COLUMNS[1:]} for r in rows])
    config = json.loads((experiment_dir / shown["run_id"] / MANIFEST).read_text())["config"]
    for key in swept:  # the swept keys vary by run: they are in the table, not the config
        section, _, name = key.partition(".")
        config.get(section, {}).pop(name, None)
    title = html.escape(f"Lil Gatsby report: {experiment_dir.name}")
    images = "\n".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, caption in figures)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
img{{max-width:100%}}table{{border-collapse:collapse;font-size:.85em}}td,th{{border:1px solid #ccc;padding:2px 6px}}
pre{{background:#f6f6f6;padding:1em}}</style></head>
<body><h1>{title}</h1>
<p>{len(rows)} runs, {sum(r["status"] == "complete" for r in rows)} complete (plotted); swept:
{html.escape(", ".join(swept) or "nothing")}. Bands: min to max across seeds; lines: their mean.</p>
<h2>Figures</h2>
{images}
<h2>Runs</h2>
{table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}")}
<h2>Config (the keys every run shares)</h2>
<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>
</body></html>
"""
