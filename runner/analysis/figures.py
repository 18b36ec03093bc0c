"""The report's figures, drawn for a paper draft: each an SVG (vector, for the page and for papers)
and a PNG beside it.

Curves share one look: the step on a logarithmic axis from step 1 (rows 0 and 1 hold the same W
and the same batch's loss, so nothing happens before step 1), one line per group of runs (the
mean over its seeds) with a min–max band, groups in value order with an ordered colour map for a
numeric key, every band and line visible (translucent bands with outlines, wide lines under
narrow ones, dashes for categories), the band's meaning in the legend's title, and running runs
as thin dotted lines. Matplotlib's `Figure` is used directly: no pyplot, no display.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from runner.analysis.groups import Group
from runner.files import write_atomic
from runner.runs.index import is_number

MAX_POINTS = 600  # log-spaced steps drawn per line: enough for the eye, small SVGs for 10,000 steps
# Okabe & Ito's colour-blind-safe palette, for categories (precision, kernels, ...)
CATEGORICAL = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
DASHES = ["-", "--", ":", "-."]
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


@dataclass(frozen=True)
class Curve:
    """One figure of curves: `panels` are (metrics column, panel title) drawn side by side."""

    stem: str
    title: str
    ylabel: str
    panels: tuple[tuple[str, str], ...]
    log_y: bool = False


CURVES = (
    Curve("loss", "Training loss", "cross-entropy (nats)", (("loss", ""),)),
    Curve("row_norms", "Row norm of W", "mean L2 norm of a row", (("dead_norm", "dead tokens"),
                                                                  ("live_norm", "live tokens"))),
    Curve("embedding_row_norms", "Row norm of E, the untied input embedding", "mean L2 norm of a row",
          (("E_dead_norm", "dead tokens"), ("E_live_norm", "live tokens"))),  # drawn when a run is untied
    Curve("dead_cosine", "How alike the dead rows become", "mean pairwise cosine of dead rows",
          (("dead_cosine", ""),)),
    Curve("adam_update", "Adam's update direction per row", "mean row norm of m̂/(√v̂+ε)",
          (("dead_update", "dead tokens"), ("live_update", "live tokens")), log_y=True),
    Curve("logits", "Mean logit at the last position", "mean logit", (("dead_logit", "dead tokens"),
                                                                        ("live_logit", "live tokens"))),
)
TRAJECTORIES = "dead_token_trajectories"


@dataclass(frozen=True)
class Style:
    color: str
    dashes: str
    width: float


def group_styles(groups: list[Group], keys: list[str]) -> list[Style]:
    """Colour by the first numeric varying key (an ordered colour map over its values in order),
    else by the first key (a categorical palette); dashes by the next key. Earlier groups draw wider
    lines, so a later line that coincides with one runs inside it rather than hiding it."""
    n = len(groups)
    widths = [2.8 - 1.6 * i / (n - 1) if n > 1 else 1.8 for i in range(n)]

    numeric = [k for k in keys if all(is_number(g.values[k]) for g in groups)]
    color_key = next(iter(numeric or keys), None)
    dash_key = next((k for k in keys if k != color_key), None)
    if color_key is None:
        return [Style(CATEGORICAL[0], "-", 1.8)]
    if len(keys) > 2:  # too many keys to map one each: every group its own colour and dashes
        return [Style(CATEGORICAL[i % len(CATEGORICAL)], DASHES[i // len(CATEGORICAL) % len(DASHES)], widths[i])
                for i in range(n)]

    def ranks(key: str) -> dict[str, int]:
        ordered = list(dict.fromkeys(repr(g.values[key]) for g in groups))  # groups are in value order
        return {v: i for i, v in enumerate(ordered)}

    color_rank = ranks(color_key)
    if color_key in numeric:
        colormap = matplotlib.colormaps["viridis"]
        palette = [matplotlib.colors.to_hex(colormap(x)) for x in np.linspace(0.0, 0.85, len(color_rank))]
    else:
        palette = [CATEGORICAL[i % len(CATEGORICAL)] for i in range(len(color_rank))]
    dash_rank = ranks(dash_key) if dash_key else {}
    styles = []
    for i, g in enumerate(groups):
        dashes = DASHES[dash_rank[repr(g.values[dash_key])] % len(DASHES)] if dash_key else (
            DASHES[i % len(DASHES)] if color_key not in numeric else "-")
        styles.append(Style(palette[color_rank[repr(g.values[color_key])]], dashes, widths[i]))
    return styles


def log_spaced(steps: pd.Index | np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """At most `max_points` of `steps` (all >= 1), evenly spaced on a logarithmic axis."""
    steps = np.asarray(steps)
    if len(steps) <= max_points:
        return steps
    targets = np.geomspace(steps[0], steps[-1], max_points)
    return np.unique(steps[np.clip(np.searchsorted(steps, targets), 0, len(steps) - 1)])


def band(tables: list[pd.DataFrame], column: str) -> pd.DataFrame:
    """Mean, min and max across runs of one column, by step (from step 1)."""
    stacked = pd.concat([t.loc[t["step"] >= 1, ["step", column]] for t in tables])
    stats = stacked.groupby("step")[column].agg(["mean", "min", "max"])
    return stats.loc[log_spaced(stats.index)]


def _legible_log_ticks(axis, low: float, high: float) -> None:
    """Ticks a reader can read on a logarithmic axis: plain numbers, as many per decade as the span allows."""
    decades = np.log10(high / low) if low > 0 and high > low else 1.0
    subs = (1.0,) if decades > 4 else (1.0, 2.0, 5.0) if decades > 1.2 else tuple(np.arange(1.0, 10.0))
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(PLAIN)
    axis.set_minor_formatter(NullFormatter())


def curve_figure(spec: Curve, groups: list[Group], styles: list[Style], metrics: dict[str, pd.DataFrame],
                 partial: dict[str, pd.DataFrame], running: dict[str, str]) -> Figure | None:
    """One figure of `spec`, or None when no run recorded its columns. `metrics`: complete runs'
    tables by run id; `partial`: running runs' tables so far; `running`: their legend notes."""
    panels = [(c, t) for c, t in spec.panels if any(c in m for m in (*metrics.values(), *partial.values()))]
    if not panels:
        return None
    fig = Figure(figsize=(4.6 * len(panels) + 1.0, 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    y_values: list[float] = []
    last_step = max(t["step"].max() for t in (*metrics.values(), *partial.values()))
    for ax, (column, panel_title) in zip(axes, panels, strict=True):
        for z, (group, style) in enumerate(zip(groups, styles, strict=True)):
            done = [metrics[e.row["run_id"]] for e in group.runs if e.row["run_id"] in metrics]
            done = [t for t in done if column in t]
            seeds = [e.config.get("train.seed") for e in group.runs if e.row["run_id"] in metrics]
            if done:
                stats = band(done, column)
                label = f"{group.label} ({_seeds(seeds)})"
                if len(done) > 1:
                    ax.fill_between(stats.index, stats["min"], stats["max"], color=style.color, alpha=0.12,
                                    linewidth=0, zorder=1)
                    for edge in ("min", "max"):
                        ax.plot(stats.index, stats[edge], style.dashes, color=style.color, linewidth=0.6, alpha=0.7,
                                zorder=2)
                ax.plot(stats.index, stats["mean"], style.dashes, color=style.color, linewidth=style.width,
                        label=label, zorder=10 + z)
                y_values += [stats["min"].min(), stats["max"].max()]
            for e in group.runs:
                table = partial.get(e.row["run_id"])
                if table is not None and column in table and (table["step"] >= 1).any():
                    stats = band([table], column)
                    ax.plot(stats.index, stats["mean"], ":", color=style.color, linewidth=1.0, zorder=30,
                            label=f"{group.label}, seed {e.config.get('train.seed')}: {running[e.row['run_id']]}")
                    y_values += [stats["mean"].min(), stats["mean"].max()]
        ax.set_xscale("log")
        ax.set_xlim(1, max(last_step, 2))
        _legible_log_ticks(ax.xaxis, 1, max(last_step, 2))
        ax.set(title=panel_title, xlabel="step (log scale)")
        ax.grid(alpha=0.3, which="major")
    axes[0].set_ylabel(spec.ylabel)
    finite = [v for v in y_values if np.isfinite(v)]
    if spec.log_y and finite and min(finite) > 0:
        axes[0].set_yscale("log")
        _legible_log_ticks(axes[0].yaxis, min(finite), max(finite))
    fig.suptitle(spec.title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=_legend_columns(fig, labels), fontsize=8,
               title="line: mean over seeds · band: min–max over seeds", title_fontsize=8, frameon=False)
    return fig


def _legend_columns(fig: Figure, labels: list[str], fontsize: float = 8) -> int:
    """Up to 3 columns, as many as fit the figure's width (a running run's label is long)."""
    chars_per_line = fig.get_figwidth() * 72 / (0.6 * fontsize)  # ~0.6 em per character
    longest = max((len(label) for label in labels), default=1) + 6  # and the line's sample
    return max(1, min(3, len(labels), int(chars_per_line // longest)))


def _seeds(seeds: list) -> str:
    if len(seeds) == 1:
        return f"seed {seeds[0]}: one run, no band"
    return f"{len(seeds)} seeds: {', '.join(str(s) for s in sorted(seeds))}"


def trajectory_figure(norms: pd.DataFrame, title: str) -> Figure:
    """Each dead token's row norm over the steps, as a heatmap: one row per token, labelled by its
    character, sorted by final norm (largest on top)."""
    norms = norms[norms["step"] >= 1].set_index("step")
    norms = norms.loc[log_spaced(norms.index)]
    tokens = norms.iloc[-1].sort_values(ascending=False).index
    values = norms[tokens].to_numpy().T
    fig = Figure(figsize=(8.5, max(4.0, 0.16 * len(tokens) + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(norms.index, np.arange(len(tokens)), values, cmap="viridis", shading="nearest",
                         rasterized=True)
    ax.set_xscale("log")
    ax.set_xlim(norms.index[0], norms.index[-1])
    _legible_log_ticks(ax.xaxis, norms.index[0], norms.index[-1])
    ax.set_yticks(np.arange(len(tokens)), list(tokens), fontsize=7, fontfamily="monospace")
    ax.invert_yaxis()
    ax.set(title=title, xlabel="step (log scale)", ylabel="dead token (sorted by final norm)")
    fig.colorbar(mesh, ax=ax, label="L2 norm of the token's row of W", shrink=0.8)
    return fig


def save(fig: Figure, out: Path, stem: str) -> None:
    """`<stem>.svg` and `<stem>.png` in `out` (no timestamps inside: the same figure, the same bytes).
    The SVG keeps its text as text, to be edited and searched."""
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": stem}):
        _save_whole(fig, out / f"{stem}.svg", metadata={"Date": None})
    fig.set_layout_engine("none")  # laid out by the first save: the second one keeps it (a third of the time)
    _save_whole(fig, out / f"{stem}.png", dpi=150, metadata={"Software": None})


def _save_whole(fig: Figure, path: Path, **kwargs) -> None:
    """Replaced whole: a page reloading meanwhile gets the old figure or the new."""
    drawn = io.BytesIO()
    fig.savefig(drawn, format=path.suffix[1:], **kwargs)
    write_atomic(path, drawn.getvalue())
