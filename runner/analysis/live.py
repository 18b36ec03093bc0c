"""Live metrics: the per-step metrics of a run as it trains, and a TensorBoard event file of them.

`LiveMetrics` is the recording writer's `RowSink`: each chunk of rows, once it is in the file, is
turned into its rows of the metrics table by the very function the end-of-run computation uses
(`metrics.MetricsOf`, row by row, so the bits are the same), appended to `metrics.csv.partial`
and written as one TensorBoard event per step (every column a scalar tagged by its name) to the
run's event file. All of it runs in the writer thread, never in the training step's path, and
holds one chunk at a time. When the run completes with every row, `metrics.csv.partial` becomes
`metrics.csv` (else the metrics are computed from the recording, as with `record.live: false`).

A crash leaves both files as far as they got; the checkpoint before it made them durable up to
its step. A resume keeps the table's rows up to the checkpoint (recomputing them from the partial
recording if the table has fewer) and rebuilds the event file from those rows, keeping each
step's original wall time: no step twice, none missing. docs/analysis.md describes both files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pandas as pd

from runner.analysis.metrics import (
    MATRIX_NAMES,
    ArrayRows,
    MetricsOf,
    compute_metrics,
    metrics_of,
    note_source,
    parse_table,
    write_metrics,
)
from runner.config import Experiment
from runner.files import publish
from runner.layout import TMP, RunFiles
from runner.recording.format import expected_layout, recorded_steps, recorded_tensors
from runner.recording.rows import RowReader

if TYPE_CHECKING:  # tensorboard (~0.5 s to import) is imported when a run starts
    from tensorboard.summary.writer.record_writer import RecordWriter

log = logging.getLogger(__name__)
FILE_VERSION = "brain.Event:2"  # what TensorBoard expects as an event file's first record


def _events(table: pd.DataFrame, wall_times: list[float]) -> list[bytes]:
    """One serialized event per table row: every non-empty column but `step` as a scalar."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    tags = [c for c in table.columns if c != "step"]
    values = table[tags].to_numpy(dtype=np.float32)
    return [Event(step=int(step), wall_time=wall, summary=Summary(value=[
        Summary.Value(tag=tag, simple_value=float(v)) for tag, v in zip(tags, row, strict=True) if not math.isnan(v)
    ])).SerializeToString() for step, wall, row in zip(table["step"], wall_times, values, strict=True)]


class LiveMetrics:
    """See the module docstring; `finish()` after the recording is published."""

    def __init__(self, run_dir: Path, exp: Experiment, token_counts: list[int]):
        self.files, self.exp, self.token_counts = RunFiles(run_dir), exp, token_counts
        self.steps = recorded_steps(exp.train.steps, exp.record.every)
        self.metrics: MetricsOf | None = None  # once row 0's matrices are known
        self.rows = 0  # rows of the table in metrics.csv.partial
        self.cpu_s = 0.0  # CPU time the writer thread spent here (what the live view costs)
        self.failed = False
        self._csv: int | None = None
        self._events: RecordWriter | None = None  # writing to self._event_file
        self._event_file: BinaryIO | None = None

    # -- RowSink ---------------------------------------------------------------------------------
    def start(self, first_row: int) -> None:
        try:
            table = None
            if first_row:
                with RowReader(self.files.partial_recording) as reader:
                    self.metrics = metrics_of(reader)
                table = self._table_before(first_row)
            self._csv = os.open(self.files.partial_metrics, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._events = self._new_event_file(table)
            if table is not None:
                os.write(self._csv, table.to_csv(index=False).encode())
                self.rows = len(table)
        except Exception as e:
            self._stop(e)

    def _stop(self, e: Exception) -> None:
        """The live view is never worth a run: the end of the run computes the metrics instead."""
        log.warning("%s: live metrics stopped (%s: %s); metrics.csv will be computed at the end of the run",
                    self.files.root, type(e).__name__, e)
        self.failed = True

    def rows_written(self, first_row: int, rows: dict[str, np.ndarray], wall_times: list[float]) -> None:
        if self.failed:
            return
        cpu = time.thread_time()
        try:
            if self.metrics is None:  # the run's first chunk starts with row 0
                initial = {m: rows[m][:1] for m in MATRIX_NAMES if m in rows}
                self.metrics = MetricsOf(self.exp, self.token_counts, initial)
            assert first_row == self.rows, f"rows {first_row}.. after {self.rows} rows"
            table = self.metrics(first_row, ArrayRows(rows))
            assert self._csv is not None and self._events is not None
            os.write(self._csv, table.to_csv(index=False, header=first_row == 0).encode())
            for event in _events(table, wall_times):
                self._events.write(event)
            self._events.flush()
            self.rows += len(table)
        except Exception as e:
            self._stop(e)
        self.cpu_s += time.thread_time() - cpu

    def flush(self) -> None:
        if self._csv is not None and self._events is not None and self._event_file and not self.failed:
            os.fsync(self._csv)
            self._events.flush()
            os.fsync(self._event_file.fileno())

    def close(self) -> None:
        if self._csv is not None:
            os.close(self._csv)
            self._csv = None
        if self._events is not None:
            self._events.close()  # and the file
            self._events = self._event_file = None

    # -- the end of the run ----------------------------------------------------------------------
    def finish(self) -> dict:
        """The recording is published: metrics.csv is the live table when it holds every row.
        Returns what run.json says of the live metrics."""
        complete = not self.failed and self.rows == len(self.steps)
        if complete:
            publish(self.files.partial_metrics, self.files.metrics)
            note_source(self.files.root)
        else:
            if not self.failed:
                log.warning("%s: the live metrics hold %d of %d rows; computing them from the recording",
                            self.files.root, self.rows, len(self.steps))
            write_metrics(self.files.root)
        return {"rows": self.rows, "complete": complete, "writer_cpu_s": round(self.cpu_s, 3)}

    # -- a resume --------------------------------------------------------------------------------
    def _table_before(self, first_row: int) -> pd.DataFrame:
        """The table's rows 0..first_row-1: those of metrics.csv.partial when it has them all (and
        the columns this run computes), else computed from the partial recording."""
        assert self.metrics is not None
        layout = expected_layout(self.exp)
        no_rows = ArrayRows({n: np.empty((0, *layout[n][1][1:]), np.float32) for n in recorded_tensors(self.exp)})
        header = self.metrics(first_row, no_rows).to_csv(index=False)
        try:
            data = self.files.partial_metrics.read_bytes()
        except FileNotFoundError:
            data = b""
        lines = data.split(b"\n")
        if data.startswith(header.encode()) and len(lines) - 2 >= first_row:
            table = parse_table(b"\n".join(lines[:first_row + 1]) + b"\n")
            if table["step"].tolist() == self.steps[:first_row]:
                return table
        log.info("%s: recomputing the metrics of rows 0..%d from the partial recording", self.files.root,
                 first_row - 1)
        return compute_metrics(self.files.partial_recording, rows=first_row)

    def _new_event_file(self, table: pd.DataFrame | None) -> RecordWriter:
        """The event file, started anew: the file version, then (resuming) one event per row of
        `table` with the wall time the old file gave its step."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        wall: dict[int, float] = {}
        if table is not None and self.files.events.exists():
            from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

            try:
                wall = {e.step: e.wall_time for e in LegacyEventFileLoader(str(self.files.events)).Load()
                        if e.HasField("summary")}
            except Exception as e:  # a damaged file: its steps get the time of the resume
                log.warning("%s: unreadable (%s); its events are rebuilt from the metrics", self.files.events, e)
        tmp = self.files.events.with_name(self.files.events.name + TMP)
        self._event_file = open(tmp, "wb")
        events = RecordWriter(self._event_file)
        now = time.time()
        events.write(Event(wall_time=now, file_version=FILE_VERSION).SerializeToString())
        if table is not None:
            for event in _events(table, [wall.get(int(s), now) for s in table["step"]]):
                events.write(event)
        events.flush()
        os.replace(tmp, self.files.events)
        return events

