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
from typing import Protocol

import numpy as np
import pandas as pd

from runner.analysis.tokens import token_label
from runner.config import Experiment
from runner.layout import RunFiles
from runner.recording.format import experiment_of, header_bytes, recorded_steps, recorded_tensors
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
MATRIX_NAMES: tuple[str, ...] = tuple(names[0] for names in MATRICES.values())  # whose drift is from row 0


def _prefixed(prefix: str, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + name: values for name, values in columns.items()}


class Rows(Protocol):
    """A chunk of a recording's rows: `rows(name)` is tensor `name`'s `count` rows as fp32."""

    names: set[str]
    count: int

    def __call__(self, name: str) -> np.ndarray: ...


class ArrayRows:
    """Rows held in memory (the recording writer's chunk): name -> fp32 array."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays, self.names = arrays, set(arrays)
        self.count = len(next(iter(arrays.values()))) if arrays else 0

    def __call__(self, name: str) -> np.ndarray:
        return self.arrays[name]


class _ReaderRows:
    def __init__(self, reader: RowReader, names: set[str], start: int, stop: int):
        self.reader, self.names, self.start, self.stop, self.count = reader, names, start, stop, stop - start

    def __call__(self, name: str) -> np.ndarray:
        return self.reader.rows(name, self.start, self.stop)


class MetricsOf:
    """The metrics of a recording's rows, chunk by chunk: `MetricsOf(exp, token_counts, initial)(first_row,
    rows)` is one table row per row of the chunk. Each row's values depend on that row alone (and
    row 0's W and E, `initial`), so any split into chunks gives the same bits: the end-of-run
    computation and the live one (`runner.analysis.live`) are this one function."""

    def __init__(self, exp: Experiment, token_counts: list[int], initial: dict[str, np.ndarray]):
        self.exp, self.initial = exp, initial
        self.dead = np.array(token_counts) == 0
        self.steps = recorded_steps(exp.train.steps, exp.record.every)

    def __call__(self, first_row: int, rows: Rows) -> pd.DataFrame:
        step = np.array(self.steps[first_row:first_row + rows.count])
        if rows.count == 1:  # numpy reduces a lone row by another path (a pairwise sum) than a stack of
            # rows, which changes the last bits: a lone row is computed as a pair of itself
            return self._table(np.repeat(step, 2), ArrayRows({n: np.repeat(rows(n), 2, axis=0)
                                                              for n in rows.names})).iloc[:1]
        return self._table(step, rows)

    def _table(self, step: np.ndarray, rows: Rows) -> pd.DataFrame:
        exp, dead, names = self.exp, self.dead, rows.names
        (b1, b2), eps = exp.train.betas, exp.train.eps
        columns: dict[str, np.ndarray] = {"step": step}
        if "loss" in names:
            columns["loss"] = rows("loss")
        # the learning rate of update s (0 at row 0: no update); the global gradient norm before clipping
        columns["lr"] = np.array([exp.train.learning_rate(s) for s in step], dtype=np.float32)
        if "grad_norm" in names:
            columns["grad_norm"] = rows("grad_norm")
        for prefix, (matrix, grads, momentum, variance) in MATRICES.items():
            if matrix in names:
                values = rows(matrix)
                columns.update(_prefixed(prefix, {**_columns(values, dead), **_dead_live(
                    "drift", np.linalg.norm(values - self.initial[matrix], axis=2), dead)}))
            if grads in names:
                grad_norms = np.linalg.norm(rows(grads), axis=2)
                columns.update(_prefixed(prefix, _dead_live("grad_norm", grad_norms, dead)))
            if {momentum, variance} <= names:
                # Row s holds Adam's moments after s - 1 updates: the direction of update s - 1 (none before row 2).
                with np.errstate(divide="ignore", invalid="ignore"):
                    t = np.maximum(step - 1, 0).astype(np.float64)[:, None, None]
                    m_hat = rows(momentum) / (1 - b1 ** t)
                    v_hat = rows(variance) / (1 - b2 ** t)
                    update = np.linalg.norm(m_hat / (np.sqrt(v_hat) + eps), axis=2).astype(np.float32)
                columns.update(_prefixed(prefix, _dead_live("update", update, dead)))
        if "logits" in names:
            logits = rows("logits")
            columns.update(_dead_live("logit", logits, dead), dead_logit_max=_reduce_over(logits, dead, np.max))
        return pd.DataFrame({k: v.astype(np.float32) if k != "step" else v for k, v in columns.items()})


def metrics_of(reader: RowReader) -> MetricsOf:
    """The metrics function of an open recording (its config, token counts and row 0)."""
    initial = {m: reader.rows(m, 0, 1) for m in MATRIX_NAMES if m in reader.tensors}
    return MetricsOf(experiment_of(reader.metadata), json.loads(reader.metadata["token_counts"]), initial)


def compute_metrics(path: str | Path | Location, chunk_rows: int = CHUNK_ROWS, rows: int | None = None) -> pd.DataFrame:
    """One row per recorded step of a recording (see the module docstring); metrics whose tensors
    were not recorded are absent. `rows`: only the first rows (of a recording still being written)."""
    with RowReader(path) as f:
        metrics = metrics_of(f)
        names = set(recorded_tensors(metrics.exp)) & set(f.tensors)  # the per-step ones
        stop = len(metrics.steps) if rows is None else min(rows, len(metrics.steps))
        chunks = [metrics(start, _ReaderRows(f, names, start, min(start + chunk_rows, stop)))
                  for start in range(0, stop, chunk_rows)]
        if not chunks:  # no rows: the columns all the same
            chunks = [metrics(0, _ReaderRows(f, names, 0, 0))]
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
    table = pd.DataFrame(norms, columns=[token_label(i) for i in dead])
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


def is_current(run_dir: Path | Location) -> bool:
    """Whether metrics.csv was computed from the recording as it is now."""
    files = RunFiles(at(run_dir))
    try:
        return json.loads(files.metrics_source.read_bytes() or b"null") == _fingerprint(files.recording)
    except (OSError, ValueError):
        return False


def note_source(run_dir: Path | Location) -> None:
    """metrics.csv (the live table, just published; or a recording's just rewritten in the other
    format, which reads the same) is that of the recording as it is now."""
    files = RunFiles(at(run_dir))
    files.metrics_source.write_text(json.dumps(_fingerprint(files.recording)) + "\n")


def parse_table(data: bytes) -> pd.DataFrame:
    """A metrics table read back from its CSV, with the dtypes it was computed in."""
    table = pd.read_csv(io.BytesIO(data))
    return table.astype({c: "float32" for c in table.columns if c != "step"})


def metrics_so_far(run_dir: str | Path | Location) -> pd.DataFrame | None:
    """A running run's metrics as far as it has trained (`metrics.csv.partial`, which
    `runner.analysis.live` appends to; in a bucket as of the run's last checkpoint; no rows before
    its first chunk is written), or None when it has none."""
    try:
        data = RunFiles(at(run_dir)).partial_metrics.read_bytes()  # None: there is none
    except OSError:
        return None
    if data is None:
        return None
    complete = data[:data.rfind(b"\n") + 1]  # its last line may be half-written
    return parse_table(complete) if complete else pd.DataFrame({"step": pd.Series(dtype="int64")})


def load_metrics(run_dir: str | Path | Location) -> pd.DataFrame:
    """The run's per-step metrics (a local run directory or `s3://…/<experiment>/<run id>`): from
    `metrics.csv` when it was computed from the recording as it is now, else computed from the
    recording (streamed by ranged reads from a bucket) and stored beside it. A run still training:
    its metrics so far (`metrics_so_far`)."""
    where = at(run_dir)
    files = RunFiles(where)
    if not files.recording.exists() and (so_far := metrics_so_far(where)) is not None:
        return so_far
    try:
        table_bytes = files.metrics.read_bytes() if is_current(where) else None
        if table_bytes is not None:
            return parse_table(table_bytes)
    except OSError:
        pass
    log.info("%s: computing per-step metrics from the recording", where)
    return write_metrics(where)
