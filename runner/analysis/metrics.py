"""Dead-token analysis: what the rows of tokens that never occur in training do, step by step.

`compute_metrics` streams a recording in chunks of rows (`rows.RowReader`: plain reads, numpy, no
torch; bounded memory whatever the step count) into one table row per recorded step;
`load_metrics(run_dir)` returns it as a pandas DataFrame, cached in `metrics.csv` beside the
recording and recomputed when the recording changes. The columns are documented in docs/analysis.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from runner.layout import RunFiles
from runner.recording.format import experiment_of, header_bytes, recorded_steps
from runner.recording.rows import RowReader
from runner.storage.blob import read
from runner.storage.location import Location, at, unless_read_only

log = logging.getLogger(__name__)
CHUNK_ROWS = 64  # rows per read: 64 x 128 x 64 fp32 = 2 MiB per tensor (measured fastest, ~100 MiB peak)


def dead_token_summary(W: np.ndarray, token_counts: list[int]) -> dict:
    """Dead tokens (never in the corpus) vs live ones: row norms of W and the dead rows' mutual cosine."""
    row = _columns(np.asarray(W, dtype=np.float32)[None], np.array(token_counts) == 0)
    summary: dict[str, int | float | None] = {"dead_tokens": int((np.array(token_counts) == 0).sum())}
    for key, column in (("dead_row_norm", "dead_norm"), ("live_row_norm", "live_norm"),
                        ("dead_cosine", "dead_cosine")):
        value = float(row[column][0])
        summary[key] = None if np.isnan(value) else value
    return summary


def _mean_pairwise_cosine(rows: np.ndarray) -> np.ndarray:
    """(steps, n, dim) -> (steps,): mean cosine over the n(n-1) ordered pairs of distinct rows,
    from |sum of unit rows|^2 = sum of all pairwise dot products (no n x n matrix)."""
    n = rows.shape[1]
    if n < 2:
        return np.full(rows.shape[0], np.nan, dtype=np.float32)
    unit = rows / np.maximum(np.linalg.norm(rows, axis=2, keepdims=True), 1e-12)
    total = np.square(unit.sum(axis=1)).sum(axis=1)
    return (total - np.square(unit).sum(axis=(1, 2))) / (n * (n - 1))


def _reduce_over(values: np.ndarray, mask: np.ndarray, reduce=np.mean) -> np.ndarray:
    """Reduce (steps, vocab, ...) values over the masked tokens; NaN when the mask is empty."""
    if not mask.any():
        return np.full(values.shape[0], np.nan, dtype=np.float32)
    return reduce(values[:, mask], axis=1)


def _dead_live(name: str, values: np.ndarray, dead: np.ndarray) -> dict[str, np.ndarray]:
    """`dead_<name>` and `live_<name>`: the mean of (steps, vocab, ...) values over each group."""
    return {f"dead_{name}": _reduce_over(values, dead), f"live_{name}": _reduce_over(values, ~dead)}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _columns(W: np.ndarray, dead: np.ndarray) -> dict[str, np.ndarray]:
    """The W-only columns of a chunk of rows (steps, vocab, dim)."""
    norms = np.linalg.norm(W, axis=2)
    live = ~dead
    return {**_dead_live("norm", norms, dead),
            "dead_norm_min": _reduce_over(norms, dead, np.min), "dead_norm_max": _reduce_over(norms, dead, np.max),
            "dead_cosine": _mean_pairwise_cosine(W[:, dead]),
            "dead_live_cosine": (_cosine(W[:, dead].mean(axis=1), W[:, live].mean(axis=1))
                                 if dead.any() and live.any() else np.full(W.shape[0], np.nan, dtype=np.float32))}


# W's columns unprefixed, an untied model's input embedding E's with `E_`: (row, gradient, moments)
MATRICES = {"": ("W", "grads", "momentum", "variance"), "E_": ("E", "E_grads", "E_momentum", "E_variance")}


def _prefixed(prefix: str, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + name: values for name, values in columns.items()}


def compute_metrics(path: str | Path | Location, chunk_rows: int = CHUNK_ROWS, rows: int | None = None) -> pd.DataFrame:
    """One row per recorded step of a recording (see the module docstring); metrics whose tensors
    were not recorded are absent. `rows`: only the first rows (of a recording still being written)."""
    chunks = []
    with RowReader(path) as f:
        exp = experiment_of(f.metadata)
        dead = np.array(json.loads(f.metadata["token_counts"])) == 0
        steps = recorded_steps(exp.train.steps, exp.record.every)[:rows]
        (b1, b2), eps = exp.train.betas, exp.train.eps
        names = set(f.tensors)
        initial: dict[str, np.ndarray] = {m: f.rows(m, 0, 1) for m in ("W", "E") if m in names}
        for start in range(0, len(steps), chunk_rows):
            stop = min(start + chunk_rows, len(steps))
            step = np.array(steps[start:stop])
            columns: dict[str, np.ndarray] = {"step": step}
            if "loss" in names:
                columns["loss"] = f.rows("loss", start, stop)
            # the learning rate of update s (0 at row 0: no update); the global gradient norm before clipping
            columns["lr"] = np.array([exp.train.learning_rate(s) for s in step], dtype=np.float32)
            if "grad_norm" in names:
                columns["grad_norm"] = f.rows("grad_norm", start, stop)
            for prefix, (matrix, grads, momentum, variance) in MATRICES.items():
                if matrix in names:
                    values = f.rows(matrix, start, stop)
                    columns.update(_prefixed(prefix, {**_columns(values, dead), **_dead_live(
                        "drift", np.linalg.norm(values - initial[matrix], axis=2), dead)}))
                if grads in names:
                    grad_norms = np.linalg.norm(f.rows(grads, start, stop), axis=2)
                    columns.update(_prefixed(prefix, _dead_live("grad_norm", grad_norms, dead)))
                if {momentum, variance} <= names:
                    # Row s holds Adam's moments after s - 1 updates: the direction of update s - 1 (none before row 2).
                    with np.errstate(divide="ignore", invalid="ignore"):
                        t = np.maximum(step - 1, 0).astype(np.float64)[:, None, None]
                        m_hat = f.rows(momentum, start, stop) / (1 - b1 ** t)
                        v_hat = f.rows(variance, start, stop) / (1 - b2 ** t)
                        update = np.linalg.norm(m_hat / (np.sqrt(v_hat) + eps), axis=2).astype(np.float32)
                    columns.update(_prefixed(prefix, _dead_live("update", update, dead)))
            if "logits" in names:
                logits = f.rows("logits", start, stop)
                columns.update(_dead_live("logit", logits, dead), dead_logit_max=_reduce_over(logits, dead, np.max))
            chunks.append(pd.DataFrame({k: v.astype(np.float32) if k != "step" else v for k, v in columns.items()}))
    return pd.concat(chunks, ignore_index=True)


def dead_row_norms(path: str | Path | Location, chunk_rows: int = CHUNK_ROWS) -> pd.DataFrame:
    """Each dead token's row norm of W at every recorded step: a `step` column, then one column per
    dead token named by its character (as Python writes it in a string, e.g. `\\x00`)."""
    with RowReader(path) as f:
        exp = experiment_of(f.metadata)
        dead = [i for i, count in enumerate(json.loads(f.metadata["token_counts"])) if count == 0]
        steps = recorded_steps(exp.train.steps, exp.record.every)
        norms = np.concatenate([np.linalg.norm(f.rows("W", start, min(start + chunk_rows, len(steps)))[:, dead],
                                               axis=2) for start in range(0, len(steps), chunk_rows)])
    table = pd.DataFrame(norms, columns=[repr(chr(i))[1:-1] for i in dead])
    table.insert(0, "step", list(steps))
    return table


def _fingerprint(recording: Location) -> dict:
    """What identifies a recording's content cheaply, wherever it is (a disk, a bucket, a copy):
    its size and its header's hash (the header holds the run id, start time and final metrics)."""
    blob = recording.open_blob()
    try:
        header = header_bytes(lambda offset, n: read(blob, offset, n))
        return {"recording": recording.name, "bytes": blob.size, "header_sha256": hashlib.sha256(header).hexdigest()}
    finally:
        blob.close()


def write_metrics(run_dir: Path | Location) -> pd.DataFrame:
    """Compute the run's metrics and store them beside its recording (with the recording's
    fingerprint, so a changed recording is noticed)."""
    files = RunFiles(at(run_dir))
    source = _fingerprint(files.recording)
    table = compute_metrics(files.recording)
    with unless_read_only(files.metrics):  # a reader gets the table all the same
        files.metrics.write_text(table.to_csv(index=False))
        files.metrics_source.write_text(json.dumps(source) + "\n")
    return table


def load_metrics(run_dir: str | Path | Location) -> pd.DataFrame:
    """The run's per-step metrics (a local run directory or `s3://…/<experiment>/<run id>`): from
    `metrics.csv` when it was computed from the recording as it is now, else computed from the
    recording (streamed by ranged reads from a bucket) and stored beside it."""
    where = at(run_dir)
    files = RunFiles(where)
    try:
        cached = json.loads(files.metrics_source.read_bytes() or b"null")
        table_bytes = files.metrics.read_bytes() if cached == _fingerprint(files.recording) else None
        if table_bytes is not None:
            table = pd.read_csv(io.BytesIO(table_bytes))
            return table.astype({c: "float32" for c in table.columns if c != "step"})  # as computed
    except (OSError, ValueError):
        pass
    log.info("%s: computing per-step metrics from the recording", where)
    return write_metrics(where)
